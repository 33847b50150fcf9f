"""Assemble a Hugging Face checkpoint from the original weights and per-block files.

The output keeps the original tensor names and dtypes: non-block tensors (embeddings,
final norm, lm_head) are copied from the original safetensors, and the tensors of
block i come from its own file written by `stages.blocks.save_block` (block-relative
names). Tensors are streamed in groups of whole blocks up to `max_shard_bytes`, so at
most one output shard (or one block, if larger) is in memory. Sharded output gets a
`model.safetensors.index.json`; config, generation config and tokenizer files are
copied. The folder is written under a temporary name and renamed into place.
"""

import json
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from stages.blocks import Skeleton, skeleton
from stages.models import INDEX_NAME, SafetensorsIndex

PathLike = str | os.PathLike
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")
"""Files never copied from the original folder: weights are rewritten, pickles never carried over."""
DEFAULT_SHARD_BYTES = 256 * 1024**2
"""Output shard size: assembly holds at most one shard (or one block, if larger) in memory."""
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def block_file_name(i: int) -> str:
    """The default per-block file name, as in the run directory: `block_007.safetensors`."""
    return f"block_{i:03d}.safetensors"


def _original_dtypes(index: SafetensorsIndex) -> dict[str, torch.dtype]:
    """Each tensor's dtype, read from the safetensors headers only."""
    out: dict[str, torch.dtype] = {}
    for file in index.files():
        with safe_open(str(index.root / file), framework="pt") as f:
            for k in f.keys():
                out[k] = _DTYPES.get(f.get_slice(k).get_dtype(), torch.float32)
    return out


def _read_block(path: Path, i: int, sk: Skeleton) -> dict[str, torch.Tensor]:
    """Block i's tensors from its own file, under their checkpoint names (exactly the block's state dict)."""
    with safe_open(str(path), framework="pt") as f:
        out = {sk.block_prefix(i) + n: f.get_tensor(n) for n in f.keys()}
    expected = {sk.block_prefix(i) + n for n in sk.state_keys[i]}
    unknown, missing = sorted(set(out) - expected), sorted(expected - set(out))
    if unknown or missing:
        raise ValueError(
            f"{path} does not match block {i} of {sk.architecture}: missing {missing[:5]}, unknown {unknown[:5]}; "
            "was it written by save_block for this model?"
        )
    return out


def _units(sk: Skeleton, paths: list[Path], index: SafetensorsIndex) -> Iterator[dict[str, torch.Tensor]]:
    """The checkpoint in units: non-block tensors first, then one block at a time.

    Original block tensors that the block does not have (old buffers transformers
    ignores on load, e.g. GPT-2's `attn.bias`) are dropped, as `load_block` drops them.
    """
    yield index.load([k for k in index.weight_map if sk.block_of(k) is None])
    for i, path in enumerate(paths):
        yield _read_block(path, i, sk)


def assemble(
    model_dir: PathLike,
    blocks_dir: PathLike,
    out_dir: PathLike,
    block_files: Sequence[PathLike] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    trust_remote_code: bool = False,
) -> Path:
    """Write an HF checkpoint to `out_dir`: original non-block tensors plus the per-block files.

    `block_files` (one per block, relative to `blocks_dir` or absolute) defaults to
    `block_000.safetensors`, ... Block tensors are cast to the original dtypes.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    sk = skeleton(model_dir, trust_remote_code)
    names = list(block_files) if block_files is not None else [block_file_name(i) for i in range(sk.num_blocks)]
    if len(names) != sk.num_blocks:
        raise ValueError(f"{sk.architecture} has {sk.num_blocks} blocks but {len(names)} block files were given")
    paths = [Path(blocks_dir) / n for n in names]
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise ValueError(f"block files missing: {absent[:3]}; prune those blocks first")
    index = SafetensorsIndex.open(model_dir)
    dtypes = _original_dtypes(index)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # `.{name}.tmp-{pid}`: the name `stages.rundir.sweep_tmp` removes if this process is killed.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = _write_shards(_units(sk, paths, index), dtypes, tmp, max_shard_bytes)
        _write_index(tmp, shards)
        for src in sorted(model_dir.iterdir()):
            if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES) and src.name != INDEX_NAME:
                shutil.copy2(src, tmp / src.name)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_shards(
    units: Iterator[dict[str, torch.Tensor]], dtypes: dict[str, torch.dtype], folder: Path, max_bytes: int
) -> list[dict[str, int]]:
    """Group units into shards of at most `max_bytes` (a unit is never split); return each shard's sizes."""
    shards: list[dict[str, int]] = []
    pending: dict[str, torch.Tensor] = {}

    def flush() -> None:
        if pending:
            save_file(pending, str(folder / f"shard-{len(shards):05d}.safetensors"), metadata={"format": "pt"})
            shards.append({k: v.numel() * v.element_size() for k, v in pending.items()})
            pending.clear()

    for unit in units:
        unit = {k: v.to(dtypes.get(k, v.dtype)).contiguous() for k, v in unit.items()}
        size = sum(v.numel() * v.element_size() for v in unit.values())
        if pending and sum(v.numel() * v.element_size() for v in pending.values()) + size > max_bytes:
            flush()
        pending.update(unit)
    flush()
    return shards


def _write_index(folder: Path, shards: list[dict[str, int]]) -> None:
    """Name the shards as transformers does and write the index when there is more than one."""
    if len(shards) == 1:
        os.replace(folder / "shard-00000.safetensors", folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for j, sizes in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(folder / f"shard-{j:05d}.safetensors", folder / name)
        weight_map.update(dict.fromkeys(sizes, name))
        total += sum(sizes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
