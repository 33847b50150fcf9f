"""Tests for stages.run.shards: Arrow IPC activation shards, written atomically, read mmapped."""

import errno
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch

import stages.run.rundir as rundir
from stages.run.rundir import RunError, forget_hashes
from stages.run.shards import (
    MANIFEST,
    ShardWriter,
    is_complete,
    read_shards,
    shard_bytes,
    write_tensors,
)

pytestmark = pytest.mark.filterwarnings("error")  # e.g. torch's "non-writable array" warning

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _acts(n: int = 7, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 4, 6, generator=g) * 100).to(dtype)  # (nsamples, seqlen, hidden)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of the raw bits, so NaNs and -0.0 compare exactly."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_is_bit_exact_across_shards(tmp_path: Path, dtype: torch.dtype) -> None:
    x = _acts(dtype=dtype)
    x.view(-1)[0] = float("nan")
    x.view(-1)[1] = -0.0
    manifest = write_tensors(tmp_path, x, samples_per_shard=3)
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]  # remainder in the last shard
    assert sorted(manifest["files"]) == [f"shard-0000{i}.arrow" for i in range(3)]
    shards = read_shards(tmp_path)
    assert len(shards) == 7 and shards.dtype == dtype and shards.sample_shape == (4, 6)
    assert shards[5].shape == (4, 6) and shards[5].dtype == dtype
    assert torch.equal(_bits(torch.stack([shards[i] for i in range(7)])), _bits(x))
    assert torch.equal(_bits(shards[-1]), _bits(x[6]))
    with pytest.raises(IndexError):
        shards[7]


def test_iter_batches_spans_shards_in_order(tmp_path: Path) -> None:
    x = _acts(10)
    write_tensors(tmp_path, x, samples_per_shard=4)
    shards = read_shards(tmp_path)
    batches = list(shards.iter_batches(3, device="cpu"))
    assert [b.shape for b in batches] == [(3, 4, 6)] * 3 + [(1, 4, 6)]
    assert torch.equal(torch.cat(batches), x)
    assert torch.equal(torch.cat(list(shards.iter_batches(100))), x)
    assert torch.equal(torch.stack(list(shards)), x)


def test_schema_is_readable_with_plain_pyarrow(tmp_path: Path) -> None:
    x = _acts(5, torch.bfloat16)
    write_tensors(tmp_path, x, samples_per_shard=2)
    reader = pa.ipc.open_file(pa.memory_map(str(tmp_path / "shard-00001.arrow")))
    meta = reader.schema.metadata
    assert meta[b"dtype"] == b"bfloat16" and json.loads(meta[b"shape"]) == [4, 6]
    assert (meta[b"start"], meta[b"stop"]) == (b"2", b"4")
    assert reader.schema.field("x").type == pa.list_(pa.uint16(), 24)
    values = reader.get_batch(0).column(0).flatten().to_numpy()
    assert torch.equal(torch.from_numpy(values.copy()).view(torch.bfloat16).view(2, 4, 6), x[2:4])


def test_returned_tensors_are_writable_copy_on_write(tmp_path: Path) -> None:
    x = _acts()
    write_tensors(tmp_path, x, samples_per_shard=3)
    sample = read_shards(tmp_path)[1]
    sample.add_(1.0)  # must neither crash nor reach the file
    assert torch.equal(sample, x[1] + 1.0)
    assert is_complete(tmp_path) and torch.equal(read_shards(tmp_path)[1], x[1])


def test_writer_accepts_uneven_batches_and_copies_reused_buffers(tmp_path: Path) -> None:
    x = _acts(11)
    buffer = torch.empty(2, 4, 6)
    with ShardWriter(tmp_path, torch.float32, (4, 6), samples_per_shard=4) as writer:
        for lo in range(0, 11, 2):
            chunk = x[lo : lo + 2]
            buffer[: len(chunk)] = chunk
            writer.add(buffer[: len(chunk)])  # the caller reuses its buffer every time
        writer.add(x[:0])
    assert [s["rows"] for s in writer.close()["shards"]] == [4, 4, 3]
    assert torch.equal(torch.stack(list(read_shards(tmp_path))), x)


