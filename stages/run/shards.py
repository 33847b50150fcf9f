"""Activation shards: one block boundary's activations as Arrow IPC files.

A folder `acts/block_XXX/` holds `shard-YYYYY.arrow` files plus `manifest.json`.
Each shard is an Arrow IPC *file* with one record batch and one non-null column
`x`: a fixed-size list (size = product of the sample shape) of a primitive type,
one row per sample. Schema metadata records the torch `dtype` name, the `shape`
of one sample and the sample range `start`/`stop`. bfloat16 has no Arrow type,
so its raw bits are stored as uint16 (metadata says `bfloat16`).

`ShardWriter` writes each shard atomically and `manifest.json` (a done-record with
every shard's size and sha256) last; a folder is complete only if its manifest
verifies. `read_shards` memory-maps the shards copy-on-write and hands out
zero-copy torch views: reading costs no RAM beyond the page cache, and in-place
writes to a returned tensor land in private memory, never in the file.
"""

import bisect
import json
import math
import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stages.run.rundir import RunError, atomic_path, verify_record, write_record
from stages.run.transfer import HostSink, device_batches

MANIFEST = "manifest.json"
FORMAT = "sparsegpt-acts/1"
SHARD_TARGET_BYTES = 256 << 20
"""Default shard size for `write_tensors` when `samples_per_shard` is not given."""

# torch dtype -> (Arrow storage type, numpy dtype used to view the stored bits)
_STORAGE: dict[torch.dtype, tuple[pa.DataType, type]] = {
    torch.float32: (pa.float32(), np.float32),
    torch.float16: (pa.float16(), np.float16),
    torch.bfloat16: (pa.uint16(), np.int16),  # raw bits; read as int16 for older torch
    torch.float64: (pa.float64(), np.float64),
    torch.int64: (pa.int64(), np.int64),
    torch.int32: (pa.int32(), np.int32),
    torch.int16: (pa.int16(), np.int16),
    torch.int8: (pa.int8(), np.int8),
    torch.uint8: (pa.uint8(), np.uint8),
}


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _STORAGE:
        allowed = ", ".join(sorted(_dtype_name(d) for d in _STORAGE))
        raise ValueError(f"cannot store activations of dtype {dtype}; supported: {allowed}")
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if dtype not in _STORAGE:
        raise RunError(f"unknown activation dtype {name!r} in shard metadata")
    return dtype


def _to_numpy_bits(t: torch.Tensor) -> np.ndarray:
    """Flat numpy array with the tensor's bits, in its Arrow storage type (no copy)."""
    flat = t.contiguous().reshape(-1)
    if t.dtype == torch.bfloat16:
        return flat.view(torch.int16).numpy().view(np.uint16)
    return flat.numpy()


def shard_name(index: int) -> str:
    """File name of the `index`-th shard."""
    return f"shard-{index:05d}.arrow"


