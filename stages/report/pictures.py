"""The PNGs of a run's report: per-layer heatmaps, seconds per block, OWL, perplexity vs sparsity, rounds."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from stages.report import plots

if TYPE_CHECKING:
    from stages.report.report import RunData


def layer_grid(blocks: list[dict], key: str) -> tuple[list[int], list[str], list[list[float | None]]]:
    """(block indices, linear layer names in first-seen order, grid[block][layer] of ``key``; None where absent)."""
    names: list[str] = []
    for rec in blocks:
        names += [n for n in rec["layers"] if n not in names]
    grid = [[rec["layers"][n][key] if n in rec["layers"] else None for n in names] for rec in blocks]
    return [rec["block"] for rec in blocks], names, grid


# ---------------------------------------------------------------- sections


def ppl_points(runs: list[RunData]) -> tuple[dict[str, dict[str, list]], dict[str, list[float]]]:
    """(series[label][method/pattern] = [(sparsity, ppl)], dense[label] = [ppl]) over all runs."""
    series: dict[str, dict[str, list]] = {}
    dense: dict[str, list[float]] = {}
    for run in runs:
        for label, m in run.perplexities().items():
            if run.sparsity is not None:
                series.setdefault(label, {}).setdefault(run.series, []).append((run.sparsity, m["ppl"]))
            dense.setdefault(label, []).append(m["dense_ppl"])
        summary = run.summary or {}
        for label, d in (summary.get("dense") or {}).items():
            dense.setdefault(label, []).append(d["ppl"])
        for r in summary.get("rounds") or []:
            x = r.get("sparsity", r["target"])
            for key, what in (
                ("ppl_after", "progressive, fine-tuned"),
                ("ppl_before", "progressive, before fine-tuning"),
            ):
                for label, ppl in (r.get(key) or {}).items():
                    series.setdefault(label, {}).setdefault(what, []).append((x, ppl))
    return series, dense


def run_pictures(run: RunData) -> dict[str, bytes]:
    """File name -> PNG bytes of every picture the run's data allows."""
    out: dict[str, bytes] = {}
    if run.blocks:
        blocks, names, sparsity = layer_grid(run.blocks, "sparsity")
        rows = [str(b) for b in blocks]
        out["sparsity-heatmap.png"] = plots.heatmap(sparsity, rows, names, "achieved sparsity", "sparsity", 0.0, 1.0)
        errors, columns = layer_grid(run.blocks, "rel_error")[2], names
        recon = [rec.get("reconstruct") for rec in run.blocks]
        if any(recon):  # one more column: each block's output error after reconstruction
            errors = [[*row, r["after"] if r else None] for row, r in zip(errors, recon, strict=True)]
            columns = [*names, "block out, reconstructed"]
            done = [(b, r) for b, r in zip(blocks, recon, strict=True) if r]
            out["reconstruction.png"] = plots.reconstruction(
                [b for b, _ in done], [r["before"] for _, r in done], [r["after"] for _, r in done]
            )
        out["error-heatmap.png"] = plots.heatmap(
            errors, rows, columns, "relative output error ‖WX − ŴX‖² / ‖WX‖²", "relative error"
        )
        out["block-seconds.png"] = plots.bars(
            rows, [r["seconds"] for r in run.blocks], "pruning time per block", "seconds"
        )
    if run.blocks and run.owl:
        out["owl.png"] = plots.owl_allocation(run.owl["ratios"], run.owl["sparsities"])
    series, dense = ppl_points([run])
    if series or dense:
        out["ppl-vs-sparsity.png"] = plots.ppl_vs_sparsity(series, dense)
    rounds = (run.summary or {}).get("rounds") or []
    if rounds:
        labels = {k for r in rounds for k in (*r.get("ppl_before", {}), *r.get("ppl_after", {}))}
        before = {lab: [r.get("ppl_before", {}).get(lab, math.nan) for r in rounds] for lab in labels}
        after = {lab: [r.get("ppl_after", {}).get(lab, math.nan) for r in rounds] for lab in labels}
        dense_ppl = {lab: v["ppl"] for lab, v in (run.summary.get("dense") or {}).items()}
        out["rounds.png"] = plots.rounds([r["target"] for r in rounds], before, after, dense_ppl)
    return out
