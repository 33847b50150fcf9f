"""Tests for stages.run.memory's glibc malloc settings, each case in a fresh interpreter (they are
process-wide).

`map_large_allocations`: glibc's default raises its mmap threshold when a mapped block is freed, so a
4 MiB tensor after a freed 16 MiB one comes from the heap; after the call it is mapped (glibc's
`mallinfo2().hblkhd` counts the bytes in mapped blocks).
`keep_freed_memory`: after 64 MiB of 16 MiB tensors are freed, glibc keeps none of it when it trims
the heap's free top at 128 KiB (its initial threshold, fixed here: its default raises it with freed
mapped blocks, to at most 64 MiB, so whether a given top is trimmed varies), and the next ones
fault their pages in afresh; after the call the heap keeps it for reuse.
"""

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
MALLINFO = """
import ctypes, ctypes.util, sys
import torch
from stages.run.memory import keep_freed_memory, map_large_allocations

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Info
"""
PROBE = (
    MALLINFO
    + """if sys.argv[1] == "on":
    map_large_allocations()
big = torch.empty(16 << 20, dtype=torch.uint8)
del big  # glibc's default now serves blocks up to 16 MiB from the heap
before = libc.mallinfo2().hblkhd
small = torch.ones(4 << 20, dtype=torch.uint8)
print(libc.mallinfo2().hblkhd - before)
"""
)


KEPT = (
    MALLINFO
    + """libc.mallopt(-1, 128 << 10)  # glibc's initial trim threshold, fixed: every free top trimmed
if sys.argv[1] == "on":
    keep_freed_memory()
for _ in range(3):  # like a forward pass's temporaries: 64 MiB of 16 MiB tensors, then all freed
    temporaries = [torch.ones(16 << 20, dtype=torch.uint8) for _ in range(4)]
    del temporaries
print(libc.mallinfo2().fordblks)  # free bytes the heap keeps
"""
)


def probe(code: str, mode: str, **env_vars: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env.update(PYTHONPATH=str(ROOT), **env_vars)
    out = subprocess.run([sys.executable, "-c", code, mode], env=env, capture_output=True, text=True, check=True)
    return int(out.stdout.strip())


def mapped_bytes(mode: str) -> int:
    return probe(PROBE, mode)


def has_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    return bool(name) and hasattr(ctypes.CDLL(name), "mallinfo2")


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2)")
def test_large_blocks_are_mapped_after_the_call() -> None:
    assert mapped_bytes("off") < 4 << 20  # the default: from the heap
    assert mapped_bytes("on") >= 4 << 20  # mapped, so freeing it returns it to the system


@pytest.mark.skipif(not has_mallinfo2(), reason="needs glibc")
def test_freed_memory_is_kept_for_reuse_after_keep_freed_memory() -> None:
    assert probe(KEPT, "off") < 16 << 20  # returned to the system
    assert probe(KEPT, "on") >= 64 << 20  # kept
    # glibc's malloc tuned from the environment: the user's choice stands (here: glibc's default trim)
    assert probe(KEPT, "on", MALLOC_TRIM_THRESHOLD_="131072") < 16 << 20


MIB = 1 << 20


def trims_over(readings: list[int | None], monkeypatch: pytest.MonkeyPatch, **kwargs) -> list[bool]:
    """Whether a fresh GrowthTrim trims after each step, given the RssAnon read after each."""
    from stages.run import memory

    calls: list[int] = []
    it = iter(readings)
    monkeypatch.setattr(memory, "resident_anonymous", lambda: next(it))
    monkeypatch.setattr(memory, "release_memory", lambda: calls.append(1))
    trim = memory.GrowthTrim(**kwargs)
    said = [trim() for _ in readings]
    assert len(calls) == sum(said)  # it says what it did
    return said


def test_growth_trim_trims_first_then_only_past_the_slack(monkeypatch: pytest.MonkeyPatch) -> None:
    # step 0 trims (what came before the loop), step 1 is the steady state (900 MiB), slack 32 MiB:
    # 920 and 932 stay, 933 is past it and trims, the next step (890) is the new steady state
    steps = [1200, 900, 920, 932, 933, 890, 922, 923]
    said = trims_over([s * MIB for s in steps], monkeypatch, min_slack=32 * MIB, fraction=1 / 32)
    assert said == [True, False, False, False, True, False, False, True]


def test_growth_trim_slack_grows_with_the_steady_state(monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 GiB steady: the slack is 1/32 of it (128 MiB), not the 32 MiB floor
    said = trims_over([5000 * MIB, 4096 * MIB, 4200 * MIB, 4225 * MIB], monkeypatch, min_slack=32 * MIB)
    assert said == [True, False, False, True]


def test_growth_trim_trims_every_step_without_rss_anon(monkeypatch: pytest.MonkeyPatch) -> None:
    assert trims_over([None, None, None], monkeypatch) == [True, True, True]


def test_resident_anonymous_counts_touched_memory() -> None:
    from stages.run.memory import resident_anonymous

    before = resident_anonymous()
    if before is None:
        pytest.skip("no RssAnon in /proc/self/status")
    held = bytearray(b"\x01" * (64 * MIB))
    assert resident_anonymous() - before >= 60 * MIB
    del held
