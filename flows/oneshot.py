"""The one-shot pruning flow: calibration -> capture -> blocks -> assemble -> evaluate.

Reads top to bottom as the recipe; every step is a Prefect task wrapping a stage
from `stages.oneshot`. The run directory is the source of truth: each stage skips
work whose done-record verifies, so a new flow run (or `prefect flow-run retry`)
on the same run directory resumes where the last one stopped. As a second layer,
task results are persisted under `RUN_DIR/.prefect/` with cache keys made of the
config hash, the stage and the block index (only once the stage's record exists),
so a retried flow run shows finished tasks as "Cached". While blocks are pruned, a
tqdm bar (`cfg.progress`) and a Prefect progress artifact show where the run stands;
a second progress artifact moves during evaluation, one step per (model, SPEC). At
the end the flow writes the run's report (`stages.report`) and publishes the metrics
(Markdown and table artifacts) and the report's Markdown.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.transactions import get_transaction
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stages import oneshot as st
from stages.config import PruneConfig
from stages.evaluate import evaluate_run
from stages.report import write_report
from stages.rundir import RunLock, config_hash, sweep_tmp, verify_record

RecordOf = Callable[[st.Run, Any], Path]


def _calib_record(run: st.Run, _i: Any = None) -> Path:
    return run.tokens.with_suffix(".json")


def _block_record(run: st.Run, i: int) -> Path:
    return run.block_record(i)


def _model_record(run: st.Run, _i: Any = None) -> Path:
    return run.model_record


def done_key(record_of: RecordOf, cfg: PruneConfig, run: st.Run, i: int | None = None) -> str | None:
    """config hash + record path when the stage's record verifies, else None (no cache lookup, no stale hit)."""
    path = record_of(run, i)
    if verify_record(path, quick=True) is None:
        return None
    return f"{config_hash(cfg.identity())[:16]}-{path.relative_to(run.root).as_posix().replace('/', '-')}"


def _key_fn(record_of: RecordOf) -> Callable[[Any, dict[str, Any]], str | None]:
    def key(_ctx: Any, params: dict[str, Any]) -> str | None:
        return done_key(record_of, params["cfg"], params["run"], params.get("i"))

    return key


def _persist_when_done(record_of: RecordOf, cfg: PruneConfig, run: st.Run, i: int | None = None) -> None:
    """Give this task run's transaction the key its record now earns.

    Prefect computes a cache key once, before the task runs; ours is None until the
    stage has written its record, so without this the result would be persisted only
    by the run after next. Setting the key here persists it now, so a retry finds it.
    """
    txn = get_transaction()
    if txn is not None and txn.key is None:
        txn.key = done_key(record_of, cfg, run, i)


def _options(run: st.Run) -> dict[str, Any]:
    return {"persist_result": True, "result_storage": run.root.resolve() / ".prefect"}


@task(name="calibrate", cache_key_fn=_key_fn(_calib_record))
def calibrate(cfg: PruneConfig, run: st.Run) -> dict:
    out = st.calibrate(cfg, run)
    _persist_when_done(_calib_record, cfg, run)
    return out


@task(name="capture")
def capture(cfg: PruneConfig, run: st.Run) -> dict:
    return st.capture(cfg, run)


@task(name="allocate")
def allocate(cfg: PruneConfig, run: st.Run) -> list[float]:
    return st.owl_allocation(cfg, run)


@task(name="prune-block", task_run_name="prune-block-{i:03d}", cache_key_fn=_key_fn(_block_record))
def prune_block(cfg: PruneConfig, run: st.Run, i: int, sparsity: float) -> dict:
    rec = st.prune_one(cfg, run, i, sparsity)
    get_run_logger().info(
        "block %d: %.1f s, mean layer error %.4f", i, rec["seconds"],
        sum(v["rel_error"] for v in rec["layers"].values()) / max(len(rec["layers"]), 1),
    )
    _persist_when_done(_block_record, cfg, run, i)
    return {k: v for k, v in rec.items() if k != "files"}


@task(name="assemble", cache_key_fn=_key_fn(_model_record))
def assemble(cfg: PruneConfig, run: st.Run) -> dict:
    out = st.assemble_model(cfg, run)
    _persist_when_done(_model_record, cfg, run)
    return out


@task(name="evaluate")
def evaluate(cfg: PruneConfig, run: st.Run, records: list[dict], timings: dict) -> dict:
    """Dense vs pruned perplexity and task scores, with a progress artifact moving per (model, SPEC)."""
    progress = None
    if cfg.eval or cfg.tasks:
        where = f"{cfg.run_dir}: dense and pruned {', '.join((*cfg.eval, *cfg.tasks))}"
        artifact = create_progress_artifact(progress=0.0, key=artifact_key(cfg.run_dir, "eval-progress"),
                                            description=f"evaluating {where}")

        def progress(done: int, total: int, what: str) -> None:
            update_progress_artifact(artifact, progress=100.0 * done / total, description=f"{done}/{total} ({what}): {where}")

    return evaluate_run(cfg, run, st.compute_dtype(cfg, run.model_dir), records, timings, progress)


def report_markdown(run_dir: str | Path) -> str:
    """Write RUN_DIR/eval/report.{md,html} and the PNGs; return the Markdown with image links as file paths."""
    write_report([run_dir])
    eval_dir = Path(run_dir) / "eval"
    text = (eval_dir / "report.md").read_text(encoding="utf-8")
    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f"*{m[1]}: `{eval_dir / m[2]}`*", text)


