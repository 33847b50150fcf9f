"""Data-parallel pruning (`--nproc`) against one process: quality, per-block time split, and a projection.

Prunes the model three ways in this process's run directories (no Prefect), same calibration:
one process (`prune_one`, the reference), and the data-parallel path (`stages.prune.parallel`)
with each rank count of `--ranks` (gloo on this CPU; every rank gets cores / ranks threads). For
each it prints the prune stage's wall time, the per-block split of rank 0's time (read: boundary
and block loading; hessians: the dense forward over its windows with the Hessian products;
all_reduce; solve: its share of the layer solves; broadcast: the weights from their ranks, which
includes waiting for the rank with the most solve work; forward: the pruned block over its
windows into its shards; write: the manifest, hashing every shard once, and the block), the
largest weight difference and the mask agreement against the reference, and the perplexity on
the first `--eval-windows` WikiText-2 test windows (the issue's bound: within 0.5% of one process).

Then a model of 8 GPUs on Llama-2-70B at 128 x 2048 calibration tokens, from FLOP and byte counts
(stated below, not measured here): forwards and Hessian products split by 8, the solves split by
cost and bounded by the largest one (down_proj), ring all-reduce of the Hessians and broadcast of
the weights over NVLink.

    python benchmarks/bench_parallel.py                      # SmolLM2-135M, WikiText-2 valid 32 x 512, ranks 2
    python benchmarks/bench_parallel.py --nsamples 16 --seqlen 128 --eval-windows 8

Run it alone on the machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from stages.config import PruneConfig  # noqa: E402
from stages.evaluate.evaluate import blockwise_perplexity  # noqa: E402
from stages.evaluate.perplexity import eval_windows  # noqa: E402
from stages.model.models import load_tokenizer  # noqa: E402
from stages.prune.oneshot import OneshotSteps, run_steps  # noqa: E402
from stages.prune.parallel import assign, prune_blocks_parallel  # noqa: E402
from stages.run.rundir import RunLock  # noqa: E402

PARTS = ("read", "hessians", "all_reduce", "solve", "broadcast", "forward", "write")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted((run_dir / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def prune(cfg: PruneConfig, parallel: bool) -> float:
    """Prune into cfg.run_dir (fresh); return the prune stage's seconds."""
    shutil.rmtree(cfg.run_dir, ignore_errors=True)
    steps = OneshotSteps(prune_blocks=prune_blocks_parallel) if parallel else OneshotSteps()
    timings: dict[str, float] = {}
    with RunLock(cfg.run_dir):
        run_steps(cfg, steps, timings)
    return timings["prune"]