def test_writer_rejects_wrong_dtype_or_shape(tmp_path: Path) -> None:
    writer = ShardWriter(tmp_path, torch.float16, (4, 6), samples_per_shard=2)
    with pytest.raises(ValueError, match="does not match"):
        writer.add(_acts(2))
    with pytest.raises(ValueError, match="does not match"):
        writer.add(torch.zeros(2, 4, 5, dtype=torch.float16))
    with pytest.raises(ValueError, match="supported"):
        ShardWriter(tmp_path, torch.complex64, (4, 6), samples_per_shard=2)


def test_truncated_shard_is_incomplete_and_refused(tmp_path: Path) -> None:
    write_tensors(tmp_path, _acts(), samples_per_shard=3)
    shard = tmp_path / "shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[:-40])
    assert not is_complete(tmp_path) and not is_complete(tmp_path, quick=True)
    for verify in (True, False):
        with pytest.raises(RunError, match="incomplete or corrupt"):
            read_shards(tmp_path, verify=verify)


def test_same_size_corruption_is_caught_by_the_hash(tmp_path: Path) -> None:
    x = _acts()
    write_tensors(tmp_path, x, samples_per_shard=3)
    shard = tmp_path / "shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    forget_hashes()  # changed in place within the clock's tick, it may keep its mtime: as a new process
    assert not is_complete(tmp_path) and is_complete(tmp_path, quick=True)
    with pytest.raises(RunError):
        read_shards(tmp_path)


def test_arrow_level_damage_is_reported_even_without_hashing(tmp_path: Path) -> None:
    write_tensors(tmp_path, _acts(), samples_per_shard=3)
    shard = tmp_path / "shard-00002.arrow"
    data = bytearray(shard.read_bytes())
    data[-10:] = b"\x00" * 10  # damage the IPC footer, same size
    shard.write_bytes(bytes(data))
    with pytest.raises(RunError, match="unreadable"):
        read_shards(tmp_path, verify=False)


def test_missing_manifest_means_incomplete(tmp_path: Path) -> None:
    write_tensors(tmp_path, _acts(), samples_per_shard=3)
    (tmp_path / MANIFEST).unlink()
    assert not is_complete(tmp_path)
    with pytest.raises(RunError, match="rerun"):
        read_shards(tmp_path)
    assert not is_complete(tmp_path / "nowhere")


def test_interrupted_rewrite_leaves_folder_incomplete(tmp_path: Path) -> None:
    write_tensors(tmp_path, _acts(), samples_per_shard=3)
    assert is_complete(tmp_path)
    with pytest.raises(KeyError):
        with ShardWriter(tmp_path, torch.float32, (4, 6), samples_per_shard=3) as writer:
            writer.add(_acts(4))
            raise KeyError("killed mid-block")
    assert not is_complete(tmp_path) and not (tmp_path / MANIFEST).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.arrow"]


def test_no_tmp_files_after_success_and_sizes_reported(tmp_path: Path) -> None:
    write_tensors(tmp_path, _acts(), samples_per_shard=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [MANIFEST, "shard-00000.arrow", "shard-00001.arrow", "shard-00002.arrow"]
    assert shard_bytes(tmp_path) == sum(p.stat().st_size for p in tmp_path.iterdir())
    assert shard_bytes(tmp_path / "missing") == 0


def test_disk_full_while_writing_a_shard(tmp_path: Path, monkeypatch) -> None:
    real_replace = rundir.os.replace
    calls = []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(rundir.os, "replace", replace)
    with pytest.raises(RunError) as info:
        write_tensors(tmp_path, _acts(), samples_per_shard=3)
    assert "disk full" in str(info.value) and "shard-00001.arrow" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.arrow"]
    assert not is_complete(tmp_path)


def test_empty_and_default_sharding(tmp_path: Path) -> None:
    manifest = write_tensors(tmp_path / "empty", torch.zeros(0, 4, 6))
    assert manifest["nsamples"] == 0 and len(read_shards(tmp_path / "empty")) == 0
    manifest = write_tensors(tmp_path / "one", _acts(5))
    assert [s["rows"] for s in manifest["shards"]] == [5]