@task(name="report")
def report(cfg: PruneConfig) -> str:
    """Write eval/report.{md,html} and the PNGs; return the Markdown with image links as file paths."""
    return report_markdown(cfg.run_dir)


def artifact_key(run_dir: str | Path, kind: str = "progress") -> str:
    """An artifact's key for a run directory (lowercase letters, digits and dashes only)."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(run_dir).resolve().name.lower()).strip("-")
    return f"sparsegpt-{kind}-{slug or 'run'}"


@contextmanager
def block_progress(cfg: PruneConfig, run: st.Run) -> Iterator[Callable[[int], None]]:
    """A tqdm bar (when ``cfg.progress``) and a Prefect progress artifact over the blocks; yields ``step(i)``."""
    n = run.num_blocks
    where = f"{n} blocks of {cfg.model} into {cfg.run_dir}"
    artifact = create_progress_artifact(progress=0.0, key=artifact_key(cfg.run_dir), description=f"pruning {where}")
    with tqdm(total=n, desc="prune blocks", unit="block", disable=not cfg.progress) as bar, (
        logging_redirect_tqdm() if cfg.progress else nullcontext()
    ):  # console log lines are printed above the bar instead of through it; API logs are untouched

        def step(i: int) -> None:
            bar.update(1)
            update_progress_artifact(artifact, progress=100.0 * (i + 1) / n, description=f"block {i + 1}/{n}: {where}")

        yield step


@flow(name="sparsegpt-oneshot", log_prints=True)
def oneshot(cfg: PruneConfig) -> dict:
    """Prune ``cfg.model`` one-shot into ``cfg.run_dir`` and evaluate it."""
    timings: dict[str, float] = {}
    with RunLock(cfg.run_dir):
        sweep_tmp(cfg.run_dir)
        t = time.perf_counter()
        run = st.prepare(cfg)
        timings["prepare"] = time.perf_counter() - t

        t = time.perf_counter()
        calibrate.with_options(**_options(run))(cfg, run)
        timings["calibrate"] = time.perf_counter() - t

        t = time.perf_counter()
        capture(cfg, run)  # cheap to check; its outputs may be pruned away later
        sparsities = allocate(cfg, run)
        timings["capture"] = time.perf_counter() - t

        t = time.perf_counter()
        block_task, records = prune_block.with_options(**_options(run)), []
        with block_progress(cfg, run) as step:
            for i in range(run.num_blocks):
                records.append(block_task(cfg, run, i, sparsities[i]))
                step(i)
        timings["prune"] = time.perf_counter() - t

        t = time.perf_counter()
        assemble.with_options(**_options(run))(cfg, run)
        timings["assemble"] = time.perf_counter() - t

        metrics = evaluate(cfg, run, records, timings)
        report_md = report(cfg)
    where = str(Path(cfg.run_dir))
    create_markdown_artifact(markdown=metrics_markdown(metrics, cfg), key="sparsegpt-metrics", description=where)
    create_table_artifact(table=metrics_table(metrics), key="sparsegpt-metrics-table", description=where)
    create_markdown_artifact(markdown=report_md, key="sparsegpt-report", description=f"{where}/eval/report.md")
    return metrics


def metrics_markdown(metrics: dict, cfg: PruneConfig) -> str:
    """Small tables of dense vs pruned perplexity and task scores, for the CLI and the Prefect UI."""
    what = f"{cfg.method} {cfg.nm or f'{cfg.target:.0%}'}"
    lines = [f"| dataset | windows x seqlen | dense ppl | {what} ppl |", "|---|---|---|---|"]
    for label, m in metrics.items():
        if isinstance(m, dict) and "ppl" in m:
            lines.append(f"| {label} | {m['windows']} x {m['seqlen']} | {m['dense_ppl']:.2f} | {m['ppl']:.2f} |")
    if metrics.get("tasks"):
        lines += ["", f"| task | items | metric | dense | {what} |", "|---|---|---|---|---|"]
        for row in metrics_table(metrics):
            if row["kind"] == "task":
                lines.append(f"| {row['name']} | {row['n']} | {row['metric']} | {row['dense']:.4f} | {row['pruned']:.4f} |")
    lines.append(f"\nachieved sparsity of the pruned layers: {metrics['sparsity']['overall']:.4f}")
    return "\n".join(lines)


def metrics_table(metrics: dict) -> list[dict]:
    """One row per (dataset or task, metric): kind, name, metric, n, dense, pruned (a Prefect table artifact)."""
    rows = [{"kind": "perplexity", "name": label, "metric": "ppl", "n": m["windows"], "dense": m["dense_ppl"], "pruned": m["ppl"]}
            for label, m in metrics.items() if isinstance(m, dict) and "ppl" in m]
    for name, m in (metrics.get("tasks") or {}).items():
        rows += [{"kind": "task", "name": name, "metric": k, "n": m["pruned"]["n"], "dense": m["dense"][k], "pruned": m["pruned"][k]}
                 for k in ("acc", "acc_norm", "ppl") if k in m["pruned"]]
    s = metrics["sparsity"]["overall"]
    rows.append({"kind": "sparsity", "name": "pruned layers", "metric": "sparsity", "n": len(metrics["sparsity"]["per_layer"]),
                 "dense": 0.0, "pruned": s})
    return rows
