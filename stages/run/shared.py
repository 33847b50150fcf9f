"""Entries shared across run directories (caches under `$SPARSEGPT_CACHE`), and the lock each is built under.

Several processes (a sweep's workers, on one machine or on shared storage) may need the same
entry at once: `entry_lock(path)` holds an exclusive `flock` on `path.lock` while an entry is
read, computed and written, so one computes it and the others wait and then read it. Writes
under the lock are atomic as everywhere else (`stages.run.rundir`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger("sparsegpt.cache")
_warned: set[Path] = set()


@contextlib.contextmanager
def entry_lock(path: Path | None) -> Iterator[None]:
    """Hold an exclusive lock on the shared entry ``path`` (None: no entry, no lock) while it is read,
    computed and written. A process that waits here then finds the entry written by the one that held it.
    A cache that cannot be written, or a file system without locks, is warned about once and not locked."""
    if path is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        warn_once(path.parent, f"cannot lock the cache {path.parent} ({exc.strerror})")
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warn_once(path.parent, f"the file system of {path.parent} has no file locks; entries are not locked")
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def warn_once(folder: Path, message: str) -> None:
    if folder not in _warned:
        _warned.add(folder)
        log.warning("%s; two processes may compute the same entry", message)
