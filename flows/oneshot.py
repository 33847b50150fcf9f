"""The one-shot pruning flow: calibration -> capture -> blocks -> assemble -> evaluate.

Reads top to bottom as the recipe; every step is a Prefect task wrapping a stage
from `stages.prune.oneshot`. The run directory is the source of truth: each stage skips
work whose done-record verifies, so a new flow run (or `prefect flow-run retry`)
on the same run directory resumes where the last one stopped. As a second layer,
task results are persisted under `RUN_DIR/.prefect/` with cache keys made of the
config hash, the stage and the block index (only once the stage's record exists),
so a retried flow run shows finished tasks as "Cached". While blocks are pruned, a
tqdm bar (`cfg.runtime.progress`) and a Prefect progress artifact show where the run stands;
a second progress artifact moves during evaluation, one step per (model, SPEC). At
the end the flow writes the run's report (`stages.report.report`), exports the run with `--export FORMAT`
(`stages.export.export`: skipped when that export of the same model is there) and publishes the metrics
(Markdown and table artifacts) and the report's Markdown.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.transactions import get_transaction

from flows.artifacts import block_progress, eval_progress, publish_metrics, report_markdown
from flows.errors import reports_user_errors
from stages.config import PruneConfig
from stages.evaluate.evaluate import evaluate_run
from stages.evaluate.lm_eval_layout import dense_path, prune_layouts, write_results
from stages.export.export import export_run
from stages.prune import oneshot as st
from stages.prune.check import check as check_prune
from stages.prune.check import world_size
from stages.run.identity import config_hash
from stages.run.rundir import RunLock, sweep_tmp, verify_record

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


@task(name="check")
def check(cfg: PruneConfig) -> None:
    """Refuse bad input before any work (the CLI has run the same check before Prefect started)."""
    check_prune(cfg)


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
        "block %d: %.1f s, mean layer error %.4f",
        i,
        rec["seconds"],
        sum(v["rel_error"] for v in rec["layers"].values()) / max(len(rec["layers"]), 1),
    )
    _persist_when_done(_block_record, cfg, run, i)
    return {k: v for k, v in rec.items() if k != "files"}


@task(name="prune-blocks-ranks")
def prune_blocks_ranks(cfg: PruneConfig, run: st.Run, sparsities: list[float]) -> list[dict]:
    """`--nproc N`: one launcher task spawns N data-parallel ranks that prune every unfinished block (the
    block records make it resumable); the progress bar and artifact move as records appear."""
    from stages.prune.parallel import prune_blocks_parallel

    with block_progress(cfg, run) as step:
        records = prune_blocks_parallel(cfg, run, sparsities, done=step)
    return [{k: v for k, v in rec.items() if k != "files"} for rec in records]


@task(name="assemble", cache_key_fn=_key_fn(_model_record))
def assemble(cfg: PruneConfig, run: st.Run) -> dict:
    out = st.assemble_model(cfg, run)
    _persist_when_done(_model_record, cfg, run)
    return out


@task(name="evaluate")
def evaluate(cfg: PruneConfig, run: st.Run, records: list[dict], timings: dict) -> dict:
    """Dense vs pruned perplexity and task scores, with a progress artifact moving per (model, SPEC)."""
    progress = eval_progress(cfg)
    return evaluate_run(cfg, run, run.dtype, records, timings, progress)


def write_lm_eval(cfg: PruneConfig, run: st.Run, metrics: dict) -> None:
    """`--out PATH`: the pruned model's scores in lm-eval's layout at PATH, the dense model's beside it."""
    where = {
        "dtype": str(run.dtype).removeprefix("torch."),
        "device": cfg.runtime.device,
        "batch_size": cfg.eval.batch_size,
        "limit": cfg.eval.task_limit,
        "sparsegpt": {"method": cfg.solver.label, "run_dir": str(run.root)},
    }
    dense, pruned = prune_layouts(metrics, str(run.model_dir), str(run.model), where)
    write_results(cfg.eval.out, pruned)
    write_results(dense_path(cfg.eval.out), dense)


@task(name="export")
def export(cfg: PruneConfig) -> str:
    """`sparsegpt export --format FORMAT` of the finished run (RUN_DIR/export-FORMAT); done once per model."""
    return str(export_run(cfg.run_dir, cfg.runtime.export, None, cfg.runtime.gguf_type))


@task(name="report")
def report(cfg: PruneConfig) -> str:
    """Write eval/report.{md,html} and the PNGs; return the Markdown with image links as file paths."""
    return report_markdown(cfg.run_dir)


def _steps(cfg: PruneConfig) -> st.OneshotSteps:
    """The one-shot steps as this flow's tasks (results persisted under RUN_DIR/.prefect), blocks with progress."""

    def persisted(task_fn):  # noqa: ANN001, ANN202
        return lambda cfg, run, *a: task_fn.with_options(**_options(run))(cfg, run, *a)

    def blocks(cfg: PruneConfig, run: st.Run, sparsities: list[float]) -> list[dict]:
        if world_size(cfg) > 1:
            return prune_blocks_ranks(cfg, run, sparsities)
        block_task, records = prune_block.with_options(**_options(run)), []
        with block_progress(cfg, run) as step:
            for i in range(run.num_blocks):
                records.append(block_task(cfg, run, i, sparsities[i]))
                step(i)
        return records

    return st.OneshotSteps(
        calibrate=persisted(calibrate),
        capture=capture,
        allocate=allocate,
        prune_blocks=blocks,
        assemble=persisted(assemble),
    )


@flow(name="sparsegpt-oneshot", log_prints=True)
@reports_user_errors
def oneshot(cfg: PruneConfig) -> dict:
    """Prune ``cfg.model`` one-shot into ``cfg.run_dir`` and evaluate it."""
    timings: dict[str, float] = {}
    check(cfg)
    with RunLock(cfg.run_dir):
        sweep_tmp(cfg.run_dir)
        run, records = st.run_steps(cfg, _steps(cfg), timings)
        metrics = evaluate(cfg, run, records, timings)
        if cfg.eval.out:
            write_lm_eval(cfg, run, metrics)
        report_md = report(cfg)
        if cfg.runtime.export:
            export(cfg)
    publish_metrics(metrics, cfg, report_md)
    return metrics
