"""Tests for stages.run.rundir: atomic writes, done-records, run identity, lock, cleanup."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import stages.run.rundir as rundir
from stages.run.identity import init_run
from stages.run.rundir import (
    RunError,
    RunLock,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    prune_old,
    remove_tree,
    sha256_file,
    sweep_tmp,
    verify_record,
    write_record,
)

REPO = Path(__file__).resolve().parents[3]


def _tmp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


# ---------------------------------------------------------------- atomic writes


def test_atomic_writes_round_trip_and_leave_no_tmp(tmp_path: Path) -> None:
    atomic_write_bytes(tmp_path / "sub" / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo")
    atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1, 2]})
    assert (tmp_path / "sub" / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo"
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"a": [1, 2], "b": 1}
    assert text.index('"a"') < text.index('"b"')  # sorted keys
    assert _tmp_files(tmp_path) == []


def test_atomic_path_failure_leaves_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".out.bin.tmp-")
            tmp.write_bytes(b"half")
            raise KeyError("boom")
    assert target.read_bytes() == b"old"
    assert _tmp_files(tmp_path) == []


def test_atomic_path_requires_the_writer_to_create_the_file(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="did not create"):
        with atomic_path(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()


def test_disk_full_during_write_is_a_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "w.bin"
    with pytest.raises(RunError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    msg = str(info.value)
    assert "disk full" in msg and str(target) in msg and "resume" in msg
    assert "\n" not in msg
    assert not target.exists() and _tmp_files(tmp_path) == []


def test_disk_full_on_rename_keeps_old_file(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "r.json"
    atomic_write_json(target, {"v": 1})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "replace", full)
    with pytest.raises(RunError, match="disk full"):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert _tmp_files(tmp_path) == []


def test_a_file_is_hashed_once_per_process_until_it_is_replaced(tmp_path: Path) -> None:
    """The writer's record and every later check in the same process share one hash; a hard link is the same
    file; a file renamed into place is a new one; `forget_hashes` makes the next check read it again."""
    atomic_write_bytes(tmp_path / "a", b"x" * 3000)
    h0 = rundir.bytes_hashed()
    first = sha256_file(tmp_path / "a")
    os.link(tmp_path / "a", tmp_path / "link")
    assert sha256_file(tmp_path / "a") == sha256_file(tmp_path / "link") == first
    assert rundir.bytes_hashed() - h0 == 3000
    atomic_write_bytes(tmp_path / "a", b"y" * 3000)
    assert sha256_file(tmp_path / "a") == hashlib.sha256(b"y" * 3000).hexdigest()
    assert rundir.bytes_hashed() - h0 == 6000
    rundir.forget_hashes()
    assert sha256_file(tmp_path / "link") == first and rundir.bytes_hashed() - h0 == 9000


def test_sha256_file_streams_large_files(tmp_path: Path) -> None:
    data = os.urandom((1 << 20) * 2 + 123)
    (tmp_path / "big").write_bytes(data)
    assert sha256_file(tmp_path / "big") == hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- done-records


def _record_with_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    a = tmp_path / "blocks" / "block_000.safetensors"
    b = tmp_path / "acts" / "block_001" / "shard-00000.arrow"
    atomic_write_bytes(a, b"A" * 1000)
    atomic_write_bytes(b, b"B" * 10)
    rec = tmp_path / "blocks" / "block_000.json"
    written = write_record(rec, {"block": 0, "loss": 1.5}, [a, b])
    assert set(written["files"]) == {"block_000.safetensors", "../acts/block_001/shard-00000.arrow"}
    return rec, a, b


def test_record_verifies_and_returns_payload(tmp_path: Path) -> None:
    rec, _, _ = _record_with_files(tmp_path)
    assert verify_record(rec) == {"block": 0, "loss": 1.5}
    assert verify_record(rec, quick=True) == {"block": 0, "loss": 1.5}


def test_record_detects_changed_truncated_and_missing_files(tmp_path: Path) -> None:
    rec, a, b = _record_with_files(tmp_path)
    a.write_bytes(b"A" * 999 + b"X")  # same size, different content
    rundir.forget_hashes()  # changed in place within the clock's tick, it may keep its mtime: as a new process
    assert verify_record(rec) is None
    assert verify_record(rec, quick=True) is not None  # the documented trade-off
    a.write_bytes(b"A" * 500)
    assert verify_record(rec, quick=True) is None
    a.write_bytes(b"A" * 1000)
    rundir.forget_hashes()
    assert verify_record(rec) is not None
    b.unlink()
    assert verify_record(rec) is None


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"block": 0, "fi',
        b"\xff\xfe garbage",
        b"[1, 2]",
        b'{"files": 3}',
        b'{"files": {"x": {"bytes": "nan"}}}',
        b'{"files": {"x": 5}}',
    ],
)
def test_corrupt_record_means_not_done(tmp_path: Path, content: bytes) -> None:
    rec = tmp_path / "r.json"
    rec.write_bytes(content)
    assert verify_record(rec) is None
    assert verify_record(tmp_path / "missing.json") is None


def test_record_refuses_missing_files_and_reserved_key(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="does not exist"):
        write_record(tmp_path / "r.json", {}, [tmp_path / "nope"])
    with pytest.raises(ValueError, match="files"):
        write_record(tmp_path / "r.json", {"files": 1}, [])
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- run identity

CONFIG = {"model": "tiny", "sparsity": 0.5, "prune": {"n": 2, "m": 4}, "device": "cpu"}


def test_init_run_writes_run_json_and_resumes(tmp_path: Path) -> None:
    init_run(tmp_path, CONFIG, {"torch": "2.13"}, ignore=["device"])
    run = json.loads((tmp_path / "run.json").read_text())
    assert run["config"] == CONFIG and run["versions"] == {"torch": "2.13"}
    assert len(run["config_hash"]) == 64 and run["created"]
    before = (tmp_path / "run.json").read_bytes()
    init_run(tmp_path, dict(CONFIG), {"torch": "2.14"}, ignore=["device"])
    init_run(tmp_path, {**CONFIG, "device": "cuda:1"}, {}, ignore=["device"])
    assert (tmp_path / "run.json").read_bytes() == before


def test_init_run_refuses_a_different_config_key_by_key(tmp_path: Path) -> None:
    init_run(tmp_path, CONFIG, {}, ignore=["device"])
    other = {**CONFIG, "sparsity": 0.6, "prune": {"n": 2, "m": 8}, "seed": 1, "device": "x"}
    with pytest.raises(RunError) as info:
        init_run(tmp_path, other, {}, ignore=["device"])
    msg = str(info.value)
    assert "sparsity: 0.5 (run dir) != 0.6 (this command)" in msg
    assert "prune.m: 4 (run dir) != 8 (this command)" in msg
    assert "seed: <absent> (run dir) != 1 (this command)" in msg
    assert "device" not in msg and "model" not in msg
    assert "--run-dir" in msg and str(tmp_path) in msg


def test_init_run_reports_unreadable_run_json(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text("{trunc")
    with pytest.raises(RunError, match="unreadable"):
        init_run(tmp_path, CONFIG, {})


# ---------------------------------------------------------------- lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from stages.run.rundir import RunLock
    with RunLock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
    """
)


