"""Benchmark: progressive prune-and-finetune vs one-shot SparseGPT on the embedded default model.

Runs `sparsegpt progressive smollm2-135m` over a schedule (default 0.5,0.6,0.7,0.8),
fine-tuning every round on a local C4 sample with logits-KL distillation from the
dense model, and `sparsegpt prune` one-shot from the dense model at every target of
the schedule, all with the same calibration (WikiText-2 valid) and evaluation windows
(WikiText-2 test). Prints, per round: one-shot perplexity, progressive perplexity
before and after fine-tuning, and the two targets of the issue:

- the last round's perplexity is at most half of one-shot's at the same sparsity;
- every round's perplexity (after fine-tuning) is below one-shot's at the same sparsity.

Finished run directories are reused (both commands resume), so an interrupted
benchmark continues where it stopped; delete runs/bench-* to measure from scratch.

    python benchmarks/bench_progressive.py                                  # the issue's setting
    python benchmarks/bench_progressive.py --tokens-per-round 65536 --schedule 0.5,0.6,0.7,0.8,0.9 --device cuda
    python benchmarks/bench_progressive.py --recovery reconstruct --schedule 0.5,0.6,0.7,0.8,0.9

It also prints the progressive call's peak resident memory per parameter of the model (whole-model
distillation holds the student, its gradients, Adam's moments and the teacher; `--recovery reconstruct`
one block).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def run(cmd: list[str], log: Path) -> float:
    """Run a CLI command (output to ``log``, its peak RSS to ``log``.rss under GNU time); return its wall time."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        timed = ["/usr/bin/time", "-f", "%M", "-o", str(log.with_suffix(".rss")), *cmd]
        proc = subprocess.run(timed, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        sys.exit(f"command failed ({proc.returncode}), see {log}: {' '.join(cmd)}")
    return time.perf_counter() - t0


def peak_rss(log: Path) -> int:
    """Peak resident memory in bytes of the command that wrote ``log``."""
    return int(log.with_suffix(".rss").read_text().split()[-1]) * 1024


def parameters(model: str) -> int:
    """Parameter count of a checkpoint, from its safetensors headers."""
    sys.path.insert(0, str(ROOT))
    from stages.model.checkpoint import parameter_count, resolve_model

    return parameter_count(resolve_model(model))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--schedule", default="0.5,0.6,0.7,0.8")
    p.add_argument("--tokens-per-round", type=int, default=16384)
    p.add_argument("--micro-batch-size", type=int, default=1)
    p.add_argument("--finetune-seqlen", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--squarehead-weight", type=float, default=0.0, help="SquareHead block-MSE weight (logits KL is 1)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--wikitext", type=Path, default=DATA / "wikitext2")
    p.add_argument("--c4", type=Path, default=DATA / "c4" / "c4_validation_2k.jsonl")
    p.add_argument("--prefix", default="runs/bench", help="run directories are PREFIX-progressive, PREFIX-oneshot-S")
    p.add_argument("--recovery", choices=("distill", "reconstruct", "both"), default="distill")
    p.add_argument("--progressive-args", default="", help='more progressive options, e.g. "--gradient-checkpointing"')
    args = p.parse_args()

    cli = [sys.executable, "-m", "flows.cli"]
    calib = [
        "--calib",
        f"wikitext2={args.wikitext / 'wiki.valid.raw'}",
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
    ]
    evals = [
        "--eval",
        f"wikitext2={args.wikitext / 'wiki.test.raw'}",
        "--eval-windows",
        str(args.eval_windows),
        "--device",
        args.device,
        "--no-progress",
    ]
    logs = ROOT / f"{args.prefix}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(
        f"SmolLM2-135M on {args.device}; calibration {args.nsamples}x{args.seqlen} WikiText-2 valid per round; "
        f"eval WikiText-2 test, first {args.eval_windows} windows x {args.seqlen}"
    )
    print(
        f"fine-tuning budget: {args.tokens_per_round} tokens per round of C4 ({args.c4.name}), micro-batch "
        f"{args.micro_batch_size} x {args.finetune_seqlen}, AdamW lr {args.lr}, cosine, warmup {args.warmup_steps}, "
        f"loss lm + kl" + (f" + {args.squarehead_weight} squarehead" if args.squarehead_weight else ""),
        flush=True,
    )

    suffix = "" if args.recovery == "distill" else f"-{args.recovery}"
    prog_dir = ROOT / f"{args.prefix}-progressive{suffix}"
    wall = run(
        [
            *cli,
            "progressive",
            "smollm2-135m",
            "--run-dir",
            str(prog_dir),
            "--schedule",
            args.schedule,
            *calib,
            "--finetune-data",
            f"c4={args.c4}",
            "--tokens-per-round",
            str(args.tokens_per_round),
            "--micro-batch-size",
            str(args.micro_batch_size),
            "--finetune-seqlen",
            str(args.finetune_seqlen),
            "--lr",
            str(args.lr),
            "--warmup-steps",
            str(args.warmup_steps),
            "--squarehead-weight",
            str(args.squarehead_weight),
            "--recovery",
            args.recovery,
            *shlex.split(args.progressive_args),
            *evals,
        ],
        logs / f"progressive{suffix}.log",
    )
    summary = json.loads((prog_dir / "summary.json").read_text())
    print(f"progressive run: {wall:.0f} s in this call (a resumed run counts only what it redid)", flush=True)
    rss, params = peak_rss(logs / f"progressive{suffix}.log"), parameters("smollm2-135m")
    print(
        f"peak RSS of this call: {rss / 2**30:.2f} GiB = {rss / params:.1f} bytes per parameter "
        f"({params / 1e6:.1f}M parameters; --recovery {args.recovery})",
        flush=True,
    )

    oneshot, oneshot_wall = {}, 0.0
    for row in summary["rounds"]:
        s = row["pattern"]
        run_dir = ROOT / f"{args.prefix}-oneshot-{s}"
        oneshot_wall += run(
            [*cli, "prune", "smollm2-135m", "--run-dir", str(run_dir), "--sparsity", s, *calib, *evals],
            logs / f"oneshot-{s}.log",
        )
        metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
        oneshot[s] = metrics["wikitext2"]["ppl"]
        dense = metrics["wikitext2"]["dense_ppl"]

    label = "wikitext2"
    print(f"\ndense ppl {summary['dense'][label]['ppl']:.2f} (one-shot runs' dense: {dense:.2f})")
    print(
        f"{'round':>5} {'target':>7} {'achieved':>9} {'one-shot':>9} {'prog. before FT':>16} {'prog. after FT':>15} "
        f"{'after/one-shot':>15} {'tokens':>7} {'round s':>8}"
    )
    for row in summary["rounds"]:
        s = row["pattern"]
        after, before = row["ppl_after"][label], row["ppl_before"][label]
        print(
            f"{row['round']:>5} {s:>7} {row['sparsity']:>9.4f} {oneshot[s]:>9.2f} {before:>16.2f} {after:>15.2f} "
            f"{after / oneshot[s]:>15.3f} {row['tokens']:>7} {row['seconds']:>8.0f}"
        )
    rows = summary["rounds"]
    total = sum(r["seconds"] for r in rows)
    stage = {k: sum(r["stage_seconds"][k] for r in rows) for k in ("prune", "finetune", "evaluate")}
    print(
        f"\nprogressive total {total:.0f} s over {len(rows)} rounds (prune {stage['prune']:.0f} s, fine-tune "
        f"{stage['finetune']:.0f} s, evaluate {stage['evaluate']:.0f} s) + dense eval; "
        f"one-shot runs {oneshot_wall:.0f} s"
    )
    last = rows[-1]
    ratio = last["ppl_after"][label] / oneshot[last["pattern"]]
    below = all(r["ppl_after"][label] < oneshot[r["pattern"]] for r in rows)
    print(f"target 1: last round at most half of one-shot: ratio {ratio:.3f} -> {'met' if ratio <= 0.5 else 'NOT met'}")
    print(f"target 2: every round below one-shot: {'met' if below else 'NOT met'}")


if __name__ == "__main__":
    main()
