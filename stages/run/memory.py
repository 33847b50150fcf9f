"""Handing freed memory back to the operating system between stages.

glibc's malloc keeps freed heap memory for reuse; after a stage that allocated a lot
of short-lived memory (tokenizing a whole corpus, a block's forward passes), the
process's resident size stays at that stage's peak although nothing uses it.
`release_memory()` calls glibc's `malloc_trim(0)` (about 15 ms), so the next stage
starts from what is really in use; elsewhere (macOS, musl) it does nothing. It does not
run `gc.collect()`: tensors are freed by reference counting, and a full collection over
the objects torch, transformers and Prefect import costs about 0.25 s a call.

`map_large_allocations()` makes glibc serve every allocation of 1 MiB or more with its own
mapping, returned to the system when freed. By default glibc raises that threshold as
large blocks are freed and then serves them from the heap, where a sequence of
short-lived buffers of changing sizes (FSDP's per-block all-gathers) piles up: measured on
SmolLM2-135M, a sharded rank's forward peaked 0.9 GiB above its live memory without it.

`keep_freed_memory()` does the opposite for the stages whose work is a loop of same-shaped
allocations (a block's forward passes, Hessians, solves): it keeps up to 1 GiB of the heap's
free top for reuse, so the next batch takes the pages the last one freed instead of faulting
fresh, zeroed ones in. glibc's default trims a free top over twice its dynamic mmap threshold
(at most 64 MiB), which every forward pass's temporaries exceed: on SmolLM2-135M one block's
forward over 32 x 512 tokens took about 90k page faults and 0.15-0.2 s of system time before,
about 300 after (10% less wall time). Allocations of 32 MiB or more are still mapped (glibc's
steady state too): a heap that served them fragments around the small allocations in between
and grows.

Between blocks, `GrowthTrim` (`release_grown_memory()` for the prune stage's blocks) returns the
freed heap only when the resident size grew past a slack over its steady state. A `malloc_trim`
after every block returned the block's working set too, and the next block faulted it all in
again; never trimming let the heap's fragments grow with depth (the sequential mode's peak by
150 MiB over SmolLM2-135M's 30 blocks). With it the sequential prune trims after 4 of 30 blocks
(end-of-block RssAnon 736-852 MiB). `bench_floor.py`, per-block trim vs this, two runs each,
block time over the floor timed in the same run: default 1.40 / 1.32x vs 1.37 / 1.21x,
sequential 1.46 / 1.52x vs 1.28 / 1.33x (the forward alone 1.38 / 1.44x vs 1.18 / 1.21x).
"""

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path


@functools.cache
def _libc(function: str):
    """libc's `function` (glibc's malloc_trim, mallopt), or None where libc has none."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), function) if name else None
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Return free heap pages to the OS where libc has `malloc_trim`."""
    trim = _libc("malloc_trim")
    if trim is not None:
        trim(0)


def resident_anonymous() -> int | None:
    """This process's anonymous resident bytes (RssAnon: the heap and mapped tensors, not mapped files),
    None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class GrowthTrim:
    """`release_memory()` after a step of a loop of like steps (a block), only when it pays.

    Trimming after every block returns the block's working set too, and the next block faults all
    of it in again (on SmolLM2-135M's sequential prune 9-12% of the wall time). Never trimming lets
    the heap's fragments grow with depth (150 MiB over 30 blocks there). This trims after the first
    call (what came before the loop goes), takes the anonymous resident size after the next one as
    the steady state, and trims again only when a later step ends more than `slack` above it (the
    larger of `min_slack` and `fraction` of the steady state), then measures the steady state anew.
    Memory stays flat in depth within the slack; where RssAnon is unknown it trims every time."""

    def __init__(self, min_slack: int = 32 << 20, fraction: float = 1 / 32) -> None:
        self.min_slack, self.fraction = min_slack, fraction
        self.base: int | None = None
        self.armed = False  # trimmed, the next step's end is the steady state

    def __call__(self) -> bool:
        """After a step: trim if due; True when it trimmed."""
        now = resident_anonymous()
        if now is None:
            release_memory()
            return True
        if self.base is None and self.armed:
            self.base = now
            return False
        if self.base is None or now > self.base + max(self.min_slack, int(self.base * self.fraction)):
            release_memory()
            self.base, self.armed = None, True
            return True
        return False


_STEPS = GrowthTrim()


def release_grown_memory() -> bool:
    """The process's `GrowthTrim` after a block of a loop (pruning, block-wise evaluation); True when it
    trimmed."""
    return _STEPS()


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter numbers for the trim and mmap thresholds."""


def _user_tuned() -> bool:
    """Whether the user set glibc's malloc from the environment (their choice then stands)."""
    return any(k.startswith("MALLOC_") and k.endswith("_") for k in os.environ) or "glibc.malloc" in os.environ.get(
        "GLIBC_TUNABLES", ""
    )


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve allocations of `threshold` bytes or more by mmap (returned on free) in this process; a no-op
    without glibc or when glibc's malloc is tuned from the environment (the user's choice stands)."""
    mallopt = _libc("mallopt")
    if mallopt is not None and not _user_tuned():
        mallopt(M_MMAP_THRESHOLD, threshold)


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 30) -> None:
    """Serve allocations below `mmap_threshold` bytes from the heap and keep up to `trim_threshold` bytes of
    its free top for reuse, in this process; a no-op without glibc or when glibc's malloc is tuned from
    the environment. Idempotent; `release_memory()` still returns everything free when called."""
    mallopt = _libc("mallopt")
    if mallopt is not None and not _user_tuned():
        mallopt(M_MMAP_THRESHOLD, mmap_threshold)
        mallopt(M_TRIM_THRESHOLD, trim_threshold)


def device_bytes(device: str) -> int | None:
    """Memory a run on `device` can use: the GPU's total, or the host's available memory (None if unknown)."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
