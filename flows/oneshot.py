"""The one-shot pruning flow: calibration -> capture -> blocks -> assemble -> evaluate.

Reads top to bottom as the recipe; every step is a Prefect task wrapping a stage
from `stages.oneshot`. The run directory is the source of truth: each stage skips
work whose done-record verifies, so a new flow run (or `prefect flow-run retry`)
on the same run directory resumes where the last one stopped. As a second layer,
task results are persisted under `RUN_DIR/.prefect/` with cache keys made of the
config hash, the stage and the block index (only once the stage's record exists).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from stages import oneshot as st
from stages.config import PruneConfig
from stages.evaluate import evaluate_run
from stages.rundir import RunLock, config_hash, sweep_tmp, verify_record


def _done_key(record_of):
    """A cache key fn: config hash + stage + block, but only when the stage's record verifies."""

    def key(_ctx: Any, params: dict[str, Any]) -> str | None:
        cfg, run, i = params["cfg"], params["run"], params.get("i")
        path = record_of(run, i)
        if path is None or verify_record(path, quick=True) is None:
            return None
        return f"{config_hash(cfg.identity())[:16]}-{path.relative_to(run.root).as_posix().replace('/', '-')}"

    return key


def _options(run: st.Run, record_of) -> dict[str, Any]:
    return {"cache_key_fn": _done_key(record_of), "persist_result": True, "result_storage": run.root.resolve() / ".prefect"}


@task(name="calibrate")
def calibrate(cfg: PruneConfig, run: st.Run) -> dict:
    return st.calibrate(cfg, run)


@task(name="capture")
def capture(cfg: PruneConfig, run: st.Run) -> dict:
    return st.capture(cfg, run)


@task(name="allocate")
def allocate(cfg: PruneConfig, run: st.Run) -> list[float]:
    return st.owl_allocation(cfg, run)


@task(name="prune-block", task_run_name="prune-block-{i:03d}")
def prune_block(cfg: PruneConfig, run: st.Run, i: int, sparsity: float) -> dict:
    rec = st.prune_one(cfg, run, i, sparsity)
    get_run_logger().info(
        "block %d: %.1f s, mean layer error %.4f", i, rec["seconds"],
        sum(v["rel_error"] for v in rec["layers"].values()) / max(len(rec["layers"]), 1),
    )
    return {k: v for k, v in rec.items() if k != "files"}


@task(name="assemble")
def assemble(cfg: PruneConfig, run: st.Run) -> dict:
    return st.assemble_model(cfg, run)


@task(name="evaluate")
def evaluate(cfg: PruneConfig, run: st.Run, records: list[dict], timings: dict) -> dict:
    return evaluate_run(cfg, run, st.compute_dtype(cfg, run.model_dir), records, timings)


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
        calibrate.with_options(**_options(run, lambda r, _: r.tokens.with_suffix(".json")))(cfg, run)
        timings["calibrate"] = time.perf_counter() - t

        t = time.perf_counter()
        capture(cfg, run)  # cheap to check; its outputs may be pruned away later
        sparsities = allocate(cfg, run)
        timings["capture"] = time.perf_counter() - t

        t = time.perf_counter()
        block_task = prune_block.with_options(**_options(run, lambda r, i: r.block_record(i)))
        records = [block_task(cfg, run, i, sparsities[i]) for i in range(run.num_blocks)]
        timings["prune"] = time.perf_counter() - t

        t = time.perf_counter()
        assemble.with_options(**_options(run, lambda r, _: r.model_record))(cfg, run)
        timings["assemble"] = time.perf_counter() - t

        metrics = evaluate(cfg, run, records, timings)
    create_markdown_artifact(markdown=metrics_markdown(metrics, cfg), key="sparsegpt-metrics", description=str(Path(cfg.run_dir)))
    return metrics


def metrics_markdown(metrics: dict, cfg: PruneConfig) -> str:
    """A small table of dense vs pruned perplexity, for the CLI and the Prefect UI."""
    what = cfg.nm or f"{cfg.target:.0%}"
    lines = [f"| dataset | windows x seqlen | dense ppl | {cfg.method} {what} ppl |", "|---|---|---|---|"]
    for label, m in metrics.items():
        if isinstance(m, dict) and "ppl" in m:
            lines.append(f"| {label} | {m['windows']} x {m['seqlen']} | {m['dense_ppl']:.2f} | {m['ppl']:.2f} |")
    lines.append(f"\nachieved sparsity of the pruned layers: {metrics['sparsity']['overall']:.4f}")
    return "\n".join(lines)
