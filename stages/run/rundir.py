"""The run directory's safety layer: atomic writes, done-records, lock.

Every file a stage produces goes through `atomic_path` (or the `atomic_write_*`
helpers): it is written under a hidden temporary name in the same folder, flushed,
fsynced and renamed, so a SIGKILL at any moment leaves either the old file or the
new one, never a torn one. A unit of work (a block, a shard folder) counts as done
only when its done-record — a JSON listing each output's size and sha256, written
last by `write_record` — verifies with `verify_record` (`bytes_hashed` counts what
sha256 reads). `stages.run.identity.init_run` pins the run's configuration in
`run.json`; `RunLock` keeps two processes out of the same run directory. Every failure a
user can act on is raised as `RunError` with a one-line message.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

RUN_JSON = "run.json"
LOCK_NAME = ".lock"
TRASH_PREFIX = ".trash-"
_TMP_RE = re.compile(r"^\..+\.tmp-\d+$")
_CHUNK = 1 << 20


class RunError(RuntimeError):
    """A problem with the run directory that the user can act on (one-line message)."""


# ---------------------------------------------------------------- atomic writes


def fsync_dir(folder: Path) -> None:
    """Persist a rename or unlink in `folder` (no-op where folders can't be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Persist every file under `folder` and the folders themselves (before it is renamed into place and
    its record written: a crash after the record never finds it half on disk)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def link_or_copy(src: Path | str, dst: Path | str) -> None:
    """Hard-link `src` as `dst` (no bytes written), or copy it where the file system cannot link the two."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def disk_full(path: Path, exc: OSError) -> RunError:
    """The one-line error for ENOSPC while writing `path`."""
    return RunError(
        f"disk full while writing {path}: free space on that file system, "
        f"then rerun the same command to resume ({exc.strerror or exc})"
    )


UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
"""errnos of a folder that cannot be written: a read-only file system, missing permissions."""


def unwritable(path: Path, exc: OSError) -> RunError:
    """The one-line error for a run directory that cannot be written (read-only file system, permissions)."""
    return RunError(
        f"cannot write {path} ({exc.strerror or exc}): use a --run-dir on a writable file system, "
        "or make this one writable and rerun the same command to resume"
    )


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write; on success it is fsynced and renamed to `path`.

    The temporary file `.{name}.tmp-{pid}` sits next to `path`. If the body raises,
    the temporary file is removed and `path` is left untouched. ENOSPC (disk full) and
    a folder that cannot be written (read-only, permissions) are re-raised as `RunError`
    naming the path.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.exists():
            raise RunError(f"writer for {path} did not create its temporary file {tmp}")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, exc) from exc
        if isinstance(exc, OSError) and exc.errno in UNWRITABLE:
            raise unwritable(path, exc) from exc
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename, fsync dir)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write UTF-8 `text` to `path` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path | str, obj: Any) -> None:
    """Write `obj` as JSON (sorted keys, indented) to `path` atomically."""
    atomic_write_text(path, json.dumps(obj, sort_keys=True, indent=2, default=str) + "\n")


_HASHED = [0]
_KNOWN: dict[tuple[int, int, int, int], str] = {}
"""sha256 of the files this process has hashed, by (device, inode, size, mtime): a file is hashed once per
process, whether it wrote the file (its record) or a resumed run first reads it; a hard link (model/ shares
its block files) is the same inode. Replacing a file (every writer here renames a new one into place) or
writing to it changes the key; a file corrupted in place without a new mtime is caught by the next process."""


def sha256_file(path: Path | str) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (counted by `bytes_hashed`) unless this process hashed the
    same unchanged file before."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key in _KNOWN:
            return _KNOWN[key]
        h = hashlib.sha256()
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            _HASHED[0] += len(chunk)
    _KNOWN[key] = h.hexdigest()
    return _KNOWN[key]


def forget_hashes() -> None:
    """Drop the hashes this process remembers: the next check of every file reads it again, as a new
    process would (tests that corrupt a file in place use it)."""
    _KNOWN.clear()


def bytes_hashed() -> int:
    """Bytes `sha256_file` has hashed in this process so far (every record's checksums go through it)."""
    return _HASHED[0]


# ---------------------------------------------------------------- done-records


def write_record(path: Path | str, payload: Mapping[str, Any], files: Iterable[Path | str]) -> dict:
    """Write the done-record `path`: `payload` plus size and sha256 of each of `files`.

    Call it only after every file in `files` is complete; the record is written last
    and atomically, so its verified presence means "this unit of work is done".
    File names are stored relative to the record's folder. Returns the record.
    """
    path = Path(path)
    if "files" in payload:
        raise ValueError("write_record: payload must not have a 'files' key (it is reserved)")
    listed: dict[str, dict[str, Any]] = {}
    for f in files:
        f = Path(f)
        if not f.is_file():
            raise RunError(f"cannot record {f} in {path}: the file does not exist")
        rel = Path(os.path.relpath(f, path.parent)).as_posix()
        listed[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    record = {**payload, "files": listed}
    atomic_write_json(path, record)
    return record


def verify_record(path: Path | str, quick: bool = False) -> dict | None:
    """Return the record's payload if it and every file it lists are intact, else None.

    Never raises on corruption: a missing, truncated or garbled record or a missing,
    resized or altered file all mean "not done". `quick=True` checks sizes only:
    much faster for multi-GB files, but it misses same-size corruption (bit rot, a
    file overwritten in place), which atomic writes make unlikely but not impossible.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
            return None
        files = record["files"]
        for rel, meta in files.items():
            f = path.parent / rel
            if f.stat().st_size != int(meta["bytes"]):
                return None
            if not quick and sha256_file(f) != meta["sha256"]:
                return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return {k: v for k, v in record.items() if k != "files"}


# ---------------------------------------------------------------- lock


class RunLock:
    """Exclusive `flock` on `run_dir/.lock`, held while the context is open.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale
    lock file never blocks the next run. The file records pid, host and start time
    only to make the "in use" error helpful. Note: flock is advisory, per open file,
    inherited by forked children, and unreliable on some network file systems.
    """

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise `RunError` naming the process that holds it."""
        if self._fd is not None:
            return self
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            if exc.errno in UNWRITABLE:
                raise unwritable(self.run_dir, exc) from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise RunError(
                f"run dir {self.run_dir} is in use by another process "
                f"({holder or 'pid unknown'}); wait for it to finish or use another --run-dir"
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            raise RunError(
                f"the file system of {self.run_dir} does not support file locks (flock: {exc.strerror}); "
                "use a --run-dir on a local disk"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        since = datetime.now().isoformat(timespec="seconds")
        info = f"pid {os.getpid()} on {socket.gethostname()} since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode() + b"\n", 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock (the lock file stays; it is harmless once unlocked)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------- cleanup


def remove_tree(folder: Path | str) -> None:
    """Delete a folder so that a crash mid-delete never leaves it looking complete.

    The folder is first renamed to a hidden trash name (atomic), then removed;
    leftovers of an interrupted delete are swept by `sweep_tmp`.
    """
    folder = Path(folder)
    if not folder.exists():
        return
    trash = folder.with_name(f"{TRASH_PREFIX}{folder.name}-{os.getpid()}")
    if trash.exists():
        shutil.rmtree(trash)
    os.replace(folder, trash)
    fsync_dir(folder.parent)
    shutil.rmtree(trash)


def _natural_key(path: Path) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def prune_old(folders: Path | str | Iterable[Path | str], pattern: str = "*", keep_last: int = 2) -> list[Path]:
    """Delete all but the last `keep_last` folders; return the deleted ones.

    `folders` is either a parent folder (its subfolders matching `pattern`, hidden
    ones excluded) or an explicit list. "Last" is by natural name order, so
    `block_10` comes after `block_9`. Each folder is removed with `remove_tree`.
    """
    if keep_last < 0:
        raise ValueError(f"keep_last must be >= 0, got {keep_last}")
    if isinstance(folders, (str, Path)):
        parent = Path(folders)
        found = [p for p in parent.glob(pattern) if p.is_dir() and not p.name.startswith(".")]
    else:
        found = [Path(p) for p in folders if Path(p).is_dir()]
    found.sort(key=_natural_key)
    doomed = found[: max(len(found) - keep_last, 0)]
    for folder in doomed:
        remove_tree(folder)
    return doomed


def sweep_tmp(root: Path | str) -> list[Path]:
    """Remove temp files, temp folders and trash folders left by killed processes under `root`.

    Only safe while holding the run's `RunLock` (no other writer can be active).
    Returns what was removed.
    """
    removed: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        for d in list(dirnames):
            if d.startswith(TRASH_PREFIX) or _TMP_RE.match(d):  # trash, or a folder written under a temp name
                shutil.rmtree(Path(dirpath, d), ignore_errors=True)
                dirnames.remove(d)
                removed.append(Path(dirpath, d))
        for f in filenames:
            if _TMP_RE.match(f):
                Path(dirpath, f).unlink(missing_ok=True)
                removed.append(Path(dirpath, f))
    return removed
