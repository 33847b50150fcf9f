"""Bad input of a sweep, refused before any point runs: the grid (`points`) and every point's own
`stages.prune.check` (model files, run directory, disk), each error naming its point in one line."""

from __future__ import annotations

from stages.prune.check import check as check_prune
from stages.run.rundir import RunError
from stages.sweep.config import Point, SweepConfig, points


def check(cfg: SweepConfig) -> list[Point]:
    """Every point of ``cfg`` checked as `sparsegpt prune` checks a run; returns the points."""
    out = points(cfg)
    for p in out:
        try:
            check_prune(p.cfg)
        except (ValueError, RunError, FileNotFoundError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise type(exc)(f"grid point {p.name}: {first}") from None
    return out
