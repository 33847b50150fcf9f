"""Tests for stages.model.capture: block-by-block forward equals the full model, on real architectures."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from stages.model.blocks import load_block, load_layer_kwargs, run_block, save_layer_kwargs, skeleton
from stages.model.capture import Head, capture_inputs, head_logits


def blockwise_logits(model_dir: Path, ids: torch.Tensor, kwargs_file: Path | None = None) -> torch.Tensor:
    """Capture, then one block at a time (each loaded alone), then the head."""
    hidden, kwargs = capture_inputs(model_dir, ids, batch_size=2)
    if kwargs_file is not None:
        save_layer_kwargs(kwargs_file, kwargs)
        kwargs = load_layer_kwargs(kwargs_file)
    for i in range(skeleton(model_dir).num_blocks):
        hidden = run_block(load_block(model_dir, i), hidden, kwargs)
    return Head(model_dir)(hidden)


def reference_logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir).eval()(ids).logits


def test_blockwise_equals_full_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (5, 16))
    got = blockwise_logits(tiny_model_dir, ids, tmp_path / "layer_kwargs.safetensors")
    torch.testing.assert_close(got, reference_logits(tiny_model_dir, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", [{"tied": True}, {"max_shard_size": "20KB"}])
def test_blockwise_llama_variants(tiny_model_factory, variant: dict) -> None:
    model_dir = tiny_model_factory("llama", **variant)
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(blockwise_logits(model_dir, ids), reference_logits(model_dir, ids), atol=1e-5, rtol=1e-5)


def save_qwen2(folder: Path, **kwargs: object) -> Path:
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kwargs,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def test_blockwise_qwen2(tmp_path: Path) -> None:
    model_dir = save_qwen2(tmp_path / "qwen2")
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(blockwise_logits(model_dir, ids), reference_logits(model_dir, ids), atol=1e-5, rtol=1e-5)


def test_capture_refuses_per_block_kwargs(tmp_path: Path) -> None:
    model_dir = save_qwen2(tmp_path / "sliding", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(ValueError, match="block 1 receives other kwargs than block 0"):
        capture_inputs(model_dir, torch.randint(3, 128, (1, 12)))


def test_capture_batches_and_validation(tiny_llama_dir: Path) -> None:
    ids = torch.randint(3, 128, (5, 8), generator=torch.Generator().manual_seed(3))
    h1, kw = capture_inputs(tiny_llama_dir, ids, batch_size=1)
    h5, _ = capture_inputs(tiny_llama_dir, ids, batch_size=5)
    assert h1.shape == (5, 8, 32) and h1.device.type == "cpu"
    torch.testing.assert_close(h1, h5)
    assert kw["position_ids"].shape == (1, 8) and len(kw["position_embeddings"]) == 2
    assert "cache" not in kw and "past_key_values" not in kw
    with pytest.raises(ValueError, match=r"must be a \(n, seqlen\) LongTensor"):
        capture_inputs(tiny_llama_dir, ids[0])


def test_head_logits_shape(tiny_llama_dir: Path) -> None:
    logits = head_logits(tiny_llama_dir, torch.zeros(2, 4, 32))
    assert logits.shape == (2, 4, 128)


@pytest.mark.slow
def test_blockwise_equals_full_model_smollm2(smollm2_dir: Path) -> None:
    from stages.model.models import load_tokenizer

    ids = load_tokenizer(smollm2_dir)(["The capital of France is Paris, and"], return_tensors="pt").input_ids
    got, ref = blockwise_logits(smollm2_dir, ids), reference_logits(smollm2_dir, ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert got[0, -1].argmax() == ref[0, -1].argmax()