class ShardWriter:
    """Write a stream of sample batches into `folder` as Arrow shards.

    Opening a writer discards what `folder` held (manifest first, so an interrupted
    rewrite is never mistaken for a complete folder). Use as a context manager:
    a clean exit calls `close()`; an exception leaves the folder incomplete.

    Several writers may fill one folder, each a range of samples (data-parallel ranks): each
    starts at ``first_sample`` (a multiple of ``samples_per_shard``, so its shards get the
    names and contents one writer would give them), none discards (``discard=False``; the
    folder is emptied once before), each ends with `close(manifest=False)`, and one writes
    the manifest over all their shards (`write_manifest`).
    """

    def __init__(
        self,
        folder: Path | str,
        dtype: torch.dtype,
        sample_shape: tuple[int, ...],
        samples_per_shard: int,
        first_sample: int = 0,
        discard: bool = True,
    ) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.dtype_name = _dtype_name(dtype)
        self.sample_shape = tuple(int(s) for s in sample_shape)
        if samples_per_shard < 1 or any(s < 1 for s in self.sample_shape):
            raise ValueError(
                f"need samples_per_shard >= 1 and a positive sample shape, got "
                f"{samples_per_shard} and {self.sample_shape}"
            )
        self.samples_per_shard = samples_per_shard
        if first_sample % samples_per_shard:
            raise ValueError(f"first_sample {first_sample} is not a multiple of samples_per_shard {samples_per_shard}")
        self._first = first_sample
        self._host = HostSink(self._add_host)
        self._pending: list[torch.Tensor] = []
        self._pending_rows = 0
        self._written = 0
        self._shards: list[dict] = []
        self._manifest: dict | None = None
        if discard:
            _discard(self.folder)

    def add(self, batch: torch.Tensor) -> None:
        """Append a batch of samples, shape (b, *sample_shape), of the writer's dtype."""
        if self._manifest is not None:
            raise RuntimeError(f"ShardWriter for {self.folder} is already closed")
        if batch.dtype != self.dtype or tuple(batch.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"batch of {tuple(batch.shape)} {batch.dtype} does not match the writer's "
                f"(b, {', '.join(map(str, self.sample_shape))}) {self.dtype}"
            )
        if batch.shape[0] == 0:
            return
        self._host(batch)

    def _add_host(self, batch: torch.Tensor) -> None:
        """`add`'s batch on the host: the caller's CPU tensor, or a device batch's copy once it has finished."""
        self._pending.append(batch)
        self._pending_rows += batch.shape[0]
        while self._pending_rows >= self.samples_per_shard:
            self._flush(self.samples_per_shard)
        # Rows kept for the next shard must not alias the caller's tensor, which the
        # caller may reuse as a buffer before the shard is written.
        last = self._pending[-1] if self._pending else None
        if last is not None and _same_storage(last, batch):
            self._pending[-1] = last.clone()

    def _flush(self, rows: int) -> None:
        pending = self._pending[0] if len(self._pending) == 1 else torch.cat(self._pending)
        self._write_shard(pending[:rows])
        rest = pending[rows:]
        self._pending = [rest] if rest.shape[0] else []
        self._pending_rows = rest.shape[0]

    def _write_shard(self, rows: torch.Tensor) -> None:
        n, start = rows.shape[0], self._first + self._written
        storage, _ = _STORAGE[self.dtype]
        values = pa.array(_to_numpy_bits(rows), type=storage)
        column = pa.FixedSizeListArray.from_arrays(values, math.prod(self.sample_shape))
        metadata = {
            "format": FORMAT,
            "dtype": self.dtype_name,
            "shape": json.dumps(list(self.sample_shape)),
            "start": str(start),
            "stop": str(start + n),
        }
        schema = pa.schema([pa.field("x", column.type, nullable=False)], metadata=metadata)
        name = shard_name(self._first // self.samples_per_shard + len(self._shards))
        with atomic_path(self.folder / name) as tmp:
            with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                writer.write_batch(pa.record_batch([column], schema=schema))
        self._shards.append({"name": name, "rows": n, "start": start})
        self._written += n

    def close(self, manifest: bool = True) -> dict:
        """Write the remainder and then `manifest.json`; return the manifest. With ``manifest=False``
        (one of several writers) write no manifest and return ``{"shards": [...]}`` for `write_manifest`."""
        if self._manifest is not None:
            return self._manifest
        self._host.flush()
        if self._pending_rows:
            self._flush(self._pending_rows)
        if not manifest:
            self._manifest = {"shards": list(self._shards)}
            return self._manifest
        self._manifest = write_manifest(
            self.folder, self.dtype, self.sample_shape, self.samples_per_shard, self._shards
        )
        return self._manifest

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type: type | None, *rest: object) -> None:
        if exc_type is None:
            self.close()


def write_manifest(
    folder: Path, dtype: torch.dtype, sample_shape: tuple[int, ...], samples_per_shard: int, shards: list[dict]
) -> dict:
    """The manifest of a folder whose shards (``{"name", "rows", "start"}``, any order) cover samples 0..n
    without a gap; written last, with every shard's size and checksum. Returns it."""
    shards = sorted(shards, key=lambda s: s["start"])
    expected = 0
    for s in shards:
        if s["start"] != expected:
            raise RunError(f"shards of {folder} leave samples {expected}..{s['start']} out")
        expected += s["rows"]
    payload = {
        "format": FORMAT,
        "dtype": _dtype_name(dtype),
        "sample_shape": list(sample_shape),
        "samples_per_shard": samples_per_shard,
        "nsamples": expected,
        "shards": shards,
    }
    folder.mkdir(parents=True, exist_ok=True)
    return write_record(folder / MANIFEST, payload, [folder / s["name"] for s in shards])


def discard(folder: Path | str) -> None:
    """Make ``folder`` an empty, incomplete shard folder (before several writers fill it)."""
    _discard(Path(folder))


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _discard(folder: Path) -> None:
    """Make `folder` an empty, incomplete shard folder (manifest removed first)."""
    if not folder.exists():
        return
    (folder / MANIFEST).unlink(missing_ok=True)
    for f in folder.iterdir():
        if f.is_file() and (f.name.startswith("shard-") or ".tmp-" in f.name):
            f.unlink()


