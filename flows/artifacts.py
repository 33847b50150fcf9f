"""Everything the flows show in Prefect's UI besides logs: progress, metrics and report artifacts.

Keys are derived from the run directory (`artifact_key`), so two runs never overwrite each
other's progress. The one-shot flow moves a progress artifact per block (`block_progress`,
with a tqdm bar on the console) and publishes its metrics and report at the end
(`publish_metrics`); the progressive flow moves one over its rounds (`RoundsProgress`);
the evaluation flow's tables come from `eval_markdown`. The Markdown helpers are also
what the CLI prints.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from uuid import UUID

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from stages.config import PruneConfig
from stages.progressive.config import ProgressiveConfig
from stages.prune.streams import Run
from stages.report.report import write_report


def artifact_key(run_dir: str | Path, kind: str = "progress") -> str:
    """An artifact's key for a run directory (lowercase letters, digits and dashes only)."""
    slug = re.sub(r"[^a-z0-9]+", "-", Path(run_dir).resolve().name.lower()).strip("-")
    return f"sparsegpt-{kind}-{slug or 'run'}"


@contextmanager
def block_progress(cfg: PruneConfig, run: Run) -> Iterator[Callable[[int], None]]:
    """A tqdm bar (``cfg.runtime.progress``) and a Prefect progress artifact over the blocks; yields ``step(i)``."""
    n = run.num_blocks
    where = f"{n} blocks of {cfg.model} into {cfg.run_dir}"
    artifact = create_progress_artifact(progress=0.0, key=artifact_key(cfg.run_dir), description=f"pruning {where}")
    with (
        tqdm(total=n, desc="prune blocks", unit="block", disable=not cfg.runtime.progress) as bar,
        logging_redirect_tqdm() if cfg.runtime.progress else nullcontext(),
    ):  # console log lines are printed above the bar instead of through it; API logs are untouched

        def step(i: int) -> None:
            bar.update(1)
            update_progress_artifact(artifact, progress=100.0 * (i + 1) / n, description=f"block {i + 1}/{n}: {where}")

        yield step


class RoundsProgress:
    """The flow's progress artifact: each round counts as 3 steps (prune, fine-tune, evaluate)."""

    def __init__(self, cfg: ProgressiveConfig, rounds: list[int]) -> None:
        self.cfg, self.rounds = cfg, rounds
        self.id = create_progress_artifact(
            progress=0.0,
            key=artifact_key(cfg.run_dir) + "-rounds",
            description=f"progressive rounds {rounds} of {cfg.run_dir}",
        )

    def update(self, k: int, stage: int, fraction: float, what: str) -> None:
        done = self.rounds.index(k) * 3 + stage + fraction
        update_progress_artifact(
            self.id,
            progress=100.0 * done / (3 * len(self.rounds)),
            description=f"round {k}/{self.cfg.rounds} ({self.cfg.schedule[k - 1]}): {what}",
        )


def report_markdown(run_dir: str | Path) -> str:
    """Write RUN_DIR/eval/report.{md,html} and the PNGs; return the Markdown with image links as file paths."""
    write_report([run_dir])
    eval_dir = Path(run_dir) / "eval"
    text = (eval_dir / "report.md").read_text(encoding="utf-8")
    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", lambda m: f"*{m[1]}: `{eval_dir / m[2]}`*", text)


def new_progress(key: str, description: str) -> UUID:
    """A progress artifact at 0 % (its id travels into tasks, which `move` it)."""
    return create_progress_artifact(progress=0.0, key=key, description=description)


def move(artifact: UUID, done: int, total: int, what: str) -> None:
    """Set a progress artifact to ``done / total``, described as ``done/total: what``."""
    update_progress_artifact(artifact, progress=100.0 * done / total, description=f"{done}/{total}: {what}")


def step_progress(key: str, description: str) -> Callable[[int, int, str], None]:
    """A progress artifact at 0 %; returns ``step(done, total, what)`` that moves it."""
    artifact = new_progress(key, description)
    return lambda done, total, what: move(artifact, done, total, what)


def eval_progress(cfg: PruneConfig) -> Callable[[int, int, str], None] | None:
    """The one-shot evaluation's progress artifact, one step per (model, SPEC); None when nothing is evaluated."""
    if not cfg.eval:
        return None
    where = f"{cfg.run_dir}: dense and pruned {', '.join((*cfg.eval.specs, *cfg.eval.tasks))}"
    step = step_progress(artifact_key(cfg.run_dir, "eval-progress"), f"evaluating {where}")
    return lambda done, total, what: step(done, total, f"{what} of {where}")


