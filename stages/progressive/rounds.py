"""Progressive prune-and-finetune rounds toward high sparsity, over one run directory.

Round k (target s_k of the schedule):

    prune   the previous round's model (round 1: the dense model) to s_k with SparseGPT,
            keeping every weight that is already zero (the mask only grows), with fresh
            calibration windows (seed + k - 1) run through the current model; with
            `--recovery reconstruct|both` each block is then trained toward the dense
            model's block outputs (the dense model is its `--reconstruct-teacher`)
    mask    the round's mask (True = pruned), bit-packed, from the pruned model's zeros
    finetune with the mask fixed, distilling from the dense teacher (stages.finetune.finetune;
            none with `--recovery reconstruct`)
    evaluate perplexity before and after fine-tuning
    record  rounds/round_KK/round.json, written last: the round is done

Run directory:
```
RUN_DIR/run.json                       the progressive config's identity (resume refuses another)
RUN_DIR/eval/dense-*.json              the dense model's perplexities, once
RUN_DIR/rounds/round_KK/prune/         a one-shot run directory; its model/ is the pruned model
RUN_DIR/rounds/round_KK/mask.safetensors  + mask.json (record)
RUN_DIR/rounds/round_KK/finetune/      the fine-tune's out_dir; its model/ is the round's model
RUN_DIR/rounds/round_KK/eval/          before/after perplexities
RUN_DIR/rounds/round_KK/round.json     the round's done-record (summary row + checksums)
RUN_DIR/summary.json, summary.md       one row per finished round
```
Every step returns at once when its own record verifies, so a killed run resumes
inside the round it was in: pruning per block, fine-tuning from its last checkpoint.
A call runs at most `rounds_per_run` rounds (a scheduled deployment advances the
schedule a little per run) and reports when nothing is left to do.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from stages.config import PruneConfig
from stages.config.tree import to_flat
from stages.evaluate.evaluate import perplexity_cached, score_tasks
from stages.finetune.config import FinetuneConfig
from stages.model.models import compute_dtype
from stages.progressive.check import check
from stages.progressive.config import ProgressiveConfig, parse_schedule, target_of  # noqa: F401 (re-exported)
from stages.progressive.masks import read_mask, write_mask  # noqa: F401 (read_mask re-exported)
from stages.progressive.paths import RoundPaths, eval_key, first_unfinished, round_done  # noqa: F401
from stages.progressive.summary import summary_markdown, write_summary  # noqa: F401
from stages.run.identity import init_run
from stages.run.rundir import RunLock, atomic_path, sweep_tmp, verify_record, write_record

log = logging.getLogger("sparsegpt.progressive")
# --- rounds ------------------------------------------------------------------------------------


def prepare(cfg: ProgressiveConfig) -> Path:
    """`check` the run's settings, then create or check RUN_DIR/run.json; return the dense model's directory."""
    from stages.prune.oneshot import versions

    dense = check(cfg)
    init_run(cfg.root(), cfg.identity(), versions(), upgrade=ProgressiveConfig.upgrade, options=to_flat(cfg))
    return dense


def mask_round(cfg: ProgressiveConfig, k: int, pruned_model: Path) -> dict:
    """Round k's mask from the pruned model's zeros (mask.safetensors + mask.json record)."""
    paths = RoundPaths(cfg.round_dir(k))
    done = verify_record(paths.mask_record)
    if done is not None:
        return done
    stats = write_mask(paths.mask, pruned_model, cfg.trust_remote_code)
    return write_record(paths.mask_record, stats, [paths.mask])


def finetune_round(
    cfg: ProgressiveConfig, k: int, teacher: Path, on_step: Callable[[int, int, dict], None] | None = None
) -> dict:
    """Fine-tune round k's pruned model with its mask fixed (resumes from the last checkpoint)."""
    from stages.finetune.finetune import finetune

    paths = RoundPaths(cfg.round_dir(k))
    if not cfg.finetunes:
        return {"tokens": 0, "seconds": 0.0, "steps": 0}
    fcfg = cfg.finetune_config(k)
    with tqdm(total=fcfg.total_steps, desc=f"round {k} finetune", unit="step", disable=not cfg.runtime.progress) as bar:

        def step(i: int, total: int, losses: dict) -> None:
            bar.n = i
            bar.set_postfix(loss=f"{losses['total']:.4f}", refresh=False)
            bar.refresh()
            if on_step is not None:
                on_step(i, total, losses)

        _share_tokens(cfg, fcfg, paths.finetune / "data" / "tokens.arrow", teacher)
        # The fine-tune keeps the student's zeros as its mask: exactly mask.safetensors, keyed by parameter name.
        return finetune(
            paths.prune / "model", teacher, paths.finetune, fcfg, cfg.runtime, cfg.trust_remote_code, on_step=step
        )


