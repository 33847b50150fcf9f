"""Benchmark of zero-shot task scoring: token tries (shared prefixes) against one request at a time.

Scores the task sample files (../shared/data/task-samples: LAMBADA, PIQA, ARC-Easy,
HellaSwag, WinoGrande, BoolQ, StoryCloze; 20 items each) with the real embedded model
(SmolLM2-135M, `stages.model.checkpoint.resolve_model`) in up to three ways:

- naive: one request at a time, every request its own forward over its whole context +
  continuation with full logits (the plain reference, written out here);
- rows (`--rows`): `stages.evaluate.tasks.zeroshot.score_items` on a `Forward` (`causal_lm_forward`), i.e.
  full rows in length-aware batches of B with full logits, as before prefix sharing;
- shared: `stages.evaluate.tasks.zeroshot.score_items` on the model: each item's rows as one token trie
  (every distinct token once, a 4D mask keeping each row to its own tokens), several
  items' tries packed into each of at most B batch rows, logits only at continuation
  positions (`stages.evaluate.tasks.scoring`).

Prints items/s, requests/s, forward passes, input tokens and output-head rows of each,
the speed-ups against naive, and the largest log-likelihood difference and prediction
agreement against naive. Figures only; nothing is asserted. Runs with `--threads` torch
threads (1 by default) because the machine may be shared; run it under `nice`.

    nice -n 19 python benchmarks/bench_tasks.py              # B = 16, every sample item
    python benchmarks/bench_tasks.py --batch-size 32 --limit 5 --rows --device cuda
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's stages, not an editable install's (e.g. from a git worktree)

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.evaluate.perplexity import causal_lm_forward
from stages.evaluate.tasks.zeroshot import ItemScore, choice_length, encode_pair, load_task, score_items
from stages.model.checkpoint import DEFAULT_MODEL, resolve_model
from stages.model.models import max_positions

SAMPLES = Path(os.environ.get("SPARSEGPT_DATA_DIR", ROOT.parent / "shared" / "data")) / "task-samples"
FILES = {
    "lambada": "lambada_test.jsonl",
    "piqa": "piqa_valid.jsonl",
    "arc_easy": "ARC-Easy-Dev.jsonl",
    "hellaswag": "hellaswag_val_6lines.txt",
    "winogrande": "winogrande_dev.jsonl",
    "boolq": "boolq_dev.jsonl",
    "storycloze": "storycloze_val_spring2016.csv",
}


@torch.inference_mode()
def naive(model, tok, items, max_length: int) -> list[ItemScore]:
    """One forward per request over its whole (truncated) context + continuation, full logits."""
    device = next(model.parameters()).device
    scores = []
    for item in items:
        lls, greedy = [], []
        for context, continuation in item.requests:
            ctx, cont = encode_pair(tok, context, continuation)
            whole = (ctx + cont)[-(max_length + 1) :]
            logits = model(input_ids=torch.tensor([whole[:-1]], device=device), use_cache=False).logits[0]
            logprobs = torch.log_softmax(logits[-len(cont) :].float(), dim=-1)  # (contlen, vocab)
            target = torch.tensor(cont, device=device)
            lls.append(float(logprobs.gather(1, target[:, None]).sum()))
            greedy.append(bool((logprobs.argmax(dim=-1) == target).all()))
        normed = [ll / max(choice_length(c), 1) for ll, c in zip(lls, item.choices, strict=True)]
        scores.append(ItemScore(tuple(lls), tuple(greedy), lls.index(max(lls)), normed.index(max(normed))))
    return scores


def counting(model) -> tuple[dict, list]:
    """{"forwards", "tokens", "logits"} of `model`'s forwards (hooks to remove afterwards)."""
    stats = {"forwards": 0, "tokens": 0, "logits": 0}

    def on_forward(module, args, kwargs):
        stats["forwards"] += 1
        stats["tokens"] += kwargs["input_ids"].numel()

    def on_head(module, args):
        stats["logits"] += args[0].numel() // args[0].shape[-1]

    return stats, [
        model.register_forward_pre_hook(on_forward, with_kwargs=True),
        model.get_output_embeddings().register_forward_pre_hook(on_head),
    ]


