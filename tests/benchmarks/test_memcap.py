"""The scale harness's memory cap: a command over the cap is OOM-killed inside it, one under it is not."""

import sys
from pathlib import Path

import pytest

from benchmarks.memcap import CapUnavailable, MemoryCap
from benchmarks.scale_monitor import run_measured

MIB = 1 << 20


def touch(mib: int) -> list[str]:
    """A command that writes `mib` MiB of memory (every page touched) and exits 0."""
    return [sys.executable, "-c", f"b = b'\\x01' * ({mib} << 20); print(len(b))"]


@pytest.fixture
def cap_of():
    made: list[MemoryCap] = []

    def make(mib: int) -> MemoryCap:
        try:
            cap = MemoryCap.create(mib * MIB)
        except CapUnavailable as e:
            pytest.skip(str(e))
        made.append(cap)
        return cap

    yield make
    for cap in made:
        cap.close()
        assert not cap.path.exists()


def test_a_command_over_the_cap_is_killed_inside_it(cap_of, tmp_path: Path) -> None:
    cap = cap_of(96)
    m = run_measured(touch(256), tmp_path, {}, tmp_path / "over.log", cap=cap)
    assert m.failure == "killed by SIGKILL"
    assert m.oom_kills is None or m.oom_kills >= 1
    assert m.cap_peak is None or m.cap_peak <= 96 * MIB  # (ru_maxrss is no use here: it counts the fork before exec)


def test_a_command_under_the_cap_runs_and_its_peak_is_counted(cap_of, tmp_path: Path) -> None:
    cap = cap_of(256)
    m = run_measured(touch(64), tmp_path, {}, tmp_path / "under.log", cap=cap)
    assert m.failure is None, (tmp_path / "under.log").read_text()
    assert m.oom_kills in (None, 0)
    assert m.cap is not None and m.cap.startswith("0.25 GiB")
    assert m.cap_peak is None or 64 * MIB <= m.cap_peak <= 256 * MIB
    assert m.peak_rss_max >= 64 * MIB


def test_a_cap_must_be_positive() -> None:
    with pytest.raises(ValueError, match="must be positive"):
        MemoryCap.create(0)
