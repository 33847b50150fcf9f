"""The evaluation flow: perplexity of any checkpoint on dataset SPECs, block by block, and
zero-shot task scores, also block by block, with a progress artifact per step."""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task

from flows.artifacts import move, new_progress, publish_eval
from flows.errors import reports_user_errors
from stages.config import EvaluateConfig
from stages.data.specs import parse_spec
from stages.evaluate.cache import read_shared, shared_record, write_shared
from stages.evaluate.check import check as check_evaluate
from stages.evaluate.evaluate import blockwise_perplexity, evaluated_on, score_tasks
from stages.evaluate.lm_eval_layout import lm_eval_results, write_results
from stages.evaluate.perplexity import eval_windows
from stages.model.models import compute_dtype, load_tokenizer
from stages.run.shared import entry_lock

PROGRESS_KEY = "sparsegpt-eval-progress"


@task(name="perplexity", task_run_name="perplexity-{spec}")
def perplexity(cfg: EvaluateConfig, model_dir: str, spec: str) -> dict:
    """Block-wise perplexity of ``model_dir`` on one SPEC, in the run's compute dtype (shared across runs and
    evaluations through `stages.evaluate.cache` unless ``--no-cache``)."""
    ev, rt = cfg.eval, cfg.runtime
    dtype = compute_dtype(rt.device, Path(model_dir), rt.dtype)
    where = evaluated_on(dtype, rt.device)
    shared = shared_record("ppl", Path(model_dir), spec, seqlen=cfg.eval_seqlen, windows=ev.windows, **where)
    with entry_lock(shared if rt.cache else None):
        out = read_shared(shared) if rt.cache else None
        if out is None:
            tok = load_tokenizer(model_dir, cfg.trust_remote_code)
            ids = eval_windows(tok, spec, cfg.eval_seqlen, ev.windows)
            t0 = time.perf_counter()
            label = parse_spec(spec).label
            res = blockwise_perplexity(
                Path(model_dir), ids, rt.device, dtype, ev.batch_size, True, label, cfg.trust_remote_code
            )
            out = {**res.to_dict(), "seconds": time.perf_counter() - t0, **where}
            if rt.cache:
                write_shared(shared, out)
    get_run_logger().info("%s: ppl %.4f over %d x %d tokens", spec, out["ppl"], out["windows"], out["seqlen"])
    return out


@task(name="zero-shot")
def zero_shot(cfg: EvaluateConfig, model_dir: str, artifact: UUID, done: int, total: int) -> dict:
    """Scores of every task SPEC; moves the progress artifact after each task (steps ``done``+1.. of ``total``)."""
    ev, rt = cfg.eval, cfg.runtime

    def step(name: str) -> None:
        nonlocal done
        done += 1
        move(artifact, done, total, f"task {name}")

    dtype = compute_dtype(rt.device, Path(model_dir), rt.dtype)
    res = score_tasks(
        Path(model_dir),
        list(ev.tasks),
        ev.task_limit,
        device=rt.device,
        dtype=dtype,
        batch_size=ev.batch_size,
        trust_remote_code=cfg.trust_remote_code,
        progress=True,
        step=step,
        shared=rt.cache,
    )
    for name, m in res.items():
        scores = ", ".join(f"{k} {m[k]:.4f}" for k in ("acc", "acc_norm", "ppl") if k in m)
        get_run_logger().info("%s: %s over %d items", name, scores, m["n"])
    return res


@task(name="check")
def check(cfg: EvaluateConfig) -> str:
    """Refuse bad input before any work (the CLI has run the same check before Prefect started)."""
    return str(check_evaluate(cfg))


@flow(name="sparsegpt-evaluate")
@reports_user_errors
def evaluate(cfg: EvaluateConfig) -> dict:
    """Perplexity of ``cfg.model`` (directory, hub id or ``smollm2-135m``) on every SPEC, its scores on every task."""
    model_dir = check(cfg)
    ev = cfg.eval
    total = len(ev.specs) + len(ev.tasks)
    artifact = new_progress(PROGRESS_KEY, f"evaluating {cfg.model}")
    res: dict = {}
    for k, s in enumerate(ev.specs):
        res[parse_spec(s).label] = perplexity(cfg, model_dir, s)
        move(artifact, k + 1, total, f"perplexity {s}")
    if ev.tasks:
        res["tasks"] = zero_shot(cfg, model_dir, artifact, len(ev.specs), total)
    if ev.out:
        ppl = {k: v for k, v in res.items() if k != "tasks"}
        dtype = str(compute_dtype(cfg.runtime.device, Path(model_dir), cfg.runtime.dtype)).removeprefix("torch.")
        where = {"dtype": dtype, "device": cfg.runtime.device, "batch_size": ev.batch_size, "limit": ev.task_limit}
        write_results(ev.out, lm_eval_results(ppl, res.get("tasks") or {}, cfg.model, where))
    publish_eval(res, cfg.model)
    return res
