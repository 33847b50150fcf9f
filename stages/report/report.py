"""`sparsegpt report`: what a pruned run did, layer by layer, as Markdown, HTML and PNGs.

`load_run(run_dir)` reads a run directory without touching the model: the verified
block records (`blocks/block_XXX.json`: per linear layer the achieved sparsity, target,
OBS loss, relative output error, dampening, shape and seconds; per block its seconds),
`owl.json` when OWL allocated the sparsities, `eval/metrics.json` (perplexities, task
scores) and, for a progressive run, `summary.json` (perplexity before and after each
round's fine-tuning). `write_report([run_dir])` writes into `RUN_DIR/eval/`:
`report.md` (linking the PNGs beside it), `report.html` (self-contained, PNGs embedded
as base64) and the pictures: per-layer sparsity and error heatmaps (block x linear),
seconds per block, the OWL allocation, perplexity vs sparsity and the round-by-round
curve. Given several runs it also writes `comparison.{md,html}` and
`comparison-ppl-vs-sparsity.png` (one series per method/pattern, dense as a horizontal
line) into `out` (default: the first run's `eval/`). No Prefect here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.report import plots
from stages.report.pictures import layer_grid, ppl_points, run_pictures  # noqa: F401 (layer_grid re-exported)
from stages.report.render import Part, write_parts
from stages.run.rundir import RUN_JSON, verify_record


@dataclass(frozen=True)
class RunData:
    """Everything a report shows about one run directory."""

    root: Path
    config: dict[str, Any]
    """The run's options by flat name (eval/metrics.json's, else run.json's)."""
    blocks: list[dict] = field(default_factory=list)
    """Verified block records, by block index."""
    owl: dict | None = None
    """{"ratios", "sparsities"} per block when OWL was used."""
    metrics: dict | None = None
    """eval/metrics.json."""
    summary: dict | None = None
    """summary.json of a progressive run: {"dense": {label: {ppl, ...}}, "rounds": [...]}."""

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def series(self) -> str:
        """Method and pattern, e.g. ``sparsegpt 2:4``, ``wanda unstructured +owl``: points of one series."""
        if self.summary is not None:
            return "progressive"
        cfg = self.config
        name = f"{cfg.get('method', '?')} {cfg.get('nm') or 'unstructured'}"
        if cfg.get("owl"):
            name += " +owl"
        if cfg.get("wbits", 16) != 16:
            name += f" {cfg['wbits']}-bit"
        return name

    @property
    def sparsity(self) -> float | None:
        """Achieved sparsity of the pruned layers (metrics.json, else from the block records)."""
        if self.metrics and "sparsity" in self.metrics:
            return self.metrics["sparsity"]["overall"]
        zeros = total = 0.0
        for rec in self.blocks:
            for st in rec["layers"].values():
                n = st["shape"][0] * st["shape"][1]
                zeros, total = zeros + st["sparsity"] * n, total + n
        return zeros / total if total else None

    def perplexities(self) -> dict[str, dict]:
        """{label: {ppl, dense_ppl, windows, seqlen}} from metrics.json."""
        return {k: v for k, v in (self.metrics or {}).items() if isinstance(v, dict) and "ppl" in v}

    def final(self) -> tuple[float | None, dict[str, dict]]:
        """(sparsity, perplexities) where the run ended: metrics.json, else a progressive run's last round."""
        rounds = (self.summary or {}).get("rounds") or []
        if self.metrics is not None or not rounds:
            return self.sparsity, self.perplexities()
        last, dense = rounds[-1], self.summary.get("dense") or {}
        return last.get("sparsity", last["target"]), {
            label: {"ppl": ppl, "dense_ppl": dense[label]["ppl"]}
            for label, ppl in (last.get("ppl_after") or {}).items()
            if label in dense
        }


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def load_run(run_dir: str | Path) -> RunData:
    """Read a run directory; ValueError if it is none or has nothing finished to report.

    A progressive run is recognised by its `summary.json` (a "rounds" list); its
    `run.json` holds the progressive config, and `progressive.json` may stand in for it.
    """
    root = Path(run_dir)
    summary = _read_json(root / "summary.json")
    if summary is not None and not isinstance(summary.get("rounds"), list):
        summary = None
    if not (root / RUN_JSON).is_file() and not (root / "progressive.json").is_file():
        raise ValueError(
            f"{root} is not a run directory (no {RUN_JSON}); pass the --run-dir of a `sparsegpt prune` run"
        )
    blocks = [r for p in sorted((root / "blocks").glob("block_*.json")) if (r := verify_record(p, quick=True))]
    metrics = _read_json(root / "eval" / "metrics.json")
    if not blocks and metrics is None and not (summary and summary["rounds"]):
        raise ValueError(
            f"{root} has no finished blocks and no eval/metrics.json yet; rerun its `sparsegpt prune` "
            "command to finish the run, then report"
        )
    run_json = _read_json(root / RUN_JSON) or {}  # options by flat name; runs before them stored a flat config
    config = (metrics or {}).get("config") or run_json.get("options") or run_json.get("config") or {}
    return RunData(
        root,
        config,
        sorted(blocks, key=lambda r: r["block"]),
        verify_record(root / "owl.json", quick=True),
        metrics,
        summary,
    )


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _summary_part(run: RunData) -> list[Part]:
    cfg = run.config
    rows = [
        ["run directory", str(run.root)],
        ["model", str(cfg.get("model", "?"))],
        ["method / pattern", run.series],
        [
            "target sparsity",
            str(
                cfg.get("nm") or cfg.get("sparsity") or ", ".join(map(str, (run.summary or {}).get("schedule", ["?"])))
            ),
        ],
        ["calibration", f"{cfg.get('calib', '?')}, {cfg.get('nsamples', '?')} x {cfg.get('seqlen', '?')} tokens"],
        ["blocks pruned", str(len(run.blocks))],
        ["achieved sparsity", _f(run.sparsity)],
    ]
    if run.blocks:
        rows.append(["pruning time", f"{sum(r['seconds'] for r in run.blocks):.1f} s"])
    return [("h1", f"SparseGPT report: {run.name}"), ("table", ["setting", "value"], rows)]


