"""Benchmark of block-wise reconstruction (`sparsegpt prune --reconstruct`) against plain SparseGPT.

For each setting (50%, 70%, 80%, 2:4) it prunes SmolLM2-135M twice with the CLI, plain and with
`--reconstruct` (same calibration windows: WikiText-2 valid 32 x 512; same evaluation: the first 40
WikiText-2 test windows of 512), and prints both perplexities, their ratio against the issue's target,
and the prune stage's wall time with reconstruction as a multiple of the plain one (same machine, same
run of this script). Run directories live in the work folder (default `runs/bench_reconstruct`): a
rerun resumes unfinished runs and reads finished ones back, so an interrupted benchmark loses at most
one block of work. Do not run two torch jobs at once while this runs: the time ratio is the yardstick.

    python benchmarks/bench_reconstruct.py                          # all settings, --reconstruct defaults
    python benchmarks/bench_reconstruct.py --setting 70% --target dense-block
    python benchmarks/bench_reconstruct.py --extra=--reconstruct-lr=3e-3 --tag lr3e-3

Needs ../shared/data/wikitext2 (or --wikitext DIR).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "50%": ["--sparsity", "0.5"],
    "70%": ["--sparsity", "0.7"],
    "80%": ["--sparsity", "0.8"],
    "2:4": ["--nm", "2:4"],
}
TARGETS = {"50%": 0.95, "70%": 0.6, "80%": 0.5, "2:4": 0.9}
"""The issue's targets: perplexity with reconstruction at most this multiple of plain SparseGPT's."""


def prune(args: argparse.Namespace, run_dir: Path, options: list[str]) -> dict:
    """Run (or resume, or read back) one `sparsegpt prune`; return its metrics.json."""
    metrics = run_dir / "eval" / "metrics.json"
    if not metrics.is_file():
        calib = f"wikitext2={args.wikitext / 'wiki.valid.raw'}"
        evals = f"wikitext2={args.wikitext / 'wiki.test.raw'}"
        cmd = [sys.executable, "-m", "flows.cli", "prune", "smollm2-135m", "--run-dir", str(run_dir)]
        cmd += ["--calib", calib, "--eval", evals, "--eval-windows", str(args.eval_windows), "--no-progress"]
        cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), *options]
        log = run_dir.with_suffix(".log")
        with open(log, "a") as out:
            code = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            sys.exit(f"prune failed ({code}), see {log}")
    return json.loads(metrics.read_text())


def block_losses(run_dir: Path) -> tuple[float, float, int]:
    """Mean normalised MSE of the blocks before and after reconstruction, and how many kept their solve."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "blocks").glob("block_*.json"))]
    rec = [r["reconstruct"] for r in records if "reconstruct" in r]
    if not rec:
        return float("nan"), float("nan"), 0
    return (
        sum(r["before"] for r in rec) / len(rec),
        sum(r["after"] for r in rec) / len(rec),
        sum(r["kept_solved"] for r in rec),
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", choices=(*SETTINGS, "all"), default="all")
    p.add_argument("--target", choices=("dense-stream", "dense-block"), default=None, help="default: the CLI's")
    p.add_argument("--extra", action="append", default=[], help="more prune options for the reconstruct runs")
    p.add_argument("--tag", default="", help="suffix of the reconstruct runs' folders (for --extra variants)")
    p.add_argument("--wikitext", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_reconstruct")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    recon = ["--reconstruct", *args.extra] + (["--reconstruct-target", args.target] if args.target else [])
    name = "recon" + (f"-{args.target}" if args.target else "") + (f"-{args.tag}" if args.tag else "")
    print(
        f"SmolLM2-135M, calib {args.nsamples}x{args.seqlen} WikiText-2 valid, eval the first {args.eval_windows} "
        f"WikiText-2 test windows x {args.seqlen}, CPU; reconstruct options: {' '.join(recon)}"
    )
    print(
        f"{'setting':<8} {'dense':>7} {'plain':>8} {'recon':>8} {'ratio':>6} {'target':>7} {'prune s':>8} "
        f"{'recon s':>8} {'x plain':>7}  block loss before -> after (kept solved)"
    )
    for label in SETTINGS if args.setting == "all" else [args.setting]:
        slug = label.replace(":", "-").replace("%", "")
        plain = prune(args, args.work / f"plain-{slug}", SETTINGS[label])
        ours = prune(args, args.work / f"{name}-{slug}", [*SETTINGS[label], *recon])
        before, after, kept = block_losses(args.work / f"{name}-{slug}")
        pw, rw = plain["wikitext2"], ours["wikitext2"]
        ratio = rw["ppl"] / pw["ppl"]
        tp, tr = plain["timings"]["prune"], ours["timings"]["prune"]
        verdict = "ok" if ratio <= TARGETS[label] else "MISSED"
        print(
            f"{label:<8} {pw['dense_ppl']:7.2f} {pw['ppl']:8.2f} {rw['ppl']:8.2f} {ratio:6.3f} "
            f"{TARGETS[label]:>5.2f} {verdict:<2} {tp:7.0f} {tr:8.0f} {tr / tp:7.2f}  "
            f"{before:.4f} -> {after:.4f} ({kept})",
            flush=True,
        )


if __name__ == "__main__":
    main()
