"""Assemble a Hugging Face checkpoint from the original weights and per-block files.

The output keeps the original tensor names and dtypes: non-block tensors (embeddings,
final norm, lm_head) are copied byte for byte from the original safetensors, 8 MiB at a
time (never loaded or mapped whole: a 128k-vocabulary embedding and head are 2 GiB at
8B, more than a block), and the tensors of
block i come from its own file written by `stages.model.blocks.save_block`. A block file
that already is a shard of the output (checkpoint names and dtypes, as the prune stage
writes it) becomes one by a hard link: the output costs no disk beyond its non-block
tensors (a copy where the file system has no hard links). Other block files (block-relative
names, another dtype) are streamed: output shards hold whole blocks up to
`max_shard_bytes`; a shard's header is written first, from the input files' headers, and
its tensors are then streamed one block at a time, so one block is the most ever in
memory whatever the shard size.
Sharded output gets a `model.safetensors.index.json`; config, generation config and
tokenizer files are copied. The folder is written under a temporary name and renamed into place.
"""

import errno
import json
import math
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors import safe_open

from stages.model.blocks import Skeleton, skeleton
from stages.model.checkpoint import INDEX_NAME, SafetensorsIndex, safetensors_header
from stages.model.models import SAFETENSORS_DTYPES
from stages.run.rundir import disk_full, fsync_dir, fsync_tree, link_or_copy

PathLike = str | os.PathLike
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".msgpack", ".h5")
"""Files never copied from the original folder: weights are rewritten, pickles never carried over."""
DEFAULT_SHARD_BYTES = 256 * 1024**2
"""Output shard size (a block is never split across shards)."""
COPY_CHUNK = 8 * 1024**2
"""Bytes per read when the non-block tensors are copied as stored."""
_NAMES = {dt: name for name, dt in SAFETENSORS_DTYPES.items()}


def block_file_name(i: int) -> str:
    """The default per-block file name, as in the run directory: `block_007.safetensors`."""
    return f"block_{i:03d}.safetensors"


def original_layout(index: SafetensorsIndex) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Each original tensor's (dtype, shape), read from the safetensors headers only."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for file in index.files():
        out.update(_header(index.root / file))
    return out


@dataclass(frozen=True)
class Unit:
    """Tensors written together (the non-block tensors, or one block): output layout, then the data on demand."""

    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]]
    """Output name -> (dtype written, shape), in writing order; read from safetensors headers only."""
    load: Callable[[], dict[str, torch.Tensor]]
    shard: Path | None = None
    """A file that is this unit's output shard as it is (linked, not rewritten)."""
    ranges: dict[str, tuple[Path, int, int]] | None = None
    """Output name -> (file, start, end): the tensor's bytes as stored, copied in chunks instead of `load`
    (the non-block tensors keep their dtypes, so a 128k-vocabulary embedding is never mapped whole)."""

    @property
    def nbytes(self) -> int:
        return sum(math.prod(shape) * dt.itemsize for dt, shape in self.layout.values())


def _header(path: Path) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """(dtype, shape) of every tensor in one safetensors file, from its header."""
    with safe_open(str(path), framework="pt") as f:
        out = {}
        for n in f.keys():
            sl = f.get_slice(n)
            out[n] = (SAFETENSORS_DTYPES.get(sl.get_dtype(), torch.float32), tuple(sl.get_shape()))
    return out


def _byte_ranges(index: SafetensorsIndex, names: list[str]) -> dict[str, tuple[Path, int, int]]:
    """Where each of `names` lies in its safetensors file: (file, first byte, end), from the headers."""
    out: dict[str, tuple[Path, int, int]] = {}
    for file in sorted({index.weight_map[n] for n in names}):
        path = index.root / file
        with open(path, "rb") as f:
            data_start = 8 + struct.unpack("<Q", f.read(8))[0]
        header = safetensors_header(path)
        for n in names:
            if index.weight_map[n] == file:
                a, b = header[n]["data_offsets"]
                out[n] = (path, data_start + int(a), data_start + int(b))
    return out


def _copy_bytes(src: Path, start: int, end: int, dst: BinaryIO, chunk: int = COPY_CHUNK) -> None:
    """Append bytes [start, end) of `src` to `dst` through one reused buffer of `chunk` bytes."""
    buf = memoryview(bytearray(min(chunk, max(end - start, 1))))
    with open(src, "rb", buffering=0) as f:
        f.seek(start)
        left = end - start
        while left:
            n = f.readinto(buf[: min(left, len(buf))])
            if not n:
                raise ValueError(f"{src} ends before byte {end}: the file is truncated; restore the checkpoint")
            dst.write(buf[:n])
            left -= n