def _eval_parts(run: RunData) -> list[Part]:
    parts: list[Part] = []
    ppl = run.perplexities()
    if ppl:
        rows = [
            [
                label,
                f"{m['windows']} x {m['seqlen']}",
                _f(m["dense_ppl"], 2),
                _f(m["ppl"], 2),
                f"{m['ppl'] / m['dense_ppl']:.3f}",
            ]
            for label, m in ppl.items()
        ]
        parts += [
            ("h2", "Perplexity"),
            ("table", ["dataset", "windows x seqlen", "dense", "pruned", "pruned / dense"], rows),
        ]
    tasks = (run.metrics or {}).get("tasks") or {}
    if tasks:
        rows = []
        for name, m in tasks.items():
            for metric in ("acc", "acc_norm", "ppl"):
                if metric in m["pruned"]:
                    d, p = m["dense"][metric], m["pruned"][metric]
                    rows.append([name, str(m["pruned"]["n"]), metric, _f(d), _f(p), f"{p - d:+.4f}"])
        parts += [("h2", "Zero-shot tasks"), ("table", ["task", "items", "metric", "dense", "pruned", "change"], rows)]
    if not ppl and not tasks and not run.summary:
        parts += [("h2", "Evaluation"), ("p", "not evaluated yet (no eval/metrics.json)")]
    return parts


def _rounds_part(run: RunData) -> list[Part]:
    rounds = (run.summary or {}).get("rounds") or []
    if not rounds:
        return []
    labels = sorted({k for r in rounds for k in (*r.get("ppl_before", {}), *r.get("ppl_after", {}))})
    headers = ["round", "target", "sparsity", *[f"{lab} before / after FT" for lab in labels], "tokens", "seconds"]
    rows = [
        [
            str(r["round"]),
            _f(r["target"], 3),
            _f(r.get("sparsity"), 4),
            *[
                f"{_f(r.get('ppl_before', {}).get(lab), 2)} / {_f(r.get('ppl_after', {}).get(lab), 2)}"
                for lab in labels
            ],
            str(r.get("tokens", "-")),
            _f(r.get("seconds"), 1),
        ]
        for r in rounds
    ]
    dense = {lab: v["ppl"] for lab, v in (run.summary.get("dense") or {}).items()}
    text = "dense: " + ", ".join(f"{lab} {p:.2f}" for lab, p in dense.items()) if dense else ""
    return [
        ("h2", "Progressive rounds"),
        ("p", text),
        ("table", headers, rows),
        ("img", "rounds.png", "perplexity by round"),
    ]


