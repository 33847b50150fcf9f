"""Measure one command as a child process: wall time, memory, I/O and a folder's size on disk.

`run_measured(cmd, cwd=..., env=..., log=..., watch=run_dir)` starts `cmd`, samples its
process tree (the child and everything below it, e.g. Prefect's temporary server)
every `interval` seconds from /proc, and the size of `watch` (allocated blocks, like
`du`, walked with os.scandir) about once a second, until the child exits. Figures:
- peak RSS: the largest sampled sum of VmRSS over the tree, and the kernel's exact
  high-water mark of the largest single process (ru_maxrss of wait4, which covers the
  child and the descendants it reaped);
- I/O: /proc/PID/io of the child read while it is a zombie (after waitid WNOWAIT), which
  holds its own counts plus those of every descendant it reaped; descendants still alive
  then (orphans) add their last sample. rchar/wchar count read()/write() calls (page cache
  hits included, memory-mapped reads such as safetensors' not at all); read_bytes and
  write_bytes count what reached the block device;
- over time: every sample (time, RSS of the tree, folder size) goes to LOG.samples.csv,
  so the peaks of any stretch of a run (e.g. its first 8 blocks against all 32) can be read.
The child and its descendants get oom_score_adj 1000: when memory runs out, the kernel
kills the measured command first, not a bystander. With `cap=` (benchmarks/memcap.py) they run
in a memory cgroup of their own, and the cap's high-water mark and OOM kills are reported.
Used by bench_scale.py; Linux only.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.memcap import MemoryCap

IO_KEYS = ("rchar", "wchar", "read_bytes", "write_bytes")


@dataclass
class Measured:
    """What one measured command did."""

    cmd: list[str]
    returncode: int
    """Exit status; -N when killed by signal N."""
    wall_s: float
    peak_rss_tree: int
    """Largest sampled sum of VmRSS over the process tree, bytes."""
    peak_rss_max: int
    """Kernel high-water mark of the largest single process (ru_maxrss), bytes."""
    io: dict[str, int] = field(default_factory=dict)
    disk_peak: int = 0
    """Largest sampled size of the watched folder, bytes (0 if none)."""
    disk_end: int = 0
    cap: str | None = None
    """The memory cap the command ran under (MemoryCap.describe()), None without one."""
    cap_peak: int | None = None
    """The cap's high-water mark of usage, page cache included, bytes (None: no cap or not counted)."""
    oom_kills: int | None = None
    """Processes the OOM killer killed inside the cap (None: no cap or not counted)."""

    @property
    def failure(self) -> str | None:
        """None when the command succeeded, else 'exit N' or 'killed by SIGKILL'."""
        if self.returncode == 0:
            return None
        if self.returncode < 0:
            return f"killed by {signal.Signals(-self.returncode).name}"
        return f"exit {self.returncode}"


def dir_bytes(path: Path) -> int:
    """Allocated bytes of every file under `path` (st_blocks, like `du`: a hard-linked file counts once);
    0 if it does not exist."""
    total, stack, seen = 0, [str(path)], set()
    while stack:
        try:
            with os.scandir(stack.pop()) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(e.path)
                        else:
                            st = e.stat(follow_symlinks=False)
                            if st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
                                continue
                            seen.add((st.st_dev, st.st_ino))
                            total += st.st_blocks * 512
                    except FileNotFoundError:  # removed while walking (temporary files, pruned boundaries)
                        pass
        except (FileNotFoundError, NotADirectoryError):
            pass
    return total


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(name))
    return kids


def tree(pid: int) -> list[int]:
    """`pid` and all its live descendants."""
    kids, out = _children_map(), [pid]
    for p in out:
        out.extend(kids.get(p, []))
    return out


def rss(pid: int) -> int:
    """VmRSS of `pid` in bytes (0 when gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def io_counts(pid: int) -> dict[str, int]:
    """rchar, wchar, read_bytes, write_bytes of `pid` ({} when unreadable)."""
    try:
        with open(f"/proc/{pid}/io") as f:
            pairs = (line.split(":") for line in f)
            return {k: int(v) for k, v in pairs if k in IO_KEYS}
    except OSError:
        return {}


class _Sampler(threading.Thread):
    """Samples the tree of `pid` every `interval` s and `watch` every `du_every` s until stopped."""

    def __init__(self, pid: int, watch: Path | None, interval: float, du_every: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.watch, self.interval, self.du_every = pid, watch, interval, du_every
        self.stop = threading.Event()
        self.peak_rss = self.disk_peak = self.disk_last = 0
        self.last_io: dict[int, dict[str, int]] = {}
        self.samples: list[tuple[float, int, int]] = []
        """(unix time, RSS of the tree, run-directory bytes) at every sample: the figures over time."""

    def run(self) -> None:
        next_du = 0.0
        while not self.stop.is_set():
            pids = tree(self.pid)
            now_rss = sum(rss(p) for p in pids)
            self.peak_rss = max(self.peak_rss, now_rss)
            for p in pids[1:]:
                counts = io_counts(p)
                if counts:
                    self.last_io[p] = counts
            if self.watch is not None and time.monotonic() >= next_du:
                self.disk_last = dir_bytes(self.watch)
                self.disk_peak = max(self.disk_peak, self.disk_last)
                next_du = time.monotonic() + self.du_every
            self.samples.append((time.time(), now_rss, self.disk_last))
            self.stop.wait(self.interval)


def _first_to_die(cap: MemoryCap | None = None) -> None:
    """In the child before exec: make it the OOM killer's first choice and enter `cap` (both inherited
    by its children)."""
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write("1000")
    if cap is not None:
        cap.join()


def run_measured(
    cmd: list[str],
    cwd: Path,
    env: dict[str, str],
    log: Path,
    watch: Path | None = None,
    interval: float = 0.25,
    du_every: float = 1.0,
    cap: MemoryCap | None = None,
) -> Measured:
    """Run `cmd` (stdout and stderr to `log`) and measure it, inside `cap` when given (the caller closes
    it); never raises on the command's failure."""
    t0 = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=functools.partial(_first_to_die, cap),
        )
    sampler = _Sampler(proc.pid, watch, interval, du_every)
    sampler.start()
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # a zombie now: its io holds its reaped children's
    wall = time.perf_counter() - t0
    io = io_counts(proc.pid)
    orphans = [p for p in sampler.last_io if os.path.exists(f"/proc/{p}")]  # reparented, still running
    sampler.stop.set()
    sampler.join()
    for p in orphans:
        for k, v in sampler.last_io[p].items():
            io[k] = io.get(k, 0) + v
    with open(log.with_suffix(".samples.csv"), "w") as f:  # peaks over any stretch of the run, e.g. 8 vs 32 blocks
        f.write("unix_time,rss_tree_bytes,run_dir_bytes\n")
        f.writelines(f"{t:.2f},{r},{d}\n" for t, r, d in sampler.samples)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    disk_end = dir_bytes(watch) if watch is not None else 0
    return Measured(
        cmd=cmd,
        returncode=proc.returncode,
        wall_s=wall,
        peak_rss_tree=sampler.peak_rss,
        peak_rss_max=usage.ru_maxrss * 1024,
        io=io,
        disk_peak=max(sampler.disk_peak, disk_end),
        disk_end=disk_end,
        cap=cap.describe() if cap is not None else None,
        cap_peak=cap.peak() if cap is not None else None,
        oom_kills=cap.oom_kills() if cap is not None else None,
    )
