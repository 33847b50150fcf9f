"""Benchmark of zero-shot task scoring: batched rows against one row at a time.

Scores the task sample files (../shared/data/task-samples: LAMBADA, PIQA, ARC-Easy,
HellaSwag, WinoGrande, BoolQ, StoryCloze; 20 items each) with the real embedded model
(SmolLM2-135M, `stages.models.resolve_model`) through `stages.tasks.score_items`, once
with `batch_size=1` and once with `batch_size=B`, and prints items/s, requests/s,
forward passes, padded tokens and the speed-up, plus the largest log-likelihood
difference between the two runs. Figures only; nothing is asserted.

    python benchmarks/bench_tasks.py                    # B = 16, every sample item
    python benchmarks/bench_tasks.py --batch-size 32 --limit 5 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.models import DEFAULT_MODEL, max_positions, resolve_model
from stages.perplexity import causal_lm_forward
from stages.tasks import load_task, score_items

SAMPLES = Path(os.environ.get("SPARSEGPT_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data")) / "task-samples"
FILES = {
    "lambada": "lambada_test.jsonl",
    "piqa": "piqa_valid.jsonl",
    "arc_easy": "ARC-Easy-Dev.jsonl",
    "hellaswag": "hellaswag_val_6lines.txt",
    "winogrande": "winogrande_dev.jsonl",
    "boolq": "boolq_dev.jsonl",
    "storycloze": "storycloze_val_spring2016.csv",
}


def timed(forward, tok, items, batch_size: int, max_length: int | None) -> tuple[float, list, dict]:
    """(seconds, scores, {"forwards", "tokens", "padded"}) of scoring ``items`` in batches of ``batch_size`` rows."""
    stats = {"forwards": 0, "tokens": 0, "padded": 0}

    def counting(ids: torch.Tensor) -> torch.Tensor:
        stats["forwards"] += 1
        stats["padded"] += ids.numel()
        return forward(ids)

    t0 = time.perf_counter()
    scores = score_items(counting, tok, items, batch_size=batch_size, max_length=max_length)
    return time.perf_counter() - t0, scores, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--limit", type=int, default=None, help="items per task (all 20 by default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if not SAMPLES.is_dir():
        raise SystemExit(f"task samples not found at {SAMPLES}; set SPARSEGPT_DATA_DIR")

    model_dir = resolve_model(args.model)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    forward, max_length = causal_lm_forward(model), max_positions(model.config)
    items = [it for name, f in FILES.items() for it in load_task(f"{name}={SAMPLES / f}", args.limit)]
    nreq = sum(len(it.requests) for it in items)
    print(f"model {args.model} on {args.device}, torch threads {torch.get_num_threads()}; "
          f"{len(items)} items, {nreq} requests from {len(FILES)} tasks")
    timed(forward, tok, items[:4], args.batch_size, max_length)  # warm-up
    results = {}
    for bs in (1, args.batch_size):
        seconds, scores, stats = timed(forward, tok, items, bs, max_length)
        results[bs] = (seconds, scores)
        print(f"batch {bs:3d}: {seconds:7.2f} s  {len(items) / seconds:7.2f} items/s  {nreq / seconds:7.2f} requests/s  "
              f"{stats['forwards']} forwards, {stats['padded']} padded tokens")
    (t1, s1), (tb, sb) = results[1], results[args.batch_size]
    diff = max(abs(a - b) for x, y in zip(s1, sb) for a, b in zip(x.lls, y.lls))
    same = sum(x.pred == y.pred and x.pred_norm == y.pred_norm for x, y in zip(s1, sb))
    print(f"speed-up batch {args.batch_size} vs 1: {t1 / tb:.2f}x; max |loglik difference| {diff:.2e}, "
          f"same predictions on {same}/{len(items)} items")


if __name__ == "__main__":
    main()
