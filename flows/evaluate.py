"""The evaluation flow: perplexity of any checkpoint on dataset SPECs, block by block, and
zero-shot task scores (the whole model in memory), with a progress artifact per step."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

from stages.data import parse_spec
from stages.evaluate import blockwise_perplexity, score_tasks
from stages.models import load_tokenizer, resolve_model
from stages.perplexity import eval_windows
from stages.task_formats import parse_task_specs

PROGRESS_KEY = "sparsegpt-eval-progress"


@task(name="perplexity", task_run_name="perplexity-{spec}")
def perplexity(model_dir: str, spec: str, seqlen: int, windows: int | None, device: str, batch_size: int,
               trust_remote_code: bool) -> dict:
    tok = load_tokenizer(model_dir, trust_remote_code)
    ids = eval_windows(tok, spec, seqlen, windows)
    t0 = time.perf_counter()
    res = blockwise_perplexity(model_dir, ids, device, batch_size=batch_size, progress=True,
                               desc=parse_spec(spec).label, trust_remote_code=trust_remote_code)
    out = {**res.to_dict(), "seconds": time.perf_counter() - t0}
    get_run_logger().info("%s: ppl %.4f over %d x %d tokens", spec, out["ppl"], out["windows"], out["seqlen"])
    return out


@task(name="zero-shot")
def zero_shot(model_dir: str, tasks: list[str], limit: int | None, device: str, batch_size: int,
              trust_remote_code: bool, artifact: UUID, done: int, total: int) -> dict:
    """Scores of every task SPEC; moves the progress artifact after each task (steps ``done``+1.. of ``total``)."""

    def step(name: str) -> None:
        nonlocal done
        done += 1
        update_progress_artifact(artifact, progress=100.0 * done / total, description=f"{done}/{total}: task {name}")

    res = score_tasks(Path(model_dir), tasks, limit, device=device, batch_size=batch_size,
                      trust_remote_code=trust_remote_code, progress=True, step=step)
    for name, m in res.items():
        get_run_logger().info("%s: %s over %d items", name, ", ".join(f"{k} {m[k]:.4f}" for k in ("acc", "acc_norm", "ppl") if k in m), m["n"])
    return res


@flow(name="sparsegpt-evaluate")
def evaluate(model: str, specs: list[str] | None = None, seqlen: int = 2048, windows: int | None = None,
             device: str = "cpu", batch_size: int = 4, trust_remote_code: bool = False,
             tasks: list[str] | None = None, task_limit: int | None = None) -> dict:
    """Perplexity of ``model`` (directory, hub id or ``smollm2-135m``) on every SPEC and its scores on every task SPEC."""
    specs, tasks = list(specs or []), list(tasks or [])
    check_request(specs, tasks, task_limit)
    model_dir = str(resolve_model(model, trust_remote_code=trust_remote_code))
    total = len(specs) + len(tasks)
    artifact = create_progress_artifact(progress=0.0, key=PROGRESS_KEY, description=f"evaluating {model}")
    res: dict = {}
    for k, s in enumerate(specs):
        res[parse_spec(s).label] = perplexity(model_dir, s, seqlen, windows, device, batch_size, trust_remote_code)
        update_progress_artifact(artifact, progress=100.0 * (k + 1) / total, description=f"{k + 1}/{total}: perplexity {s}")
    if tasks:
        res["tasks"] = zero_shot(model_dir, tasks, task_limit, device, batch_size, trust_remote_code, artifact, len(specs), total)
    create_markdown_artifact(markdown=eval_markdown(res), key="sparsegpt-eval", description=f"evaluation of {model}")
    return res


def check_request(specs: list[str], tasks: list[str], task_limit: int | None) -> None:
    """ValueError (one line) unless there is something valid to evaluate."""
    if not specs and not tasks:
        raise ValueError("nothing to evaluate: give at least one --eval SPEC or --tasks SPEC[,SPEC...]")
    for spec in specs:
        parse_spec(spec)
    parse_task_specs(tasks)
    if task_limit is not None and task_limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {task_limit}")


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
