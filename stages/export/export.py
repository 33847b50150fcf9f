"""Export a finished run: the pruned checkpoint as users serve it, with a model card.

    export_run(RUN_DIR, "hf", out=None) -> OUT   (default RUN_DIR/export-hf)

`hf` is the plain safetensors checkpoint of `model/` (hard-linked, not copied), plus
`README.md` (a Hub model card: YAML header with the base model, library and tags; then
method, sparsity overall and per layer type, pattern, bits, calibration data and size,
and the dense-vs-pruned evaluation table of `eval/metrics.json` when there is one) and
`sparsity.json` (each pruned layer's sparsity, shape and pattern). The folder is built
under a temporary name and renamed into place, so a half-written export is never found.
Packed quantized formats (compressed-tensors, GGUF) are the rest of issue 15.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from stages.evaluate.evaluate import sparsity_report
from stages.run.rundir import (
    RUN_JSON,
    RunError,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    link_or_copy,
    verify_record,
)

FORMATS = ("hf",)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted((run_dir / "blocks").glob("block_*.json"))]


def sparsity_table(records: list[dict], options: dict[str, Any]) -> dict[str, Any]:
    """sparsity.json: the pattern, overall, per layer type (e.g. mlp.down_proj, weighted by size) and per layer."""
    by_type: dict[str, tuple[float, int]] = {}
    for rec in records:
        for name, st in rec["layers"].items():
            n = st["shape"][0] * st["shape"][1]
            z, t = by_type.get(name, (0.0, 0))
            by_type[name] = (z + st["sparsity"] * n, t + n)
    report = sparsity_report(records)
    return {
        "pattern": options.get("nm") or "unstructured",
        "overall": report["overall"],
        "by_type": {k: z / t for k, (z, t) in sorted(by_type.items())},
        "layers": report["per_layer"],
    }


def model_card(options: dict[str, Any], table: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    """README.md of the export: the Hub's YAML header, then what was done and how it scores."""
    base = str(options.get("model", ""))
    bits = int(options.get("wbits") or 16)
    tags = ["sparsegpt", "pruned", f"sparsity-{round(100 * table['overall'])}"]
    if table["pattern"] != "unstructured":
        tags.append(f"n-m-{table['pattern'].replace(':', '-')}")
    header = ["---", f"base_model: {base}" if "/" in base and not base.startswith(("/", ".")) else None]
    header += ["library_name: transformers", "tags:", *[f"- {t}" for t in tags], "---"]
    lines = [line for line in header if line is not None]
    method = options.get("method", "sparsegpt")
    lines += [
        "",
        f"# {Path(base).name or base} pruned with {method}",
        "",
        f"- Base model: `{base}`",
        f"- Method: {method} (one-shot, per-layer second-order solve), pattern {table['pattern']}"
        + (f", jointly quantized to {bits} bits (stored de-quantized)" if bits < 16 else ""),
        f"- Sparsity of the pruned linear layers: {100 * table['overall']:.2f}% overall",
        f"- Calibration: `{options.get('calib')}`, {options.get('nsamples')} samples x {options.get('seqlen')} tokens,"
        f" seed {options.get('seed')}",
        "",
        "| layer type | sparsity |",
        "|---|---|",
        *[f"| {name} | {100 * s:.2f}% |" for name, s in table["by_type"].items()],
    ]
    if metrics:
        rows = [
            f"| perplexity {label} ({m['windows']} x {m['seqlen']}) | {m['dense_ppl']:.3f} | {m['ppl']:.3f} |"
            for label, m in metrics.items()
            if isinstance(m, dict) and "dense_ppl" in m
        ]
        for name, t in (metrics.get("tasks") or {}).items():
            dense, pruned = t["dense"], t["pruned"]
            for key in ("acc", "acc_norm"):
                if key in pruned:
                    rows.append(f"| {name} {key} (n={pruned['n']}) | {dense[key]:.4f} | {pruned[key]:.4f} |")
        if rows:
            lines += ["", "## Evaluation", "", "| metric | dense | pruned |", "|---|---|---|", *rows]
    lines += ["", "Pruned with sparsegpt-pipeline (SparseGPT, Frantar & Alistarh, 2023).", ""]
    return "\n".join(lines)


def export_run(run_dir: Path | str, fmt: str = "hf", out: Path | str | None = None) -> Path:
    """Write the export of a finished one-shot run; return its folder."""
    run_dir = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"export format {fmt!r} is not supported; choose one of {', '.join(FORMATS)}")
    if not (run_dir / RUN_JSON).is_file():
        raise RunError(f"{run_dir} holds no {RUN_JSON}; pass the --run-dir of a sparsegpt prune run")
    model = run_dir / "model"
    if verify_record(run_dir / "model.json", quick=True) is None or not model.is_dir():
        raise RunError(f"{run_dir} has no assembled model/; rerun its prune command to finish it, then export")
    options = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8")).get("options", {})
    out = Path(out) if out is not None else run_dir / f"export-{fmt}"
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    table = sparsity_table(_records(run_dir), options)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for f in sorted(model.iterdir()):
            if f.is_file():
                link_or_copy(f, tmp / f.name)
        (tmp / "README.md").write_text(model_card(options, table, metrics), encoding="utf-8")
        atomic_write_json(tmp / "sparsity.json", table)
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
