"""Handing freed memory back to the operating system between stages.

glibc's malloc keeps freed heap memory for reuse; after a stage that allocated a lot
of short-lived memory (tokenizing a whole corpus, a block's forward passes), the
process's resident size stays at that stage's peak although nothing uses it.
`release_memory()` runs the garbage collector and glibc's `malloc_trim(0)`, so the
next stage starts from what is really in use. Elsewhere (macOS, musl) it only collects.
"""

import ctypes
import ctypes.util
import functools
import gc


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """`gc.collect()`, then return free heap pages to the OS where libc has `malloc_trim`."""
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