def _share_tokens(cfg: ProgressiveConfig, fcfg: FinetuneConfig, dst: Path, model_dir: Path) -> None:
    """Tokenize the fine-tuning data once per run (RUN_DIR/data/) and hard-link it into the round's fine-tune.

    `prepare_windows` reuses a token file whose metadata names the same SPEC and seqlen,
    so every round reads the same windows (in its own seeded order) without re-tokenizing.
    """
    import os

    from stages.finetune.data import prepare_windows
    from stages.model.models import load_tokenizer

    if dst.is_file():
        return
    shared = prepare_windows(
        load_tokenizer(model_dir, cfg.trust_remote_code),
        fcfg.dataset,
        fcfg.seqlen,
        cfg.root() / "data" / f"finetune-s{fcfg.seqlen}.arrow",
    )
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(shared, dst)
    except OSError:  # another file system: a copy through a temporary name
        with atomic_path(dst) as tmp:
            shutil.copyfile(shared, tmp)


def _perplexities(cfg: ProgressiveConfig, model_dir: Path, folder: Path, tag: str, k: int) -> dict[str, dict]:
    dtype = compute_dtype(cfg.runtime.device, model_dir, cfg.runtime.dtype)
    out = {}
    for spec in cfg.eval.specs:
        label, key = eval_key(cfg, spec)
        out[label] = perplexity_cached(
            model_dir,
            spec,
            cfg.eval_seqlen,
            cfg.eval.windows,
            folder / f"{tag}-{key}.json",
            f"{tag} {label}",
            dtype,
            cfg.eval.batch_size,
            cfg.runtime,
            cfg.trust_remote_code,
            dense=tag == "dense",
        )
    return out


def dense_perplexity(cfg: ProgressiveConfig) -> dict[str, dict]:
    """The dense model's perplexity on every eval SPEC (cached in RUN_DIR/eval/)."""
    return _perplexities(cfg, cfg.round_model(0), cfg.root() / "eval", "dense", 0)


def evaluate_round(cfg: ProgressiveConfig, k: int) -> dict:
    """Perplexity of round k's model before and after fine-tuning (cached in rounds/round_k/eval/)."""
    paths = RoundPaths(cfg.round_dir(k))
    before = _perplexities(cfg, paths.prune / "model", paths.eval, "before", k)
    after = _perplexities(cfg, cfg.round_model(k), paths.eval, "after", k) if cfg.finetunes else before
    return {"before": before, "after": after}


def finish_round(cfg: ProgressiveConfig, k: int, mask: dict, tuned: dict, evals: dict, seconds: dict) -> dict:
    """Write round k's record (last), drop its intermediate blocks and activations, update the summary."""
    paths = RoundPaths(cfg.round_dir(k))
    model = cfg.round_model(k)
    row = {
        "round": k,
        "target": target_of(cfg.schedule[k - 1]),
        "pattern": cfg.schedule[k - 1],
        "sparsity": mask["sparsity"],
        "ppl_before": {label: m["ppl"] for label, m in evals["before"].items()},
        "ppl_after": {label: m["ppl"] for label, m in evals["after"].items()},
        "tokens": int(tuned.get("tokens", 0)),
        "steps": int(tuned.get("steps", 0)),
        "final_loss": tuned.get("final_loss"),
        "seconds": sum(seconds.values()),
        "stage_seconds": seconds,
        "model": str(model),
    }
    record = write_record(paths.record, row, [paths.mask, *sorted(p for p in model.iterdir() if p.is_file())])
    for sub in ("acts", "dense", "recon", "blocks"):  # the round's model is written; these are not needed
        shutil.rmtree(paths.prune / sub, ignore_errors=True)
    write_summary(cfg)
    return record