def publish_progressive(summary_md: str, message: str, report_md: str | None, run_dir: str) -> None:
    """The progressive flow's closing artifacts: the round table and, once a round is done, the report."""
    create_markdown_artifact(markdown=summary_md, key="sparsegpt-progressive", description=message)
    if report_md is not None:
        create_markdown_artifact(markdown=report_md, key="sparsegpt-report", description=f"{run_dir}/eval/report.md")


def publish_eval(res: dict, model: str) -> None:
    """The evaluation flow's closing artifact: its tables."""
    create_markdown_artifact(markdown=eval_markdown(res), key="sparsegpt-eval", description=f"evaluation of {model}")


def publish_metrics(metrics: dict, cfg: PruneConfig, report_md: str) -> None:
    """The one-shot flow's closing artifacts: metrics as Markdown and as a table, and the report's Markdown."""
    where = str(Path(cfg.run_dir))
    create_markdown_artifact(markdown=metrics_markdown(metrics, cfg), key="sparsegpt-metrics", description=where)
    create_table_artifact(table=metrics_table(metrics), key="sparsegpt-metrics-table", description=where)
    create_markdown_artifact(markdown=report_md, key="sparsegpt-report", description=f"{where}/eval/report.md")


def metrics_markdown(metrics: dict, cfg: PruneConfig) -> str:
    """Small tables of dense vs pruned perplexity and task scores, for the CLI and the Prefect UI."""
    what = cfg.solver.label
    lines = [f"| dataset | windows x seqlen | dense ppl | {what} ppl |", "|---|---|---|---|"]
    for label, m in metrics.items():
        if isinstance(m, dict) and "ppl" in m:
            lines.append(f"| {label} | {m['windows']} x {m['seqlen']} | {m['dense_ppl']:.2f} | {m['ppl']:.2f} |")
    if metrics.get("tasks"):
        lines += ["", f"| task | items | metric | dense | {what} |", "|---|---|---|---|---|"]
        for row in metrics_table(metrics):
            if row["kind"] == "task":
                lines.append(
                    f"| {row['name']} | {row['n']} | {row['metric']} | {row['dense']:.4f} | {row['pruned']:.4f} |"
                )
    lines.append(f"\nachieved sparsity of the pruned layers: {metrics['sparsity']['overall']:.4f}")
    return "\n".join(lines)


def metrics_table(metrics: dict) -> list[dict]:
    """One row per (dataset or task, metric): kind, name, metric, n, dense, pruned (a Prefect table artifact)."""
    rows = [
        {
            "kind": "perplexity",
            "name": label,
            "metric": "ppl",
            "n": m["windows"],
            "dense": m["dense_ppl"],
            "pruned": m["ppl"],
        }
        for label, m in metrics.items()
        if isinstance(m, dict) and "ppl" in m
    ]
    for name, m in (metrics.get("tasks") or {}).items():
        rows += [
            {
                "kind": "task",
                "name": name,
                "metric": k,
                "n": m["pruned"]["n"],
                "dense": m["dense"][k],
                "pruned": m["pruned"][k],
            }
            for k in ("acc", "acc_norm", "ppl")
            if k in m["pruned"]
        ]
    s = metrics["sparsity"]["overall"]
    rows.append(
        {
            "kind": "sparsity",
            "name": "pruned layers",
            "metric": "sparsity",
            "n": len(metrics["sparsity"]["per_layer"]),
            "dense": 0.0,
            "pruned": s,
        }
    )
    return rows


def eval_markdown(res: dict) -> str:
    """The evaluation flow's results as Markdown tables (perplexity, then tasks)."""
    lines = []
    ppl = {label: m for label, m in res.items() if label != "tasks"}
    if ppl:
        lines += ["| dataset | windows x seqlen | ppl |", "|---|---|---|"]
        lines += [f"| {label} | {m['windows']} x {m['seqlen']} | {m['ppl']:.2f} |" for label, m in ppl.items()]
    if res.get("tasks"):
        lines += [""] if lines else []
        lines += ["| task | items | metric | value |", "|---|---|---|---|"]
        for name, m in res["tasks"].items():
            lines += [f"| {name} | {m['n']} | {k} | {m[k]:.4f} |" for k in ("acc", "acc_norm", "ppl") if k in m]
    return "\n".join(lines)
