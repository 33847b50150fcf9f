"""Handing freed memory back to the operating system between stages.

glibc's malloc keeps freed heap memory for reuse; after a stage that allocated a lot
of short-lived memory (tokenizing a whole corpus, a block's forward passes), the
process's resident size stays at that stage's peak although nothing uses it.
`release_memory()` calls glibc's `malloc_trim(0)` (about 15 ms), so the next stage
starts from what is really in use; elsewhere (macOS, musl) it does nothing. It does not
run `gc.collect()`: tensors are freed by reference counting, and a full collection over
the objects torch, transformers and Prefect import costs about 0.25 s a call.
"""

import ctypes
import ctypes.util
import functools
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
