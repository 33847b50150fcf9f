"""Export a finished run: the pruned checkpoint as users serve it, with a model card.

    export_run(RUN_DIR, "hf", out=None) -> OUT   (default RUN_DIR/export-FORMAT)

RUN_DIR is a one-shot run (its `model/`) or a finished progressive run (its last round's model, described
by that round's prune options, its mask and the run's summary; progressive rounds do not quantize, so no
compressed-tensors).

Formats: `hf` is the plain safetensors checkpoint of `model/` (hard-linked, not copied);
`compressed-tensors` packs a `--wbits` run's integer weights (`stages.export.packed`); `gguf`
writes one GGUF file for llama.cpp (`stages.export.gguf`). Every export adds `README.md` (a Hub
model card: YAML header with the base model, library and tags; then method, sparsity overall and
per layer type, pattern, bits, calibration data and size, and the dense-vs-pruned evaluation table
of `eval/metrics.json` when there is one), `sparsity.json` (each pruned layer's sparsity, shape and
pattern) and `export.json` (the run and format it came from: an existing `--out` is replaced only
when it is an earlier export of the same run). The folder is built under a temporary name and
renamed into place, so a half-written export is never found.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.config.parts import EXPORT_FORMATS
from stages.evaluate.evaluate import sparsity_report
from stages.export.gguf import write_gguf
from stages.export.packed import write_compressed_tensors
from stages.model.checkpoint import INDEX_NAME
from stages.model.embedded import DEFAULT_MODEL, gguf_path
from stages.progressive.config import round_dir
from stages.progressive.masks import mask_records
from stages.run.rundir import (
    RUN_JSON,
    RunError,
    atomic_write_json,
    fsync_dir,
    fsync_tree,
    link_or_copy,
    verify_record,
)

EXPORT_JSON = "export.json"
PLOT = "ppl-vs-sparsity.png"
"""The report's plot, copied beside the card when the run has one (a progressive run's: rounds.png)."""


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


def _storage(fmt: str, bits: int, stamp: dict[str, Any]) -> str:
    """How the weights are stored, for the card."""
    if fmt == "gguf":
        return f"GGUF `{stamp['gguf']['type']}` for llama.cpp (`{stamp['gguf']['file']}`)"
    if fmt == "compressed-tensors":
        p = stamp["packed"]
        grid = "per output channel" if p["strategy"] == "channel" else f"groups of {p['group_size']}"
        return (
            f"compressed-tensors `pack-quantized` W{bits}A16 (asymmetric, {grid}, the run's own scales and zero"
            " points: no re-quantization)"
        )
    return "safetensors, de-quantized" if bits < 16 else "safetensors"


def model_card(
    options: dict[str, Any],
    table: dict[str, Any],
    metrics: dict[str, Any] | None,
    fmt: str = "hf",
    stamp: dict[str, Any] | None = None,
    plot: str | None = None,
    method_line: str | None = None,
) -> str:
    """README.md of the export: the Hub's YAML header, then what was done and how it scores."""
    base = str(options.get("model", ""))
    bits = int(options.get("wbits") or 16)
    tags = ["sparsegpt", "pruned", f"sparsity-{round(100 * table['overall'])}"]
    if table["pattern"] != "unstructured":
        tags.append(f"n-m-{table['pattern'].replace(':', '-')}")
    if fmt != "hf":
        tags += [fmt] + ([f"w{bits}a16"] if fmt == "compressed-tensors" else [])
    header = ["---", f"base_model: {base}" if "/" in base and not base.startswith(("/", ".")) else None]
    library = "gguf" if fmt == "gguf" else "transformers"
    header += [f"library_name: {library}", "tags:", *[f"- {t}" for t in tags], "---"]
    lines = [line for line in header if line is not None]
    method = options.get("method", "sparsegpt")
    lines += [
        "",
        f"# {Path(base).name or base} pruned with {method}",
        "",
        f"- Base model: `{base}`",
        f"- Method: {method_line or f'{method} (one-shot, per-layer second-order solve)'}, pattern {table['pattern']}"
        + (f", jointly quantized to {bits} bits" if bits < 16 else ""),
        f"- Weights: {_storage(fmt, bits, stamp or {})}",
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
    if plot:
        lines += ["", f"![perplexity against sparsity]({plot})"]
    lines += ["", "Pruned with sparsegpt-pipeline (SparseGPT, Frantar & Alistarh, 2023).", ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Source:
    """What an export is made from: the model folder, the one-shot run whose blocks describe it, the card's facts."""

    run_dir: Path
    """The run being exported (one-shot or progressive): named in export.json."""
    config_hash: str | None
    model_record: Path
    """The record that pins the exported weights (model.json, or the last round's round.json)."""
    model: Path
    records: list[dict]
    """Per-layer sparsity in the block records' layout."""
    grids_run: Path | None
    """The one-shot run whose blocks saved their quantization grids (compressed-tensors)."""
    options: dict[str, Any]
    metrics: dict[str, Any] | None
    plot: Path
    method: str | None = None
    """The card's method line, when not one-shot."""


def export_run(run_dir: Path | str, fmt: str = "hf", out: Path | str | None = None, gguf_type: str = "f16") -> Path:
    """Write the export of a finished one-shot or progressive run in format ``fmt``; return its folder."""
    run_dir = Path(run_dir)
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format {fmt!r} is not supported; choose one of {', '.join(EXPORT_FORMATS)}")
    if not (run_dir / RUN_JSON).is_file():
        raise RunError(f"{run_dir} holds no {RUN_JSON}; pass the --run-dir of a sparsegpt prune or progressive run")
    run = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    options = run.get("options", {})
    src = _progressive_source(run_dir, run, fmt) if "schedule" in options else _oneshot_source(run_dir, run, fmt)
    return write_export(src, fmt, Path(out) if out is not None else run_dir / f"export-{fmt}", gguf_type)


def _oneshot_source(run_dir: Path, run: dict[str, Any], fmt: str) -> Source:
    model = run_dir / "model"
    if verify_record(run_dir / "model.json", quick=True) is None or not model.is_dir():
        raise RunError(f"{run_dir} has no assembled model/; rerun its prune command to finish it, then export")
    options = run.get("options", {})
    if fmt == "compressed-tensors" and int(options.get("wbits") or 16) == 16:
        raise RunError(
            f"{run_dir} was pruned without --wbits, so there are no integer weights to pack; prune with --wbits 4"
            " or 8 for --format compressed-tensors, or export --format hf"
        )
    metrics_path = run_dir / "eval" / "metrics.json"
    metrics = json.loads(metrics_path.read_text(encoding="utf-8")) if metrics_path.is_file() else None
    return Source(
        run_dir=run_dir,
        config_hash=run.get("config_hash"),
        model_record=run_dir / "model.json",
        model=model,
        records=_records(run_dir),
        grids_run=run_dir,
        options=options,
        metrics=metrics,
        plot=run_dir / "eval" / PLOT,
    )


def _progressive_source(run_dir: Path, run: dict[str, Any], fmt: str) -> Source:
    """A finished progressive run: its last round's model, described by that round's prune run and the summary."""
    popts = run.get("options", {})
    schedule = [str(e) for e in popts["schedule"]]
    last = round_dir(run_dir, len(schedule))
    done = verify_record(last / "round.json", quick=True)
    if done is None:
        finished = sum(
            verify_record(round_dir(run_dir, k) / "round.json", quick=True) is not None
            for k in range(1, len(schedule) + 1)
        )
        raise RunError(
            f"{run_dir} has finished {finished} of its {len(schedule)} rounds; rerun its progressive command to"
            " finish the schedule, then export"
        )
    if fmt == "compressed-tensors":
        raise RunError(
            f"{run_dir} is a progressive run, whose rounds do not quantize, so there are no integer weights to pack;"
            " export it with --format hf or gguf"
        )
    prune_run = last / "prune"
    options = {**json.loads((prune_run / RUN_JSON).read_text(encoding="utf-8")).get("options", {})}
    options["model"] = popts.get("model")  # the dense model, not the previous round's
    summary_path = run_dir / "summary.json"
    metrics = (
        _progressive_metrics(json.loads(summary_path.read_text(encoding="utf-8"))) if summary_path.is_file() else None
    )
    method = f"progressive SparseGPT, {len(schedule)} rounds ({', '.join(schedule)}), recovery {popts.get('recovery')}"
    return Source(
        run_dir=run_dir,
        config_hash=run.get("config_hash"),
        model_record=last / "round.json",
        model=last / Path(done["model"]).parent.name / "model",  # prune/ or finetune/, wherever the run moved
        records=mask_records(last / "mask.safetensors"),  # rounds keep no block records; fine-tuning keeps the mask
        grids_run=None,
        options=options,
        metrics=metrics,
        plot=run_dir / "eval" / "rounds.png",
        method=method,
    )


def _progressive_metrics(summary: dict[str, Any]) -> dict[str, Any] | None:
    """The card's dense-vs-pruned table from a progressive summary: dense, and the last round after recovery."""
    if not summary.get("rounds"):
        return None
    final = summary["rounds"][-1]["ppl_after"]
    metrics: dict[str, Any] = {
        label: {**d, "dense_ppl": d["ppl"], "ppl": final[label]}
        for label, d in summary.get("dense", {}).items()
        if label in final
    }
    tasks = {n: {"dense": t["dense"], "pruned": t["final"]} for n, t in summary.get("tasks", {}).items() if len(t) == 2}
    if tasks:
        metrics["tasks"] = tasks
    return metrics


def write_export(src: Source, fmt: str, out: Path, gguf_type: str = "f16") -> Path:
    """Write ``src`` in format ``fmt`` into ``out`` (built under a temporary name, renamed into place)."""
    stamp = {
        "run": str(src.run_dir.resolve()),
        "config_hash": src.config_hash,
        "model": hashlib.sha256(src.model_record.read_bytes()).hexdigest(),
        "format": fmt,
        **({"gguf_type": gguf_type} if fmt == "gguf" else {}),
    }
    if _check_out(out, src.run_dir, stamp):
        return out  # this export of this model is there already (a resumed flow's export task)
    options = src.options
    table = sparsity_table(src.records, options)
    trust = bool(options.get("trust_remote_code"))
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if fmt == "hf":
            stamp["files"] = _link(src.model, tmp, skip=())
        elif fmt == "compressed-tensors":
            assert src.grids_run is not None  # refused before: only a one-shot --wbits run has grids
            stamp["packed"] = write_compressed_tensors(src.grids_run, src.model, tmp, trust)
            _link(src.model, tmp, skip=(".safetensors", INDEX_NAME, "config.json"))
        else:
            source = gguf_path() if options.get("model") == DEFAULT_MODEL else None  # it came in as GGUF
            stamp["gguf"] = write_gguf(src.model, tmp / f"{_stem(options)}-{gguf_type}.gguf", gguf_type, source)
        plot = src.plot.name if src.plot.is_file() else None
        if plot:
            link_or_copy(src.plot, tmp / plot)
        card = model_card(options, table, src.metrics, fmt, stamp, plot, src.method)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        atomic_write_json(tmp / "sparsity.json", table)
        atomic_write_json(tmp / EXPORT_JSON, stamp)
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_dir(out.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_out(out: Path, run_dir: Path, stamp: dict[str, Any]) -> bool:
    """Whether ``out`` holds this very export already; an existing ``out`` is replaced only when it is an
    earlier export of this run (any format)."""
    if not out.exists():
        return False
    try:
        earlier = json.loads((out / EXPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        earlier = {}
    if earlier.get("config_hash") != stamp["config_hash"] or earlier.get("run") != stamp["run"]:
        raise RunError(f"{out} exists and is not an export of {run_dir}; pass another --out or remove it")
    return all(earlier.get(k) == v for k, v in stamp.items())


def _link(model: Path, folder: Path, skip: tuple[str, ...]) -> list[str]:
    """Hard-link model/'s files into ``folder``, except names ending with one of ``skip``; return their names."""
    names = []
    for f in sorted(model.iterdir()):
        if f.is_file() and not f.name.endswith(skip):
            link_or_copy(f, folder / f.name)
            names.append(f.name)
    return names


def _stem(options: dict[str, Any]) -> str:
    return Path(str(options.get("model") or "model")).name.replace(" ", "-") or "model"