def _spawn_holder(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdout=subprocess.PIPE, env=env, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_held_by_another_process_then_freed_by_sigkill(tmp_path: Path) -> None:
    proc = _spawn_holder(tmp_path)
    try:
        with pytest.raises(RunError) as info:
            RunLock(tmp_path).acquire()
        msg = str(info.value)
        assert str(tmp_path) in msg and f"pid {proc.pid}" in msg and "another process" in msg
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
    assert (tmp_path / ".lock").exists()  # stale file left behind by the killed holder
    with RunLock(tmp_path) as lock:
        assert f"pid {os.getpid()}" in lock.path.read_text()


def test_lock_is_exclusive_within_a_process_and_reusable(tmp_path: Path) -> None:
    with RunLock(tmp_path):
        with pytest.raises(RunError, match="in use"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass


# ---------------------------------------------------------------- cleanup


def test_prune_old_keeps_the_last_in_natural_order(tmp_path: Path) -> None:
    for i in range(12):
        atomic_write_bytes(tmp_path / f"block_{i}" / "x", b"1")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "notes.txt").write_text("keep")
    deleted = prune_old(tmp_path, "block_*", keep_last=2)
    assert [p.name for p in deleted] == [f"block_{i}" for i in range(10)]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".hidden", "block_10", "block_11", "notes.txt"]
    last_two = [tmp_path / "block_10", tmp_path / "block_11"]
    assert prune_old(last_two, keep_last=1) == [tmp_path / "block_10"]


def test_interrupted_delete_leaves_no_folder_under_its_name(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "block_003"
    atomic_write_bytes(folder / "manifest.json", b"{}")

    def crash(path, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rundir.shutil, "rmtree", crash)
    with pytest.raises(KeyboardInterrupt):
        remove_tree(folder)
    monkeypatch.undo()
    assert not folder.exists()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".a.bin.tmp-999").write_bytes(b"x")
    removed = sweep_tmp(tmp_path)
    assert len(removed) == 2 and sorted(p.name for p in tmp_path.rglob("*")) == ["sub"]


def test_file_system_without_flock_gets_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with pytest.raises(RunError, match=r"file system of .* does not support file locks .*local disk") as exc:
        RunLock(tmp_path / "run").acquire()
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_run_dir_that_cannot_be_written_gets_one_line_naming_it(tmp_path: Path, monkeypatch, code: int) -> None:
    """A read-only file system (or missing permissions; root ignores them, so both are simulated) is the
    one-line error when the run takes its lock and when a record is written later."""
    real_open = rundir.os.open

    def read_only(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(path).startswith(str(tmp_path / "run")):
            raise OSError(code, os.strerror(code))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(rundir.os, "open", read_only)
    with pytest.raises(RunError, match=r"cannot write .*run \(.*\): use a --run-dir on a writable file system") as exc:
        RunLock(tmp_path / "run").acquire()
    assert "\n" not in str(exc.value)
    monkeypatch.undo()
    target = tmp_path / "run" / "r.json"
    atomic_write_json(target, {"v": 1})

    def refused(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(rundir.os, "replace", refused)  # e.g. remounted read-only during the run
    with pytest.raises(RunError, match=r"cannot write .*r\.json .*rerun the same command to resume"):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1} and _tmp_files(tmp_path / "run") == []


def test_a_non_empty_folder_without_run_json_is_not_taken_as_a_run(tmp_path: Path) -> None:
    """It may be the parent of other runs: a sweep of its temporary files could hit theirs."""
    parent = tmp_path / "runs"
    (parent / "other-run").mkdir(parents=True)
    with pytest.raises(RunError, match=r"not empty and holds no run\.json \(it has other-run\)"):
        init_run(parent, {"a": 1}, {})
    assert not (parent / "run.json").exists()
    (tmp_path / "empty" / ".prefect").mkdir(parents=True)  # what a flow run may leave before run.json
    init_run(tmp_path / "empty", {"a": 1}, {})
    assert (tmp_path / "empty" / "run.json").is_file()