def _layer_parts(run: RunData) -> list[Part]:
    if not run.blocks:
        return []
    parts: list[Part] = []
    if run.owl:
        rows = [
            [str(i), _f(r), _f(s)]
            for i, (r, s) in enumerate(zip(run.owl["ratios"], run.owl["sparsities"], strict=True))
        ]
        parts += [
            ("h2", "OWL allocation"),
            ("table", ["block", "outlier ratio", "sparsity"], rows),
            ("img", "owl.png", "OWL allocation"),
        ]
    parts += [
        ("h2", "Per-layer sparsity and reconstruction error"),
        ("img", "sparsity-heatmap.png", "achieved sparsity per layer"),
        ("img", "error-heatmap.png", "relative output error per layer"),
        ("h2", "Blocks"),
    ]
    rows = []
    recon = any("reconstruct" in rec for rec in run.blocks)
    for rec in run.blocks:
        errs = [st["rel_error"] for st in rec["layers"].values()]
        sps = [st["sparsity"] for st in rec["layers"].values()]
        r = rec.get("reconstruct")
        trained = [f"{r['before']:.4g}", f"{r['after']:.4g}", "kept solved" if r["kept_solved"] else ""] if r else []
        rows.append(
            [
                str(rec["block"]),
                _f(rec["seconds"], 2),
                _f(sum(sps) / len(sps)),
                _f(sum(errs) / len(errs)),
                _f(max(errs)),
                *(trained or ["", "", ""] if recon else []),
            ]
        )
    head = ["block", "seconds", "mean sparsity", "mean rel. error", "max rel. error"]
    head += ["block error solved", "reconstructed", ""] if recon else []
    parts += [("table", head, rows), ("img", "block-seconds.png", "seconds per block")]
    if recon:
        parts.append(("img", "reconstruction.png", "block output error before and after reconstruction"))
    parts.append(("h2", "Layers"))
    rows = [
        [
            str(rec["block"]),
            name,
            "x".join(map(str, st["shape"])),
            _f(st["target"]),
            _f(st["sparsity"]),
            _f(st["rel_error"], 5),
            f"{st['loss']:.4g}",
            f"{st['percdamp']:g}",
            _f(st["seconds"], 3),
        ]
        for rec in run.blocks
        for name, st in rec["layers"].items()
    ]
    parts.append(
        (
            "table",
            ["block", "layer", "shape", "target", "sparsity", "rel. error", "OBS loss", "percdamp", "seconds"],
            rows,
        )
    )
    return parts


def run_parts(run: RunData) -> list[Part]:
    """The sections of one run's report, in order."""
    ppl_img = [("img", "ppl-vs-sparsity.png", "perplexity vs sparsity")] if run.perplexities() else []
    return [*_summary_part(run), *_eval_parts(run), *ppl_img, *_rounds_part(run), *_layer_parts(run)]


def comparison_parts(runs: list[RunData]) -> list[Part]:
    """A side-by-side table of several runs (where each ended) and the perplexity-vs-sparsity plot over all."""
    labels = sorted({lab for r in runs for lab in r.final()[1]})
    tasks = sorted({t for r in runs for t in ((r.metrics or {}).get("tasks") or {})})
    headers = [
        "run",
        "method / pattern",
        "sparsity",
        *[f"{lab} ppl (dense)" for lab in labels],
        *[f"{t} acc" for t in tasks],
    ]
    rows = []
    for r in runs:
        (sparsity, ppl), scores = r.final(), (r.metrics or {}).get("tasks") or {}
        rows.append(
            [
                r.name,
                r.series,
                _f(sparsity),
                *[f"{ppl[lab]['ppl']:.2f} ({ppl[lab]['dense_ppl']:.2f})" if lab in ppl else "-" for lab in labels],
                *[_f(scores[t]["pruned"]["acc"]) if t in scores else "-" for t in tasks],
            ]
        )
    return [
        ("h1", f"SparseGPT comparison of {len(runs)} runs"),
        ("table", headers, rows),
        ("img", "comparison-ppl-vs-sparsity.png", "perplexity vs sparsity, all runs"),
    ]


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write each run's report (into ``out`` for one run, else its own eval/) and, for several, the comparison.

    Every run directory is read before anything is written, so a bad one fails first.
    """
    if not run_dirs:
        raise ValueError("give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    written: list[Path] = []
    for run in runs:
        dest = Path(out) if out is not None and len(runs) == 1 else run.root / "eval"
        written += write_parts(dest, "report", run_parts(run), run_pictures(run), f"SparseGPT report: {run.name}")
    if len(runs) > 1:
        dest = Path(out) if out is not None else runs[0].root / "eval"
        series, dense = ppl_points(runs)
        images = {"comparison-ppl-vs-sparsity.png": plots.ppl_vs_sparsity(series, dense)} if series or dense else {}
        written += write_parts(
            dest, "comparison", comparison_parts(runs), images, f"SparseGPT comparison of {len(runs)} runs"
        )
    return written