def _block_unit(path: Path, i: int, sk: Skeleton, dtypes: dict[str, torch.dtype]) -> Unit:
    """Block i from its own file, under its checkpoint names (exactly the block's state dict); the file in
    checkpoint names may hold them prefixed already."""
    prefix = sk.block_prefix(i)
    found = _header(path)
    full = {n if n.startswith(prefix) else prefix + n: n for n in found}  # output name -> name in the file
    expected = {prefix + n for n in sk.state_keys[i]}
    unknown, missing = sorted(full.keys() - expected), sorted(expected - full.keys())
    if unknown or missing:
        raise ValueError(
            f"{path} does not match block {i} of {sk.architecture}: missing {missing[:5]}, unknown {unknown[:5]}; "
            "was it written by save_block for this model?"
        )

    def load() -> dict[str, torch.Tensor]:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(stored) for name, stored in full.items()}

    layout = {name: (dtypes.get(name, found[stored][0]), found[stored][1]) for name, stored in full.items()}
    as_is = all(name == stored and layout[name][0] == found[stored][0] for name, stored in full.items())
    return Unit(layout, load, path if as_is else None)


def _units(
    sk: Skeleton, paths: list[Path], index: SafetensorsIndex, original: dict[str, tuple[torch.dtype, tuple[int, ...]]]
) -> list[Unit]:
    """The checkpoint in units: non-block tensors first, then one block at a time.

    Original block tensors that the block does not have (old buffers transformers
    ignores on load, e.g. GPT-2's `attn.bias`) are dropped, as `load_block` drops them.
    Block tensors are written in their original dtypes (`original`, from the headers).
    Every file's header is checked here, before anything is written.
    """
    rest = [k for k in index.weight_map if sk.block_of(k) is None]
    dtypes = {k: dt for k, (dt, _) in original.items()}
    units = [Unit({k: original[k] for k in rest}, lambda: index.load(rest), ranges=_byte_ranges(index, rest))]
    return units + [_block_unit(path, i, sk, dtypes) for i, path in enumerate(paths)]


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
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # `.{name}.tmp-{pid}`: the name `stages.run.rundir.sweep_tmp` removes if this process is killed.
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        shards = write_shards(_units(sk, paths, index, original_layout(index)), tmp, max_shard_bytes)
        write_index(tmp, shards)
        for src in sorted(model_dir.iterdir()):
            if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES) and src.name != INDEX_NAME:
                shutil.copy2(src, tmp / src.name)
        fsync_tree(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise disk_full(out_dir, exc) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def write_shards(units: list[Unit], folder: Path, max_bytes: int) -> list[dict[str, int]]:
    """Group units into shards of at most `max_bytes` (a unit is never split; one that is a shard as it is
    stays alone and is linked); return each shard's sizes."""
    groups: list[list[Unit]] = []
    for unit in units:
        last = groups[-1] if groups else None
        streamed = last is not None and unit.shard is None and last[0].shard is None
        if streamed and sum(u.nbytes for u in last) + unit.nbytes <= max_bytes:
            last.append(unit)
        else:
            groups.append([unit])
    shards = []
    for j, group in enumerate(groups):
        if group[0].shard is not None:
            link_or_copy(group[0].shard, folder / f"shard-{j:05d}.safetensors")
        else:
            _stream_safetensors(folder / f"shard-{j:05d}.safetensors", group)
        shards.append({k: math.prod(shape) * dt.itemsize for u in group for k, (dt, shape) in u.layout.items()})
    return shards


def _stream_safetensors(path: Path, units: list[Unit]) -> None:
    """Write one safetensors file unit by unit: the header first (it needs only dtypes and
    shapes), then each unit's bytes, so only one unit's tensors are ever in memory."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for unit in units:
        for name, (dt, shape) in unit.layout.items():
            size = math.prod(shape) * dt.itemsize
            header[name] = {"dtype": _NAMES[dt], "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for unit in units:
            if unit.ranges is not None:
                for name, (dt, shape) in unit.layout.items():
                    src, start, end = unit.ranges[name]
                    if end - start != math.prod(shape) * dt.itemsize:
                        raise ValueError(f"{name}: {src} holds {end - start} bytes, its header said shape {shape}")
                    _copy_bytes(src, start, end, f)
                continue
            tensors = unit.load()
            for name, (dt, shape) in unit.layout.items():
                t = tensors.pop(name).to("cpu", dt).contiguous()
                if tuple(t.shape) != shape:
                    raise ValueError(f"{name}: the file holds shape {tuple(t.shape)}, its header said {shape}")
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del tensors, t


def write_index(folder: Path, shards: list[dict[str, int]]) -> None:
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
