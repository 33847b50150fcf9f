"""Evaluation stage: perplexity of a checkpoint, block by block, and the run's metrics.

`blockwise_perplexity` evaluates a model the way it is pruned: the inputs of block 0
are captured for all windows, then every block is loaded alone and run over them, and
the model's head turns the last hidden states into losses. Peak memory is one block
plus one boundary of activations, whatever the depth. `score_tasks` gives zero-shot
task scores (`stages.evaluate.tasks.zeroshot`), block by block too (`stages.evaluate.tasks.blockwise`). `evaluate_run`
writes `eval/metrics.json` for a pruned run: dense and pruned perplexity for every eval
SPEC, dense and pruned task scores (key "tasks"), the achieved sparsity overall and per
layer, and timings. Each (model, SPEC) result is a done-record under `eval/`, so a rerun
only computes what is missing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from stages.config import PruneConfig, RuntimeConfig
from stages.config.tree import to_flat
from stages.data.specs import parse_spec
from stages.data.tasks import parse_task_specs
from stages.evaluate.cache import read_shared, shared_record, write_shared
from stages.evaluate.perplexity import Perplexity, eval_windows
from stages.evaluate.tasks.blockwise import Blockwise
from stages.evaluate.tasks.zeroshot import evaluate_tasks
from stages.model.blocks import load_block, run_block, skeleton
from stages.model.capture import Head, capture_inputs
from stages.model.models import load_tokenizer, max_positions
from stages.run.memory import GrowthTrim, keep_freed_memory, release_memory
from stages.run.rundir import atomic_write_json, verify_record, write_record
from stages.run.shared import entry_lock
from stages.run.transfer import HostSink, device_batches, rows_into

HEAD_CHUNK = 128
"""Positions per call of the model's head in `blockwise_perplexity`: bounds its logits to (128, vocab)."""


@torch.no_grad()
def blockwise_perplexity(
    model_dir: Path,
    windows: torch.Tensor,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    progress: bool = False,
    desc: str = "eval",
    trust_remote_code: bool = False,
) -> Perplexity:
    """Perplexity of the checkpoint in ``model_dir`` over ``windows`` ``(nwin, seqlen)``."""
    nwin, seqlen = windows.shape
    hidden, kwargs = capture_inputs(model_dir, windows, device, dtype, batch_size, trust_remote_code)
    n_blocks = skeleton(model_dir, trust_remote_code).num_blocks
    keep_freed_memory()  # each batch reuses the pages the last one freed
    trim = GrowthTrim()
    for i in tqdm(range(n_blocks), desc=desc, disable=not progress, leave=False):
        block = load_block(model_dir, i, device, dtype, trust_remote_code)
        inputs = (hidden[j : j + batch_size] for j in range(0, nwin, batch_size))
        with HostSink(rows_into(hidden)) as outputs:  # each batch's outputs overwrite its inputs' rows
            for x in device_batches(inputs, device):
                outputs(run_block(block, x, kwargs))
        del block
        trim()
    release_memory()  # the blocks' freed working set: the head's logits take fresh pages
    head = Head(model_dir, device, dtype, trust_remote_code)
    total = 0.0
    for j in range(nwin):
        total += window_nll(head, hidden[j], windows[j]) / (seqlen - 1) * seqlen  # mean loss x seqlen, as the reference
    return Perplexity(ppl=math.exp(total / (nwin * seqlen)), windows=nwin, seqlen=seqlen)


def window_nll(head: Head, hidden: torch.Tensor, ids: torch.Tensor, chunk: int = HEAD_CHUNK) -> float:
    """Summed next-token loss of one window: last hidden states ``(seqlen, hidden)``, its ids ``(seqlen,)``.

    The head runs on ``chunk`` positions at a time (a decoder's final norm and output
    projection act on each position alone), so its largest tensor is ``(chunk, vocab)``
    logits instead of ``(seqlen, vocab)``: 25 MiB instead of 100 for a 49k vocabulary.
    """
    seqlen = ids.shape[0]
    nll = 0.0
    for a in range(0, seqlen - 1, chunk):
        b = min(a + chunk, seqlen - 1)
        logits = head(hidden[None, a:b])[0].float()  # (b - a, vocab): positions a..b-1 predict ids a+1..b
        nll += float(F.cross_entropy(logits, ids[a + 1 : b + 1].to(logits.device), reduction="sum"))
    return nll


