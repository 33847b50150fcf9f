"""A hard memory cap for one measured command: a memory cgroup of its own below this process's.

`bench_scale.py --mem-cap-gib G` runs each stage under such a cap so that "runs on a checkpoint
bigger than the machine's RAM" is a measurement on any machine: the cap is the stage's RAM. The
kernel counts the stage's anonymous memory and the page cache it fills (the memory-mapped
checkpoint, the files it writes) against the cap, reclaims the page cache when it is reached and
OOM-kills the stage when what is left cannot fit. Swap is capped to zero too, so a stage cannot
page its way under the cap.

    cap = MemoryCap.create(8 << 30)            # CapUnavailable (one line: why) without cgroups
    proc = subprocess.Popen(cmd, preexec_fn=cap.join)
    ...; cap.peak(), cap.oom_kills(); cap.close()

Works with cgroup v1 (the memory controller's hierarchy) and v2 (needs the memory controller
delegated to this process's cgroup, e.g. root or a systemd user slice with delegation).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path

V1_ROOT = Path("/sys/fs/cgroup/memory")
V2_ROOT = Path("/sys/fs/cgroup")
_SERIAL = itertools.count()


class CapUnavailable(RuntimeError):
    """No memory cgroup can be made here; the message says why."""


def _own_cgroup() -> tuple[int, Path]:
    """(version, folder) of this process's memory cgroup: the v1 memory hierarchy when mounted, else v2."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if "memory" in controllers.split(",") and V1_ROOT.is_dir():
            return 1, V1_ROOT / rel.lstrip("/")
    for line in lines:
        if line.startswith("0::") and (V2_ROOT / "cgroup.controllers").exists():
            return 2, V2_ROOT / line[3:].lstrip("/")
    raise CapUnavailable("no memory cgroup controller is mounted (/sys/fs/cgroup); run without --mem-cap-gib")


def _read_int(path: Path, key: str | None = None) -> int | None:
    """An integer file, or the value of `key` in a 'key value' file; None when absent."""
    try:
        text = path.read_text()
    except OSError:
        return None
    if key is None:
        return int(text.split()[0])
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return None


class MemoryCap:
    """A fresh cgroup with `limit` bytes of memory (and no swap); `join` moves the calling process in."""

    def __init__(self, version: int, path: Path, limit: int) -> None:
        self.version, self.path, self.limit = version, path, limit

    @classmethod
    def create(cls, limit: int) -> MemoryCap:
        if limit <= 0:
            raise ValueError(f"memory cap must be positive, got {limit} bytes")
        version, parent = _own_cgroup()
        path = parent / f"sparsegpt-cap-{os.getpid()}-{next(_SERIAL)}"
        try:
            if version == 2:
                controls = parent / "cgroup.subtree_control"
                if "memory" not in controls.read_text().split():
                    controls.write_text("+memory")
            path.mkdir()
            if version == 1:
                (path / "memory.limit_in_bytes").write_text(str(limit))
                memsw = path / "memory.memsw.limit_in_bytes"  # memory + swap: only with swap accounting on
                if memsw.exists():
                    memsw.write_text(str(limit))
            else:
                (path / "memory.max").write_text(str(limit))
                swap = path / "memory.swap.max"
                if swap.exists():
                    swap.write_text("0")
        except OSError as e:
            if path.is_dir():
                path.rmdir()
            raise CapUnavailable(
                f"cannot make a memory cgroup under {parent} ({e.strerror}); run as root or without --mem-cap-gib"
            ) from e
        return cls(version, path, limit)

    def join(self) -> None:
        """Move the calling process into the cap (use as Popen's preexec_fn: its children inherit it)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int | None:
        """The kernel's high-water mark of the cgroup's usage (page cache included), bytes; None if unknown."""
        if self.version == 1:
            return _read_int(self.path / "memory.max_usage_in_bytes")
        return _read_int(self.path / "memory.peak")  # Linux >= 5.19

    def oom_kills(self) -> int | None:
        """Processes the OOM killer killed inside the cap; None when the kernel does not count them."""
        if self.version == 1:
            return _read_int(self.path / "memory.oom_control", "oom_kill")  # Linux >= 4.13
        return _read_int(self.path / "memory.events", "oom_kill")

    def close(self) -> None:
        """Remove the cgroup; processes still in it (orphans) go back to the parent first."""
        for pid in _read_pids(self.path / "cgroup.procs"):
            try:
                (self.path.parent / "cgroup.procs").write_text(str(pid))
            except OSError:  # exited meanwhile
                pass
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass

    def describe(self) -> str:
        return f"{self.limit / (1 << 30):.2f} GiB (cgroup v{self.version}, swap 0)"


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []
