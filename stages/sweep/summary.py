"""What a sweep has done: which points are finished, and the sweep's record and report.

A point is finished when its run directory holds `eval/metrics.json` written for the
point's own settings (same identity, same evaluation) and, with `--export`, the export's
record: a rerun of the sweep submits only the others. After the points ran, `write_summary`
records every point's outcome in `RUN_ROOT/sweep.json` (atomic) and writes
`RUN_ROOT/report/`: `sweep.md` (every point, finished or failed with its one-line reason)
and the comparison report of the finished points (`stages.report.report.write_report`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from stages.config import PruneConfig
from stages.export.export import EXPORT_JSON
from stages.report.report import write_report
from stages.run.identity import config_hash
from stages.run.rundir import atomic_write_json, atomic_write_text
from stages.sweep.config import Point, SweepConfig

SWEEP_JSON = "sweep.json"
DONE, FAILED = "finished", "failed"


@dataclass(frozen=True)
class Outcome:
    """How one point ended in this sweep run: finished (now or before) or failed, and why."""

    name: str
    run_dir: str
    state: str
    message: str = ""
    flow_run_id: str | None = None
    skipped: bool = False
    """Finished before this sweep run, so not submitted again."""


def finished(point: Point) -> bool:
    """Whether ``point``'s run directory holds its metrics (same identity and evaluation) and asked export."""
    path = point.run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return False
    try:
        stored = PruneConfig.from_dict(json.loads(path.read_text(encoding="utf-8"))["config"])
    except (ValueError, KeyError, TypeError):
        return False  # an unreadable or older record: the point runs again (its run dir decides what is redone)
    cfg = point.cfg
    same = config_hash(stored.identity()) == config_hash(cfg.identity())
    same = same and config_hash(asdict(stored.eval)) == config_hash(asdict(cfg.eval))
    export = cfg.runtime.export
    return same and (export is None or (point.run_dir / f"export-{export}" / EXPORT_JSON).is_file())


def _ppl_cells(run_dir: Path) -> str:
    path = run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return "-"
    metrics = json.loads(path.read_text(encoding="utf-8"))
    cells = [f"{k} {v['ppl']:.2f} (dense {v['dense_ppl']:.2f})" for k, v in metrics.items() if "dense_ppl" in v]
    return "; ".join(cells) or "-"


def sweep_markdown(cfg: SweepConfig, outcomes: list[Outcome]) -> str:
    """Every point of the sweep: its state, perplexities or the reason it failed."""
    failed = sum(o.state == FAILED for o in outcomes)
    lines = [
        f"# SparseGPT sweep {cfg.run_root}",
        "",
        f"model {cfg.model}; grid {' x '.join(cfg.grid)}; {len(outcomes)} points, {failed} failed"
        + (f"; ran on work pool {cfg.pool}" if cfg.pool else ""),
        "",
        "| point | state | perplexity | note |",
        "|---|---|---|---|",
    ]
    for o in outcomes:
        note = o.message.replace("|", "/") if o.state == FAILED else ("finished before" if o.skipped else "")
        lines.append(f"| {o.name} | {o.state} | {_ppl_cells(Path(o.run_dir))} | {note} |")
    done = [o for o in outcomes if o.state == DONE]
    if len(done) > 1:
        lines += ["", "Comparison of the finished points: [comparison.md](comparison.md) ([HTML](comparison.html))."]
    return "\n".join(lines) + "\n"


def write_summary(cfg: SweepConfig, outcomes: list[Outcome]) -> Path:
    """RUN_ROOT/sweep.json and RUN_ROOT/report/ (sweep.md, the comparison of finished points); return sweep.md."""
    root = Path(cfg.run_root).expanduser().resolve()
    out = root / "report"
    done = [Path(o.run_dir) for o in outcomes if o.state == DONE]
    if len(done) > 1:
        write_report(done, out)
    atomic_write_json(root / SWEEP_JSON, {"config": cfg.to_dict(), "points": [asdict(o) for o in outcomes]})
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.md", sweep_markdown(cfg, outcomes))
    return out / "sweep.md"