def perplexity_cached(
    model_dir: Path,
    spec: str,
    seqlen: int,
    max_windows: int | None,
    cache: Path,
    desc: str,
    dtype: torch.dtype,
    batch_size: int,
    runtime: RuntimeConfig,
    trust_remote_code: bool = False,
    dense: bool = False,
) -> dict:
    """Perplexity of one checkpoint on one SPEC, stored in ``cache`` (a done-record) for reruns; a record
    computed in another dtype or on another kind of device is computed again. A `dense` checkpoint's result
    is also shared across run directories (`stages.evaluate.cache`) unless `runtime.cache` is off."""
    where = evaluated_on(dtype, runtime.device)
    done = verify_record(cache)
    if done is not None and all(done.get(k) == v for k, v in where.items()):
        return done
    shared = None
    if dense and runtime.cache:
        shared = shared_record("ppl", model_dir, spec, seqlen=seqlen, windows=max_windows, **where)
    with entry_lock(shared):
        done = read_shared(shared) if shared is not None else None
        if done is not None:
            write_record(cache, done, [])
            return done
        tok = load_tokenizer(model_dir, trust_remote_code)
        windows = eval_windows(tok, spec, seqlen, max_windows)
        release_memory()  # tokenizing the corpus leaves a large freed heap behind
        t0 = time.perf_counter()
        res = blockwise_perplexity(
            model_dir, windows, runtime.device, dtype, batch_size, runtime.progress, desc, trust_remote_code
        )
        release_memory()
        out = {**res.to_dict(), "seconds": time.perf_counter() - t0, **where}
        if shared is not None:
            write_shared(shared, out)
    write_record(cache, out, [])
    return out


def evaluated_on(dtype: torch.dtype, device: str) -> dict[str, str]:
    """What an evaluation record keys on besides its SPEC and sizes: the compute dtype and the device's kind
    (cuda:0 and cuda:1 give the same figures; a CPU and a GPU differ in the last digits)."""
    return {"dtype": str(dtype).removeprefix("torch."), "device": torch.device(device).type}


def sparsity_report(records: list[dict]) -> dict:
    """Achieved sparsity overall and per layer, from the block records."""
    per_layer, zeros, total = {}, 0.0, 0
    for rec in records:
        for name, st in rec["layers"].items():
            n = st["shape"][0] * st["shape"][1]
            per_layer[f"{rec['block']}.{name}"] = st["sparsity"]
            zeros += st["sparsity"] * n
            total += n
    return {"overall": zeros / total if total else 0.0, "per_layer": per_layer}


