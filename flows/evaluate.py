"""The evaluation flow: perplexity of any checkpoint on dataset SPECs, block by block, and
zero-shot task scores (the whole model in memory), with a progress artifact per step."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task

from flows.artifacts import move, new_progress, publish_eval
from stages.config import EvaluateConfig
from stages.data.specs import parse_spec
from stages.evaluate.evaluate import blockwise_perplexity, score_tasks
from stages.evaluate.perplexity import eval_windows
from stages.model.models import load_tokenizer, resolve_model

PROGRESS_KEY = "sparsegpt-eval-progress"


@task(name="perplexity", task_run_name="perplexity-{spec}")
def perplexity(
    model_dir: str, spec: str, seqlen: int, windows: int | None, device: str, batch_size: int, trust_remote_code: bool
) -> dict:
    tok = load_tokenizer(model_dir, trust_remote_code)
    ids = eval_windows(tok, spec, seqlen, windows)
    t0 = time.perf_counter()
    res = blockwise_perplexity(
        model_dir,
        ids,
        device,
        batch_size=batch_size,
        progress=True,
        desc=parse_spec(spec).label,
        trust_remote_code=trust_remote_code,
    )
    out = {**res.to_dict(), "seconds": time.perf_counter() - t0}
    get_run_logger().info("%s: ppl %.4f over %d x %d tokens", spec, out["ppl"], out["windows"], out["seqlen"])
    return out


@task(name="zero-shot")
def zero_shot(
    model_dir: str,
    tasks: list[str],
    limit: int | None,
    device: str,
    batch_size: int,
    trust_remote_code: bool,
    artifact: UUID,
    done: int,
    total: int,
) -> dict:
    """Scores of every task SPEC; moves the progress artifact after each task (steps ``done``+1.. of ``total``)."""

    def step(name: str) -> None:
        nonlocal done
        done += 1
        move(artifact, done, total, f"task {name}")

    res = score_tasks(
        Path(model_dir),
        tasks,
        limit,
        device=device,
        batch_size=batch_size,
        trust_remote_code=trust_remote_code,
        progress=True,
        step=step,
    )
    for name, m in res.items():
        get_run_logger().info(
            "%s: %s over %d items",
            name,
            ", ".join(f"{k} {m[k]:.4f}" for k in ("acc", "acc_norm", "ppl") if k in m),
            m["n"],
        )
    return res


@flow(name="sparsegpt-evaluate")
def evaluate(cfg: EvaluateConfig) -> dict:
    """Perplexity of ``cfg.model`` (directory, hub id or ``smollm2-135m``) on every SPEC, its scores on every task."""
    ev, rt, trust = cfg.check().eval, cfg.runtime, cfg.trust_remote_code
    model_dir = str(resolve_model(cfg.model, trust_remote_code=trust))
    total = len(ev.specs) + len(ev.tasks)
    artifact = new_progress(PROGRESS_KEY, f"evaluating {cfg.model}")
    res: dict = {}
    for k, s in enumerate(ev.specs):
        res[parse_spec(s).label] = perplexity(
            model_dir, s, cfg.eval_seqlen, ev.windows, rt.device, ev.batch_size, trust
        )
        move(artifact, k + 1, total, f"perplexity {s}")
    if ev.tasks:
        res["tasks"] = zero_shot(
            model_dir, list(ev.tasks), ev.task_limit, rt.device, ev.batch_size, trust, artifact, len(ev.specs), total
        )
    publish_eval(res, cfg.model)
    return res