def timed(run, model) -> tuple[float, float, list[ItemScore], dict]:
    """(wall seconds, CPU seconds of this process, scores, counts) of `run()`."""
    stats, hooks = counting(model)
    t0, c0 = time.perf_counter(), time.process_time()
    scores = run()
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    for h in hooks:
        h.remove()
    return seconds, cpu, scores, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="items per task (all 20 by default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine may be shared)")
    parser.add_argument(
        "--rows", action="store_true", help="also time full rows in batches (the path before prefix sharing)"
    )
    args = parser.parse_args()
    if not SAMPLES.is_dir():
        raise SystemExit(f"task samples not found at {SAMPLES}; set SPARSEGPT_DATA_DIR")
    torch.set_num_threads(args.threads)

    model_dir = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    max_length = max_positions(model.config)
    tasks = {name: load_task(f"{name}={SAMPLES / f}", args.limit) for name, f in FILES.items()}
    items = [it for its in tasks.values() for it in its]
    nreq = sum(len(it.requests) for it in items)
    print(
        f"model {args.model} on {args.device}, torch threads {torch.get_num_threads()}, nice {os.nice(0)}, "
        f"load average {os.getloadavg()[0]:.2f} at start (shared machine: figures are indicative); "
        f"{len(items)} items, {nreq} requests from {len(FILES)} tasks, scored task by task as evaluate_tasks does; "
        f"batch size {args.batch_size}"
    )
    runs = {"naive": lambda its: naive(model, tok, its, max_length)}
    if args.rows:
        runs["rows"] = lambda its: score_items(causal_lm_forward(model), tok, its, args.batch_size, max_length)
    runs["shared"] = lambda its: score_items(model, tok, its, args.batch_size, max_length)
    for run in runs.values():
        run([its[0] for its in tasks.values()])  # warm-up (and the shared path's one-off probe of the model)
    per_task: dict[str, dict[str, tuple]] = {name: {} for name in runs}
    for task, its in tasks.items():
        for name, run in runs.items():
            per_task[name][task] = timed(lambda run=run, its=its: run(its), model)
        line = "  ".join(f"{name} {per_task[name][task][0]:6.2f} s" for name in runs)
        print(
            f"{task:>10}: {len(its):3d} items  {line}  "
            f"speed-up {per_task['naive'][task][0] / per_task['shared'][task][0]:5.2f}x"
        )
    results = {}
    for name in runs:
        parts = per_task[name].values()
        seconds, cpu = sum(p[0] for p in parts), sum(p[1] for p in parts)
        scores = [s for p in parts for s in p[2]]
        stats = {k: sum(p[3][k] for p in parts) for k in ("forwards", "tokens", "logits")}
        results[name] = (seconds, cpu, scores)
        print(
            f"{name:>10}: {seconds:7.2f} s wall ({cpu:7.2f} s CPU)  {len(items) / seconds:5.2f} items/s  "
            f"{nreq / seconds:5.2f} requests/s  {stats['forwards']:4d} forwards  {stats['tokens']:6d} input tokens  "
            f"{stats['logits']:6d} logit rows"
        )
    t0, c0, ref = results["naive"]
    for name, (seconds, cpu, scores) in results.items():
        if name == "naive":
            continue
        diff = max(abs(a - b) for x, y in zip(ref, scores, strict=True) for a, b in zip(x.lls, y.lls, strict=True))
        greedy = sum(a == b for x, y in zip(ref, scores, strict=True) for a, b in zip(x.greedy, y.greedy, strict=True))
        same = sum(x.pred == y.pred and x.pred_norm == y.pred_norm for x, y in zip(ref, scores, strict=True))
        print(
            f"{name:>10} vs naive: {t0 / seconds:.2f}x faster ({c0 / cpu:.2f}x in CPU time); max |loglik difference| "
            f"{diff:.2e}, same greedy flags on {greedy}/{nreq} requests, same predictions (acc, acc_norm) on "
            f"{same}/{len(items)} items"
        )


if __name__ == "__main__":
    main()