def score_tasks(
    model_dir: Path,
    specs: list[str],
    limit: int | None,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    trust_remote_code: bool = False,
    progress: bool = False,
    cache: Callable[[str], Path] | None = None,
    step: Callable[[str], None] | None = None,
    shared: bool = False,
) -> dict[str, dict]:
    """{task name: {"acc", ["acc_norm" | "ppl"], "n", "seconds", "spec"}} of one checkpoint.

    With ``cache`` (task name -> record path), a task whose record verifies and holds the
    same SPEC is not scored again; the model is loaded only if some task is missing.
    With ``shared`` (a dense checkpoint) scores are also shared across run directories
    (`stages.evaluate.cache`). ``step(name)`` is called after each task. Contexts are cut
    to the model's positions.
    """
    results: dict[str, dict] = {}
    model = tok = None
    for spec, parsed in zip(specs, parse_task_specs(specs), strict=True):
        record = cache(parsed.name) if cache is not None else None
        done = verify_record(record) if record is not None else None
        where = evaluated_on(dtype, device)
        common = shared_record("task", model_dir, spec, limit=limit, **where) if shared else None
        stale = done is None or any(done.get(k) != v for k, v in {"spec": spec, **where}.items())
        with entry_lock(common if stale else None):
            if stale and common:
                done = read_shared(common)
                if done is not None and record is not None:
                    write_record(record, done, [])
            if done is None or any(done.get(k) != v for k, v in {"spec": spec, **where}.items()):
                if model is None:
                    model = Blockwise(model_dir, device, dtype, trust_remote_code)
                    tok = load_tokenizer(model_dir, trust_remote_code)
                t0 = time.perf_counter()
                scores = evaluate_tasks(model, tok, [spec], limit, batch_size, max_positions(model.config), progress)
                done = {**scores[parsed.name], "spec": spec, "seconds": time.perf_counter() - t0, **where}
                if common is not None:
                    write_shared(common, done)
                if record is not None:
                    write_record(record, done, [])
        results[parsed.name] = done
        if step is not None:
            step(parsed.name)
    return results


def evaluate_run(
    cfg: PruneConfig,
    run,
    dtype: torch.dtype,
    records: list[dict],
    timings: dict,
    progress: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Dense vs pruned perplexity for every eval SPEC and scores for every task SPEC; write eval/metrics.json.

    ``progress(done, total, what)`` is called after each (model, SPEC) evaluation.
    """
    seqlen = cfg.eval_seqlen
    out_dir = run.root / "eval"
    total, count = 2 * (len(cfg.eval.specs) + len(cfg.eval.tasks)), 0

    def step(what: str) -> None:
        nonlocal count
        count += 1
        if progress is not None:
            progress(count, total, what)

    metrics: dict = {}
    for spec in cfg.eval.specs:
        label = parse_spec(spec).label
        key = f"{label}-s{seqlen}-w{cfg.eval.windows or 'all'}"
        common = (dtype, cfg.eval.batch_size, cfg.runtime, cfg.trust_remote_code)
        dense = perplexity_cached(
            run.model_dir,
            spec,
            seqlen,
            cfg.eval.windows,
            out_dir / f"dense-{key}.json",
            f"dense {label}",
            *common,
            dense=True,
        )
        step(f"dense {label} perplexity")
        pruned = perplexity_cached(
            run.model, spec, seqlen, cfg.eval.windows, out_dir / f"pruned-{key}.json", f"pruned {label}", *common
        )
        step(f"pruned {label} perplexity")
        metrics[label] = {
            **{k: pruned[k] for k in ("ppl", "windows", "seqlen")},
            "dense_ppl": dense["ppl"],
            "seconds": pruned["seconds"],
            "dense_seconds": dense["seconds"],
        }
    if cfg.eval.tasks:
        scores = {}
        for which, model_dir in (("dense", run.model_dir), ("pruned", run.model)):
            scores[which] = score_tasks(
                model_dir,
                list(cfg.eval.tasks),
                cfg.eval.task_limit,
                device=cfg.runtime.device,
                dtype=dtype,
                batch_size=cfg.eval.batch_size,
                trust_remote_code=cfg.trust_remote_code,
                progress=cfg.runtime.progress,
                cache=lambda name, w=which: out_dir / f"tasks-{w}-{name}-n{cfg.eval.task_limit or 'all'}.json",
                step=lambda name, w=which: step(f"{w} {name}"),
                shared=which == "dense" and cfg.runtime.cache,
            )
        metrics["tasks"] = {
            name: {"dense": scores["dense"][name], "pruned": scores["pruned"][name]} for name in scores["dense"]
        }
    metrics["sparsity"] = sparsity_report(records)
    metrics["timings"] = timings
    metrics["config"] = to_flat(cfg)  # flat names, as older runs stored them
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
