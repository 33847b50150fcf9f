"""The report's pictures: matplotlib figures rendered to PNG bytes with the Agg backend.

Each function takes plain numbers (no run directory, no records) and returns the PNG
as bytes, so `stages.report.report` decides where files go and writes them atomically. Figures
are built on `matplotlib.figure.Figure` with an Agg canvas, never through pyplot's
global state, so they work in worker processes without a display.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Point = tuple[float, float]


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def heatmap(
    grid: Sequence[Sequence[float | None]],
    rows: Sequence[str],
    cols: Sequence[str],
    title: str,
    colorbar: str,
    vmin: float | None = None,
    vmax: float | None = None,
) -> bytes:
    """A (rows x cols) heatmap, missing cells (None) left blank; values written in small grids."""
    values = [[math.nan if v is None else float(v) for v in row] for row in grid]  # (blocks, layers)
    fig = Figure(figsize=(1.2 + 0.9 * len(cols), 1.4 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks(range(len(cols)), cols, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.set_xlabel("linear layer")
    ax.set_ylabel("block")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=colorbar)
    if len(rows) * len(cols) <= 200:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=6, color="white")
    return _png(fig)


def bars(labels: Sequence[str], values: Sequence[float], title: str, ylabel: str) -> bytes:
    """One bar per label (e.g. seconds per block)."""
    fig = Figure(figsize=(max(4.0, 0.3 * len(labels) + 2), 3.2))
    ax = fig.add_subplot()
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=90 if len(labels) > 16 else 0)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return _png(fig)


def owl_allocation(ratios: Sequence[float], sparsities: Sequence[float]) -> bytes:
    """OWL: each block's outlier ratio (bars) and the sparsity it was given (line)."""
    fig = Figure(figsize=(max(4.0, 0.3 * len(ratios) + 2), 3.2))
    ax = fig.add_subplot()
    ax.bar(range(len(ratios)), [100 * r for r in ratios], color="tab:gray", label="outlier ratio")
    ax.set_xlabel("block")
    ax.set_ylabel("outlier ratio (%)")
    right = ax.twinx()
    right.plot(range(len(sparsities)), sparsities, "o-", color="tab:red", label="sparsity")
    right.set_ylabel("sparsity")
    ax.set_title("OWL allocation")
    return _png(fig)


def ppl_vs_sparsity(series: Mapping[str, Mapping[str, Sequence[Point]]], dense: Mapping[str, Sequence[float]]) -> bytes:
    """Perplexity against sparsity, one panel per dataset.

    ``series[label][name]`` are (sparsity, ppl) points of one method/pattern; ``dense[label]``
    the dense perplexities, drawn as horizontal lines. The y axis is logarithmic.
    """
    labels = sorted(series.keys() | dense.keys())
    fig = Figure(figsize=(5.2 * max(len(labels), 1), 3.8))
    for k, label in enumerate(labels):
        ax = fig.add_subplot(1, max(len(labels), 1), k + 1)
        for name, points in sorted(series.get(label, {}).items()):
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, "o-", label=name)
        for j, ppl in enumerate(sorted(set(dense.get(label, ())))):
            ax.axhline(ppl, color="black", linestyle="--", linewidth=1, label="dense" if j == 0 else None)
        ax.set_yscale("log")
        ax.set_xlabel("sparsity")
        ax.set_ylabel(f"{label} perplexity")
        ax.set_title(label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def rounds(
    targets: Sequence[float],
    before: Mapping[str, Sequence[float]],
    after: Mapping[str, Sequence[float]],
    dense: Mapping[str, float],
) -> bytes:
    """Progressive rounds: perplexity before and after fine-tuning against each round's target sparsity."""
    labels = sorted(before.keys() | after.keys())
    fig = Figure(figsize=(5.2 * max(len(labels), 1), 3.8))
    for k, label in enumerate(labels):
        ax = fig.add_subplot(1, max(len(labels), 1), k + 1)
        if label in before:
            ax.plot(targets, before[label], "s--", color="tab:orange", label="after pruning, before fine-tuning")
        if label in after:
            ax.plot(targets, after[label], "o-", color="tab:blue", label="after fine-tuning")
        if label in dense:
            ax.axhline(dense[label], color="black", linestyle="--", linewidth=1, label="dense")
        ax.set_yscale("log")
        ax.set_xlabel("round target sparsity")
        ax.set_ylabel(f"{label} perplexity")
        ax.set_title(f"progressive rounds: {label}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def reconstruction(blocks: Sequence[int], before: Sequence[float], after: Sequence[float]) -> bytes:
    """Block-wise reconstruction: each block's normalised output MSE after its solve and after training."""
    fig = Figure(figsize=(max(4.5, 0.25 * len(blocks) + 2), 3.4))
    ax = fig.add_subplot()
    ax.plot(blocks, before, "s--", color="tab:orange", label="solved")
    ax.plot(blocks, after, "o-", color="tab:blue", label="reconstructed")
    ax.set_yscale("log")
    ax.set_xlabel("block")
    ax.set_ylabel("‖f(x) − y‖² / ‖y‖²")
    ax.set_title("block output error before and after reconstruction")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    return _png(fig)
