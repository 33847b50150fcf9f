"""Tests for stages.model.blocks: block discovery, one-block loading, running, kwargs on disk."""

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers.pytorch_utils import Conv1D

import stages.model.checkpoint as checkpoint
from stages.model.blocks import (
    find_blocks,
    find_layers,
    get_weight,
    load_block,
    load_layer_kwargs,
    meta_model,
    run_block,
    save_layer_kwargs,
    set_weight,
    skeleton,
)
from stages.model.capture import capture_inputs

PATHS = {
    "LlamaForCausalLM": "model.layers",
    "OPTForCausalLM": "model.decoder.layers",
    "GPT2LMHeadModel": "transformer.h",
}


def full_model(model_dir: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_skeleton(tiny_model_dir: Path) -> None:
    sk = skeleton(tiny_model_dir)
    assert sk.block_path == PATHS[sk.architecture] and sk.num_blocks == 3
    assert sk.key_prefix == sk.block_path + "." and sk.block_prefix(2) == f"{sk.block_path}.2."
    assert sk.block_of(f"{sk.block_path}.1.x.weight") == 1 and sk.block_of("lm_head.weight") is None
    assert len(sk.layer_names[0]) >= 4 and sk.layer_names[0] == sk.layer_names[2]
    with pytest.raises(IndexError, match="out of range"):
        sk.block_prefix(3)


def test_find_blocks_errors() -> None:
    class Twins(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = PretrainedConfig(num_hidden_layers=2)
            self.a = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
            self.b = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])

    with pytest.raises(ValueError, match="Twins: cannot find its decoder blocks, several candidates"):
        find_blocks(Twins())
    lonely = Twins()
    lonely.config = PretrainedConfig(num_hidden_layers=5)
    with pytest.raises(ValueError, match="no nn.ModuleList of 5 identical modules"):
        find_blocks(lonely)


def test_weight_orientation(tiny_model_factory) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5)
    for layer in (nn.Linear(5, 7), Conv1D(7, 5)):
        W = get_weight(layer)
        assert W.shape == (7, 5)
        torch.testing.assert_close(layer(x), nn.functional.linear(x, W, layer.bias))
        new = torch.randn(7, 5)
        set_weight(layer, new)
        torch.testing.assert_close(get_weight(layer), new)
    gpt2_block = find_blocks(meta_model(tiny_model_factory("gpt2")))[1][0]
    assert set(find_layers(gpt2_block)) == {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}
    with pytest.raises(ValueError, match=r"does not match the layer's \(out, in\) \(7, 5\)"):
        set_weight(nn.Linear(5, 7), torch.zeros(5, 7))


def test_load_block_matches_full_model(tiny_model_dir: Path) -> None:
    sk = skeleton(tiny_model_dir)
    full_blocks = full_model(tiny_model_dir).get_submodule(sk.block_path)
    block = load_block(tiny_model_dir, 1)
    ref = full_blocks[1].state_dict()
    assert block.state_dict().keys() == ref.keys()
    assert all(torch.equal(block.state_dict()[k], ref[k]) for k in ref)
    assert not any(t.is_meta for t in [*block.parameters(), *block.buffers()])
    assert not block.training
    bf16 = load_block(tiny_model_dir, 1, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())


def test_load_block_reads_only_its_tensors(tiny_model_factory, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = tiny_model_factory("llama", max_shard_size="20KB")
    read: list[str] = []
    real_open = checkpoint.safe_open

    class Recording:
        def __init__(self, *args, **kwargs) -> None:
            self.f = real_open(*args, **kwargs)

        def __enter__(self) -> "Recording":
            self.f.__enter__()
            return self

        def __exit__(self, *exc) -> None:
            self.f.__exit__(*exc)

        def keys(self) -> list[str]:
            return self.f.keys()

        def get_tensor(self, name: str) -> torch.Tensor:
            read.append(name)
            return self.f.get_tensor(name)

    monkeypatch.setattr(checkpoint, "safe_open", Recording)
    load_block(model_dir, 2)
    assert read and all(name.startswith("model.layers.2.") for name in read)


def test_run_block_batches_like_single_samples(tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    ids = torch.randint(3, 128, (3, 12))
    hidden, kwargs = capture_inputs(tiny_model_dir, ids)
    # an explicit batch-1 causal mask must be expanded/broadcast like the other kwargs
    mask = torch.full((12, 12), torch.finfo(torch.float32).min).triu(1)[None, None]
    block = load_block(tiny_model_dir, 0)
    for kw in (kwargs, kwargs | {"attention_mask": mask}):
        batched = run_block(block, hidden, kw)
        single = torch.cat([run_block(block, hidden[j : j + 1], kw) for j in range(3)])
        assert batched.shape == hidden.shape
        torch.testing.assert_close(batched, single, atol=1e-6, rtol=1e-5)


def test_layer_kwargs_round_trip(tmp_path: Path) -> None:
    pos = torch.arange(6)[None]
    kwargs = {
        "position_ids": pos,
        "cache_position": pos[0],  # shares storage with position_ids
        "position_embeddings": (torch.randn(1, 6, 4), torch.randn(1, 6, 4)),
        "use_cache": False,
        "sliding_window": 4,
        "names": ["a", None],
    }
    save_layer_kwargs(tmp_path / "kw.safetensors", kwargs)
    back = load_layer_kwargs(tmp_path / "kw.safetensors")
    assert back.keys() == kwargs.keys() and back["use_cache"] is False and back["names"] == ["a", None]
    assert isinstance(back["position_embeddings"], tuple)
    torch.testing.assert_close(back["position_embeddings"][1], kwargs["position_embeddings"][1])
    assert torch.equal(back["cache_position"], pos[0]) and back["sliding_window"] == 4
    with pytest.raises(ValueError, match="layer kwarg 'odd' has type object"):
        save_layer_kwargs(tmp_path / "bad.safetensors", {"odd": object()})
    assert not (tmp_path / "bad.safetensors").exists()
    with pytest.raises(ValueError, match="holds no layer kwargs"):
        load_layer_kwargs(_plain_file(tmp_path))


def _plain_file(folder: Path) -> Path:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(folder / "plain.safetensors"))
    return folder / "plain.safetensors"


def test_meta_model_is_fresh(tiny_llama_dir: Path) -> None:
    a, b = meta_model(tiny_llama_dir), meta_model(tiny_llama_dir)
    assert a is not b and next(a.parameters()).is_meta
