"""The progressive flow: rounds of prune (mask grows) -> fine-tune (mask fixed) -> evaluate.

Each round's pruning runs the one-shot flow as a subflow (its block tasks, caching
and progress artifact included) on `RUN_DIR/rounds/round_KK/prune`; mask, fine-tune
and evaluation are tasks wrapping `stages.progressive.rounds`. The run directory is the source
of truth: a new flow run on the same run directory starts at the first unfinished
round (inside it: at the first unpruned block, or the last fine-tuning checkpoint),
finishes at most `cfg.runtime.rounds_per_run` rounds, and logs that there is nothing to do
once the schedule is complete. The `sparsegpt-progressive` deployment in prefect.yaml
runs it on a cron schedule with a concurrency limit of 1.

With `--export FORMAT` a finished schedule is exported (`stages.export.export`, its final model;
skipped when that export is there).

Artifacts: a progress artifact over the rounds' steps (it moves every fine-tuning
step) and a markdown table of every finished round.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task

from flows.artifacts import RoundsProgress, publish_progressive, report_markdown
from flows.errors import reports_user_errors
from flows.oneshot import oneshot
from stages.config import PruneConfig
from stages.export.export import export_run
from stages.progressive import rounds as pg
from stages.run.rundir import RunLock, sweep_tmp


@task(name="dense-perplexity")
def dense_perplexity(cfg: pg.ProgressiveConfig) -> dict:
    return pg.dense_perplexity(cfg)


@task(name="mask", task_run_name="round-{k:02d}-mask")
def mask(cfg: pg.ProgressiveConfig, k: int, pruned_model: Path) -> dict:
    rec = pg.mask_round(cfg, k, pruned_model)
    return {key: v for key, v in rec.items() if key != "files"}


@task(name="evaluate", task_run_name="round-{k:02d}-evaluate")
def evaluate(cfg: pg.ProgressiveConfig, k: int) -> dict:
    return pg.evaluate_round(cfg, k)


@task(name="final-tasks")
def final_tasks(cfg: pg.ProgressiveConfig) -> dict:
    """Zero-shot tasks on the dense and the final model, once the schedule is complete."""
    return pg.final_tasks(cfg)


@task(name="report")
def report(cfg: pg.ProgressiveConfig) -> str:
    """RUN_DIR/eval/report.{md,html} with the round-by-round curve; returns the Markdown."""
    return report_markdown(cfg.run_dir)


def _steps(cfg: pg.ProgressiveConfig, progress: RoundsProgress) -> pg.RoundSteps:
    logger = get_run_logger()

    def prune(pcfg: PruneConfig, k: int) -> dict:
        progress.update(k, 0, 0.0, "pruning")
        return oneshot.with_options(flow_run_name=f"round-{k:02d}-prune")(pcfg)

    @task(name="finetune", task_run_name="round-{k:02d}-finetune")
    def finetune(cfg: pg.ProgressiveConfig, k: int, teacher: Path) -> dict:
        def on_step(i: int, total: int, losses: dict) -> None:
            if i == total or i % max(1, total // 50) == 0:
                progress.update(k, 1, i / total, f"fine-tuning step {i}/{total}, loss {losses['total']:.4f}")

        rec = pg.finetune_round(cfg, k, teacher, on_step=on_step)
        logger.info("round %d: fine-tuned %d steps, %d tokens", k, rec.get("steps", 0), rec.get("tokens", 0))
        return {key: v for key, v in rec.items() if key not in ("files", "losses")}

    def evaluate_step(cfg: pg.ProgressiveConfig, k: int) -> dict:
        progress.update(k, 2, 0.0, "evaluating")
        out = evaluate(cfg, k)
        progress.update(k, 3, 0.0, "done")
        return out

    return pg.RoundSteps(prune=prune, mask=mask, finetune=finetune, evaluate=evaluate_step)


@task(name="export")
def export(cfg: pg.ProgressiveConfig) -> str:
    """`sparsegpt export --format FORMAT` of the finished schedule (RUN_DIR/export-FORMAT); done once per model."""
    return str(export_run(cfg.run_dir, cfg.runtime.export, None, cfg.runtime.gguf_type))


@task(name="check")
def check(cfg: pg.ProgressiveConfig) -> None:
    """Refuse bad input before any work (the CLI has run the same check before Prefect started)."""
    pg.check(cfg)


@flow(name="sparsegpt-progressive", log_prints=True)
@reports_user_errors
def progressive(cfg: pg.ProgressiveConfig) -> dict:
    """Advance the progressive schedule of ``cfg.run_dir`` by at most ``cfg.runtime.rounds_per_run`` rounds."""
    logger = get_run_logger()
    check(cfg)
    with RunLock(cfg.run_dir):
        sweep_tmp(cfg.run_dir)
        dense = pg.prepare(cfg)
        todo = pg.rounds_to_run(cfg)
        if todo:
            logger.info("rounds to run now: %s of %d (schedule %s)", todo, cfg.rounds, ",".join(cfg.schedule))
            dense_perplexity(cfg)
            steps = _steps(cfg, RoundsProgress(cfg, todo))
            for k in todo:
                rec = pg.run_round(cfg, k, dense, steps)
                logger.info(
                    "round %d done: sparsity %.4f, ppl %s -> %s",
                    k,
                    rec["sparsity"],
                    rec["ppl_before"],
                    rec["ppl_after"],
                )
        final_tasks(cfg)
        s = pg.write_summary(cfg)
        report_md = report(cfg) if s["rounds"] else None
        if cfg.runtime.export and s["complete"]:
            export(cfg)
    message = pg.progress_message(cfg, todo)
    logger.info(message)
    publish_progressive(pg.summary_markdown(s), message, report_md, cfg.run_dir)
    return {"done_now": todo, "remaining": cfg.rounds - len(s["rounds"]), "message": message, "summary": s}
