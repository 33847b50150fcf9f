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
"""

import ctypes
import ctypes.util
import functools
import os
from pathlib import Path


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Return free heap pages to the OS where libc has `malloc_trim`."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3
"""glibc's mallopt parameter number for the mmap threshold."""


def map_large_allocations(threshold: int = 1 << 20) -> None:
    """Serve allocations of `threshold` bytes or more by mmap (returned on free) in this process; a no-op
    without glibc or when `MALLOC_MMAP_THRESHOLD_` is set (the user's choice stands)."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        return
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, threshold)


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