def final_tasks(cfg: ProgressiveConfig, step: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Zero-shot task scores of the dense and the final model (RUN_DIR/eval/tasks-*.json), once all rounds are done."""
    if not cfg.eval.tasks or round_done(cfg, cfg.rounds) is None:
        return {}
    out: dict[str, dict] = {}
    for which, model_dir in (("dense", cfg.round_model(0)), ("final", cfg.round_model(cfg.rounds))):
        n = cfg.eval.task_limit or "all"
        scores = score_tasks(
            model_dir,
            list(cfg.eval.tasks),
            cfg.eval.task_limit,
            device=cfg.runtime.device,
            dtype=compute_dtype(cfg.runtime.device, model_dir, cfg.runtime.dtype),
            batch_size=cfg.eval.batch_size,
            trust_remote_code=cfg.trust_remote_code,
            progress=cfg.runtime.progress,
            cache=lambda name, which=which, n=n: cfg.root() / "eval" / f"tasks-{which}-{name}-n{n}.json",
            step=(lambda name, which=which: step(f"{which} {name}")) if step is not None else None,
            shared=which == "dense" and cfg.runtime.cache,
        )
        for name, res in scores.items():
            out.setdefault(name, {})[which] = res
    return out


@dataclass
class Progress:
    """What one call did: the rounds it finished and whether any are left."""

    done_now: list[int] = field(default_factory=list)
    remaining: int = 0
    message: str = ""
    summary: dict = field(default_factory=dict)


def rounds_to_run(cfg: ProgressiveConfig) -> list[int]:
    """The rounds this call runs: from the first unfinished one, at most ``rounds_per_run``."""
    first = first_unfinished(cfg)
    if first is None:
        return []
    last = cfg.rounds if cfg.runtime.rounds_per_run is None else min(cfg.rounds, first + cfg.runtime.rounds_per_run - 1)
    return list(range(first, last + 1))


def progress_message(cfg: ProgressiveConfig, done_now: list[int]) -> str:
    left = cfg.rounds - sum(round_done(cfg, k) is not None for k in range(1, cfg.rounds + 1))
    if not done_now:
        return f"schedule complete: all {cfg.rounds} rounds of {cfg.run_dir} are done; nothing to do"
    span = f"round {done_now[0]}" if len(done_now) == 1 else f"rounds {done_now[0]}-{done_now[-1]}"
    return f"finished {span} of {cfg.rounds}; " + (
        f"{left} left, run again to continue" if left else "schedule complete"
    )


def _run_pipeline(pcfg: PruneConfig, k: int) -> object:
    from stages.prune.oneshot import run_pipeline

    return run_pipeline(pcfg)


@dataclass(frozen=True)
class RoundSteps:
    """How each step of a round runs: plain stage functions, or the Prefect flow's tasks wrapping them."""

    prune: Callable[[PruneConfig, int], object] = _run_pipeline
    """Round k's one-shot pruning, given its config and k."""
    mask: Callable[[ProgressiveConfig, int, Path], dict] = mask_round
    finetune: Callable[[ProgressiveConfig, int, Path], dict] = finetune_round
    evaluate: Callable[[ProgressiveConfig, int], dict] = evaluate_round


def run_round(cfg: ProgressiveConfig, k: int, dense: Path, steps: RoundSteps = RoundSteps()) -> dict:
    """Every step of round k in order (each skips when its record verifies); return the round's record."""
    done = round_done(cfg, k)
    if done is not None:
        return done
    if k > 1 and round_done(cfg, k - 1) is None:
        raise RuntimeError(f"round {k - 1} is not finished; rounds run in order")
    previous = cfg.round_model(k - 1) if k > 1 else dense
    seconds = {}
    t = time.perf_counter()
    steps.prune(cfg.prune_config(k, previous), k)
    mask = steps.mask(cfg, k, RoundPaths(cfg.round_dir(k)).prune / "model")
    seconds["prune"] = time.perf_counter() - t
    log.info("round %d: pruned to %.4f (target %s)", k, mask["sparsity"], cfg.schedule[k - 1])
    t = time.perf_counter()
    tuned = steps.finetune(cfg, k, dense)
    seconds["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    evals = steps.evaluate(cfg, k)
    seconds["evaluate"] = time.perf_counter() - t
    return finish_round(cfg, k, mask, tuned, evals, seconds)


def run_progressive(cfg: ProgressiveConfig) -> Progress:
    """Advance the schedule by at most ``rounds_per_run`` rounds, without Prefect (the flow does the same)."""
    with RunLock(cfg.run_dir):
        sweep_tmp(cfg.run_dir)
        dense = prepare(cfg)
        todo = rounds_to_run(cfg)
        if todo:
            dense_perplexity(cfg)
        for k in todo:
            run_round(cfg, k, dense)
        final_tasks(cfg)
        s = write_summary(cfg)
    return Progress(
        done_now=todo, remaining=cfg.rounds - len(s["rounds"]), message=progress_message(cfg, todo), summary=s
    )