def write_tensors(folder: Path | str, tensor: torch.Tensor, samples_per_shard: int | None = None) -> dict:
    """Write a whole (nsamples, *sample_shape) tensor as shards; return the manifest.

    Without `samples_per_shard`, shards hold about `SHARD_TARGET_BYTES` each.
    """
    sample_shape = tuple(tensor.shape[1:])
    if samples_per_shard is None:
        per_sample = math.prod(sample_shape) * tensor.element_size()
        samples_per_shard = max(1, SHARD_TARGET_BYTES // max(per_sample, 1))
    with ShardWriter(folder, tensor.dtype, sample_shape, samples_per_shard) as writer:
        writer.add(tensor)
    return writer.close()


def is_complete(folder: Path | str, quick: bool = False) -> bool:
    """True if `folder`'s manifest verifies (sizes only with `quick`, else sha256)."""
    return verify_record(Path(folder) / MANIFEST, quick=quick) is not None


def shard_bytes(folder: Path | str) -> int:
    """Bytes used by the files directly in `folder` (0 if it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


class ShardSet:
    """Read-only-on-disk view of a complete shard folder (see `read_shards`).

    Tensors it returns are zero-copy views of copy-on-write memory maps: they cost no
    RAM until written to, and writing to them never changes the files.
    """

    def __init__(self, folder: Path, manifest: dict, shards: list[torch.Tensor]) -> None:
        self.folder = folder
        self.manifest = manifest
        self.dtype = _dtype_from_name(manifest["dtype"])
        self.sample_shape = tuple(manifest["sample_shape"])
        self._shards = shards
        self._starts = [int(s["start"]) for s in manifest["shards"]]
        self._n = int(manifest["nsamples"])

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> torch.Tensor:
        """Sample `i`, shape `sample_shape` (e.g. (seqlen, hidden))."""
        if not -self._n <= i < self._n:
            raise IndexError(f"sample {i} out of range for {self._n} samples in {self.folder}")
        i %= self._n
        k = bisect.bisect_right(self._starts, i) - 1
        return self._shards[k][i - self._starts[k]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for shard in self._shards:
            yield from shard

    def iter_batches(
        self, batch_size: int, device: torch.device | str | None = None, stop: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield (b, *sample_shape) batches in order, of the first `stop` samples (all by default); the
        last one may be smaller.

        A batch inside one shard is a zero-copy view; one spanning shards is a copy.
        With a `device`, each batch is copied there (`device_batches`: on CUDA from pinned
        memory, one batch ahead).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = self._n if stop is None else min(stop, self._n)
        batches = (self._rows(lo, min(lo + batch_size, n)) for lo in range(0, n, batch_size))
        return device_batches(batches, device)

    def _rows(self, lo: int, hi: int) -> torch.Tensor:
        pieces = []
        for start, shard in zip(self._starts, self._shards, strict=True):
            a, b = max(lo, start), min(hi, start + shard.shape[0])
            if a < b:
                pieces.append(shard[a - start : b - start])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def read_shards(folder: Path | str, verify: bool = True) -> ShardSet:
    """Open a complete shard folder, or raise `RunError` if it is incomplete or corrupt.

    `verify=True` checks every shard's sha256 against the manifest (reads the files
    once); `verify=False` checks sizes only and relies on Arrow's own validation.
    """
    folder = Path(folder)
    manifest = verify_record(folder / MANIFEST, quick=not verify)
    if manifest is None or manifest.get("format") != FORMAT:
        raise RunError(
            f"activation shards in {folder} are incomplete or corrupt (manifest missing or "
            "not matching the files); rerun the stage that writes them to redo this folder"
        )
    dtype = _dtype_from_name(manifest["dtype"])
    shape = tuple(manifest["sample_shape"])
    shards = [_open_shard(folder / s["name"], dtype, shape, int(s["rows"])) for s in manifest["shards"]]
    return ShardSet(folder, manifest, shards)


def _open_shard(path: Path, dtype: torch.dtype, shape: tuple[int, ...], rows: int) -> torch.Tensor:
    """Memory-map one shard copy-on-write and return a (rows, *shape) tensor view."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        base = pa.py_buffer(mm)
        reader = pa.ipc.open_file(pa.BufferReader(base))
        meta = {k.decode(): v.decode() for k, v in (reader.schema.metadata or {}).items()}
        storage, np_dtype = _STORAGE[dtype]
        expected = pa.list_(storage, math.prod(shape))
        if (
            reader.num_record_batches != 1
            or meta.get("dtype") != _dtype_name(dtype)
            or tuple(json.loads(meta.get("shape", "null")) or ()) != shape
            or reader.schema.types != [expected]
        ):
            raise ValueError("schema or metadata does not match the manifest")
        column = reader.get_batch(0).column(0)
        if len(column) != rows or column.null_count or column.values.null_count:
            raise ValueError(f"expected {rows} non-null rows, found {len(column)}")
        values = column.flatten().buffers()[1]
        offset = values.address - base.address
        count = rows * math.prod(shape)
        if offset < 0 or offset + count * np.dtype(np_dtype).itemsize > len(mm):
            raise ValueError("values buffer lies outside the file")
        array = np.frombuffer(mm, dtype=np_dtype, count=count, offset=offset)
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise RunError(
            f"activation shard {path} is unreadable ({exc}); delete its folder and rerun the stage that writes it"
        ) from exc
    tensor = torch.from_numpy(array).view(rows, *shape)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor
