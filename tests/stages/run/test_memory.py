"""Tests for stages.run.memory.map_large_allocations: glibc serves large blocks by mmap after it.

Each case runs in a fresh interpreter (the setting is process-wide). glibc's default raises its
mmap threshold when a mapped block is freed, so a 4 MiB tensor after a freed 16 MiB one comes from
the heap; after `map_large_allocations()` it is mapped (glibc's `mallinfo2().hblkhd` counts the
bytes in mapped blocks).
"""

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
PROBE = """
import ctypes, ctypes.util, sys
import torch
from stages.run.memory import map_large_allocations

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
if sys.argv[1] == "on":
    map_large_allocations()
big = torch.empty(16 << 20, dtype=torch.uint8)
del big  # glibc's default now serves blocks up to 16 MiB from the heap
before = libc.mallinfo2().hblkhd
small = torch.ones(4 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""


def mapped_bytes(mode: str) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_blocks_are_mapped_after_the_call() -> None:
    assert mapped_bytes("off") < 4 << 20  # the default: from the heap
    assert mapped_bytes("on") >= 4 << 20  # mapped, so freeing it returns it to the system
