"""Tests for stages.model.assemble: an HF checkpoint from the original weights plus per-block files."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from stages.model.assemble import assemble, block_file_name
from stages.model.blocks import find_layers, get_weight, load_block, save_block, skeleton
from stages.model.checkpoint import INDEX_NAME, SafetensorsIndex


def write_blocks(model_dir: Path, folder: Path, edit=None) -> Path:
    for i in range(skeleton(model_dir).num_blocks):
        block = load_block(model_dir, i)
        if edit is not None:
            edit(i, block)
        save_block(folder / block_file_name(i), block.state_dict())
    return folder


def load_checked(out_dir: Path) -> torch.nn.Module:
    model, info = AutoModelForCausalLM.from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    return model.eval()


@pytest.mark.parametrize("shard_bytes", [2**30, 20_000])
def test_assemble_unmodified_blocks(tiny_model_dir: Path, tmp_path: Path, shard_bytes: int) -> None:
    blocks = write_blocks(tiny_model_dir, tmp_path / "blocks")
    out = assemble(tiny_model_dir, blocks, tmp_path / "model", max_shard_bytes=shard_bytes)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= names
    assert (INDEX_NAME in names) == (shard_bytes < 2**30) and ("model.safetensors" in names) == (shard_bytes == 2**30)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    assert set(SafetensorsIndex.open(out).keys()) == set(SafetensorsIndex.open(tiny_model_dir).keys())
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_checked(out)(ids).logits, load_checked(tiny_model_dir)(ids).logits)


def test_assemble_pruned_block_and_dtype(tiny_llama_dir: Path, tmp_path: Path) -> None:
    def prune(i: int, block: torch.nn.Module) -> None:
        if i == 1:
            W = get_weight(find_layers(block)["mlp.up_proj"])
            W.data[:, ::2] = 0
        block.to(torch.bfloat16)  # stored in another dtype: cast back to the original's

    out = assemble(tiny_llama_dir, write_blocks(tiny_llama_dir, tmp_path / "b", prune), tmp_path / "m")
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float32 for t in tensors.values())
    up = tensors["model.layers.1.mlp.up_proj.weight"]
    assert (up[:, ::2] == 0).all() and (up[:, 1::2] != 0).all()
    assert (tensors["model.layers.0.mlp.up_proj.weight"] != 0).all()
    load_checked(out)


def test_assemble_errors(tiny_llama_dir: Path, tiny_model_factory, tmp_path: Path) -> None:
    blocks = write_blocks(tiny_llama_dir, tmp_path / "b")
    with pytest.raises(ValueError, match="3 blocks but 2 block files"):
        assemble(tiny_llama_dir, blocks, tmp_path / "m", block_files=["block_000.safetensors"] * 2)
    with pytest.raises(ValueError, match="block files missing"):
        assemble(tiny_llama_dir, tmp_path, tmp_path / "m")
    gpt2_blocks = write_blocks(tiny_model_factory("gpt2"), tmp_path / "g")
    with pytest.raises(ValueError, match="does not match block 0 of LlamaForCausalLM"):
        assemble(tiny_llama_dir, gpt2_blocks, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def old_style_gpt2(model_dir: Path, folder: Path) -> Path:
    """A GPT-2 checkpoint as on the Hub: keys without `transformer.`, plus the old `attn.bias` buffers."""
    folder.mkdir()
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(model_dir / "model.safetensors").items()}
    for i in range(3):
        tensors[f"h.{i}.attn.bias"] = torch.ones(1, 1, 64, 64).tril()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((model_dir / name).read_bytes())
    return folder


def test_gpt2_checkpoint_without_prefix(tiny_model_factory, tmp_path: Path) -> None:
    from tests.stages.model.test_capture import blockwise_logits  # noqa: PLC0415 (same equivalence helper)

    src = tiny_model_factory("gpt2")
    old = old_style_gpt2(src, tmp_path / "old")
    assert skeleton(old).key_prefix == "h."
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_checked(src)(ids).logits
    torch.testing.assert_close(blockwise_logits(old, ids), ref, atol=1e-5, rtol=1e-5)
    out = assemble(old, write_blocks(old, tmp_path / "b"), tmp_path / "m")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "h.0.attn.c_attn.weight" in keys and "h.0.attn.bias" not in keys
    with torch.no_grad():
        torch.testing.assert_close(load_checked(out)(ids).logits, ref)
    assert json.loads((out / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.parametrize("block_dtype", [torch.float32, torch.bfloat16])
def test_streamed_shards_hold_one_block_and_keep_dtypes(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch, block_dtype
) -> None:
    """Shards are written unit by unit: a unit's tensors are gone before the next unit loads;
    a bf16 original stays bf16 and the files read back equal to the block files."""
    import weakref

    import stages.model.assemble as asm

    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    tensors = {k: v.to(torch.bfloat16) for k, v in load_file(tiny_llama_dir / "model.safetensors").items()}
    save_file(tensors, str(bf16 / "model.safetensors"), metadata={"format": "pt"})
    for p in tiny_llama_dir.iterdir():
        if not p.name.endswith(".safetensors"):
            (bf16 / p.name).write_bytes(p.read_bytes())
    blocks = write_blocks(bf16, tmp_path / "b", lambda i, b: b.to(block_dtype))

    alive: list[weakref.ref] = []
    overlaps = []
    real_block_unit = asm._block_unit

    def tracking_unit(*args, **kwargs):
        unit = real_block_unit(*args, **kwargs)

        def load():
            overlaps.append(sum(r() is not None for r in alive))
            out = unit.load()
            alive.extend(weakref.ref(t) for t in out.values())
            return out

        return asm.Unit(unit.layout, load)

    monkeypatch.setattr(asm, "_block_unit", tracking_unit)
    out = assemble(bf16, blocks, tmp_path / "m")  # one shard: every block streams into the same file
    assert len(overlaps) == 3 and overlaps == [0, 0, 0]  # no block's tensors outlive their writing
    got = SafetensorsIndex.open(out)
    loaded = got.load(list(got.keys()))
    assert loaded.keys() == tensors.keys()
    for k, t in loaded.items():
        assert t.dtype == torch.bfloat16 and torch.equal(t, tensors[k]), k
    load_checked(out)


def test_non_block_tensors_are_copied_as_stored(tiny_llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """Embeddings, final norm and head are copied byte for byte, never loaded as tensors (at 8B with a
    128k vocabulary they are 2 GiB, more than a block)."""
    import stages.model.assemble as asm

    blocks = write_blocks(tiny_llama_dir, tmp_path / "b")

    def no_load(self, names, *args, **kwargs):
        raise AssertionError(f"loaded {names}")

    monkeypatch.setattr(SafetensorsIndex, "load", no_load)
    monkeypatch.setattr(asm, "COPY_CHUNK", 1000)  # several reads a tensor, a short last one
    out = assemble(tiny_llama_dir, blocks, tmp_path / "m")
    got, want = load_file(out / "model.safetensors"), load_file(tiny_llama_dir / "model.safetensors")
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    load_checked(out)


def test_truncated_original_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    blocks = write_blocks(tiny_llama_dir, tmp_path / "b")
    cut = tmp_path / "cut"
    cut.mkdir()
    for p in tiny_llama_dir.iterdir():
        (cut / p.name).write_bytes(p.read_bytes())
    header = json.loads(
        (cut / "model.safetensors").read_bytes()[8:][
            : int.from_bytes((cut / "model.safetensors").read_bytes()[:8], "little")
        ]
    )
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    assert skeleton(cut).block_of(last) is None  # the file ends with a non-block tensor (model.norm)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[:-4])
    with pytest.raises((ValueError, SafetensorError)):  # safetensors refuses it as it reads the headers
        assemble(cut, blocks, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not any(p.name.startswith(".") for p in tmp_path.iterdir())