def split(run_dir: Path) -> dict[str, float]:
    """Mean seconds per block of each part of rank 0's time."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "blocks").glob("block_*.json"))]
    return {k: statistics.mean(r["rank0_seconds"].get(k, 0.0) for r in records) for k in PARTS}


def projection() -> None:
    """8 GPUs on Llama-2-70B, from counts: one block of 80, 128 x 2048 tokens, bf16 forwards, fp32 solves."""
    hidden, inter, kv, tokens, ranks = 8192, 28672, 1024, 128 * 2048, 8
    layers = {  # (out, in)
        "q": (hidden, hidden),
        "k": (kv, hidden),
        "v": (kv, hidden),
        "o": (hidden, hidden),
        "gate": (inter, hidden),
        "up": (inter, hidden),
        "down": (hidden, inter),
    }
    params = sum(o * i for o, i in layers.values())
    fwd_flops = 2 * 2 * params * tokens  # two passes (Hessians, outputs), 2 flops per multiply-add
    hess_flops = sum(2 * tokens * i * i for i in (hidden, hidden, hidden, inter))  # X^T X per distinct input
    solve = {n: 2 * o * i * i + 2 * i**3 for n, (o, i) in layers.items()}  # lazy updates + Cholesky work
    hessian_bytes = 4 * (hidden * hidden * 3 + inter * inter)  # q/k/v, o, gate/up, down in fp32
    tf_bf16, tf_fp32, nvlink = 400e12, 50e12, 150e9  # sustained H100 rates assumed, bytes/s per GPU
    one = fwd_flops / tf_bf16 + hess_flops / tf_fp32 + sum(solve.values()) / tf_fp32
    owner = assign(solve, ranks)
    worst = max(sum(c for n, c in solve.items() if owner[n] == r) for r in range(ranks))
    comm = 2 * (ranks - 1) / ranks * hessian_bytes / nvlink + 2 * params / nvlink
    eight = (fwd_flops / tf_bf16 + hess_flops / tf_fp32) / ranks + worst / tf_fp32 + comm
    print("\nProjection, Llama-2-70B block (1 of 80), 128 x 2048 tokens, H100s at 400 TFLOP/s bf16,")
    print("50 TFLOP/s fp32 solves, 150 GB/s NVLink (assumed rates, not measured here):")
    print(
        f"  1 GPU: forward+Hessians {(fwd_flops / tf_bf16 + hess_flops / tf_fp32):.2f} s, solves "
        f"{sum(solve.values()) / tf_fp32:.2f} s -> {one:.2f} s/block, {80 * one / 60:.1f} min per model"
    )
    print(
        f"  8 GPUs: forward+Hessians {(fwd_flops / tf_bf16 + hess_flops / tf_fp32) / ranks:.2f} s, solves "
        f"{worst / tf_fp32:.2f} s (down_proj alone: {solve['down'] / tf_fp32:.2f} s), all-reduce + broadcast "
        f"{comm:.3f} s -> {eight:.2f} s/block, speedup {one / eight:.2f}x"
    )
    print(
        "  The largest solve (down_proj, in = 28672) bounds the split: splitting one layer's columns "
        "across ranks is what would go further."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--wikitext", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--ranks", default="2", help="rank counts to run besides one process, e.g. 1,2")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_parallel")
    args = p.parse_args()
    calib = f"wikitext2={args.wikitext / 'wiki.valid.raw'}" if args.wikitext.is_dir() else "pydoc"
    evals = f"wikitext2={args.wikitext / 'wiki.test.raw'}" if args.wikitext.is_dir() else "pydoc"
    base = PruneConfig.of(
        model=args.model,
        run_dir=str(args.work / "one"),
        calib=calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        progress=False,
        cache=False,
    )
    runs = {"1 process": (base, False)}
    for r in (int(x) for x in args.ranks.split(",")):
        runs[f"{r} rank{'s' if r > 1 else ''}"] = (base.updated(run_dir=str(args.work / f"ranks{r}"), nproc=r), True)
    print(f"{args.model}, calibration {calib} {args.nsamples} x {args.seqlen}, {torch.get_num_threads()} threads")
    results, ref = {}, None
    for label, (cfg, parallel) in runs.items():
        t = prune(cfg, parallel)
        w = weights(Path(cfg.run_dir))
        ref = ref or w
        diff = max(float((w[k].float() - ref[k].float()).abs().max()) for k in ref)
        agree = sum(int(((w[k] == 0) == (ref[k] == 0)).sum()) for k in ref) / sum(v.numel() for v in ref.values())
        model = Path(cfg.run_dir) / "model"
        ids = eval_windows(load_tokenizer(model), evals, args.seqlen, args.eval_windows)
        ppl = blockwise_perplexity(model, ids, "cpu", torch.float32, 8, False, label).ppl
        results[label] = (t, diff, agree, ppl, split(Path(cfg.run_dir)) if parallel else None)
        print(f"  {label}: prune stage {t:.1f} s, ppl {ppl:.3f}", flush=True)
    t1, _, _, p1, _ = results["1 process"]
    print("\n| run | prune stage s | vs 1 process | ppl | ppl vs 1 process | max weight diff | masks agree |")
    print("|---|---|---|---|---|---|---|")
    for label, (t, diff, agree, ppl, _) in results.items():
        print(f"| {label} | {t:.1f} | {t / t1:.2f}x | {ppl:.3f} | {ppl / p1:.4f} | {diff:.2e} | {agree:.5f} |")
    print("\nPer block, rank 0's seconds (mean over blocks):")
    print("| run | " + " | ".join(PARTS) + " | total |")
    print("|---|" + "---|" * (len(PARTS) + 1))
    for label, (*_, parts) in results.items():
        if parts:
            print(f"| {label} | " + " | ".join(f"{parts[k]:.3f}" for k in PARTS) + f" | {sum(parts.values()):.3f} |")
    projection()


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\nbench_parallel: {time.perf_counter() - t0:.0f} s")
