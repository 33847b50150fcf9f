"""Benchmark of the whole `sparsegpt prune` job against the authors'-style yardstick.

1. Quality and cost on the embedded default model (SmolLM2-135M): SparseGPT 50% and
   2:4 with this project's CLI and with `baseline_authors.py` (whole model and all
   activations in memory, one Hessian per layer, the paper's column loop), same
   calibration and evaluation windows. Prints perplexities, wall time of each whole
   process, its stages, and peak resident memory (GNU time's max RSS); ours also runs a second
   time with `--eval none` for its time without evaluation (the yardstick's: its wall less its two
   evaluations, which hold all its evaluation work); `--modes default,sequential` adds
   `--sequential` runs side by side.
2. Memory vs depth: random-init Llama configs of 8 and 32 blocks (hidden 1024),
   pruned by the CLI without evaluation; prints each process's peak RSS.
3. Compute dtype: SparseGPT 50% with `--dtype float32` and `--dtype bfloat16` on the CPU,
   same data; prints both pruned perplexities and their ratio (the target: within 3%).
4. Seeds (not in "all"): part 1's pruned perplexities, ours and the yardstick's, for each calibration
   seed of `--seeds` (the same 32 x 512 sampler in both), and the spread of their ratio: how far a
   ratio of one seed can be read. Ours evaluates the dense model once (its cache); no timings.

    python benchmarks/bench_pipeline.py                       # both parts, defaults of the issue
    python benchmarks/bench_pipeline.py --part quality --eval-windows 40 [--setting 50%] [--modes default,sequential]
    python benchmarks/bench_pipeline.py --part depth [--depth-args "--reconstruct"]
    python benchmarks/bench_pipeline.py --part dtype [--eval-windows 40]
    python benchmarks/bench_pipeline.py --part seeds --setting 2:4 --modes default,sequential --seeds 0,1,2,3

Needs ../shared/data/wikitext2 (or --wikitext DIR) for part 1.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for tests.conftest's tiny tokenizer when run as a script
# Perplexities of the authors' own code on this setting (dense, 50%, 2:4), as measured for the issue.
AUTHORS = {"dense": 29.19, "50%": 50.83, "2:4": 82.73}
SETTINGS = (("50%", ["--sparsity", "0.5"]), ("2:4", ["--nm", "2:4"]))
"""The quality and seeds parts' settings: a label and its prune options (the same for the yardstick)."""


def timed_process(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``cmd`` under GNU time; return (wall seconds, peak RSS MiB, stdout)."""
    stats = log.with_suffix(".time")
    t0 = time.perf_counter()
    out = subprocess.run(
        ["/usr/bin/time", "-f", "%e %M", "-o", str(stats), *cmd], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - t0
    log.write_text(out.stdout + "\n--- stderr ---\n" + out.stderr)
    if out.returncode != 0:
        sys.exit(f"command failed ({out.returncode}), see {log}: {' '.join(cmd)}")
    _, rss_kb = stats.read_text().split()[-2:]
    return wall, int(rss_kb) / 1024, out.stdout


def quality(args: argparse.Namespace, work: Path) -> None:
    calib = f"wikitext2={args.wikitext / 'wiki.valid.raw'}"
    evals = f"wikitext2={args.wikitext / 'wiki.test.raw'}"
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    windows = ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    print(
        f"SmolLM2-135M, calib {args.nsamples}x{args.seqlen} WikiText-2 valid, eval WikiText-2 test "
        f"{args.eval_windows or 'all'} windows x {args.seqlen}, CPU"
    )
    print(f"{'setting':<8} {'who':<10} {'dense':>7} {'pruned':>8} {'authors':>8} {'wall s':>8} {'peak MiB':>9}  stages")
    from stages.model.checkpoint import resolve_model

    model_dir = resolve_model("smollm2-135m")
    for label, opt in (s for s in SETTINGS if args.setting in ("both", s[0])):
        ours = {mode: _ours(args, work, label, opt, mode, calib, evals, common + windows) for mode in args.modes}
        bwall, brss, b = _yardstick(model_dir, calib, evals, [*common, *windows, *opt], work / f"base-{label[:2]}.log")
        stages = " ".join(f"{k} {v:.0f}" for k, v in b["seconds"].items())
        print(
            f"{label:<8} {'yardstick':<10} {b['dense_ppl']:7.2f} {b['ppl']:8.2f} {AUTHORS[label]:8.2f} {bwall:8.1f} "
            f"{brss:9.0f}  {stages}"
        )
        bprune = bwall - b["seconds"]["dense_eval"] - b["seconds"]["pruned_eval"]
        for mode, (wall, rss, ppl, no_eval) in ours.items():
            print(
                f"{label:<8} {mode} / yardstick: wall {wall / bwall:.2f}, without evaluation {no_eval / bprune:.2f} "
                f"({no_eval:.0f} s vs {bprune:.0f} s), peak memory {rss / brss:.2f}, pruned ppl "
                f"{ppl / b['ppl']:.4f}x the yardstick's (authors' figure {100 * (ppl / AUTHORS[label] - 1):+.2f}%)"
            )


def _yardstick(model_dir: Path, calib: str, evals: str, extra: list[str], log: Path) -> tuple[float, float, dict]:
    """`baseline_authors.py` on ``model_dir`` as its own process: (wall s, peak MiB, its JSON result line)."""
    cmd = [sys.executable, "-m", "benchmarks.baseline_authors", str(model_dir), "--calib", calib, "--eval", evals]
    wall, rss, out = timed_process(cmd + extra, log)
    return wall, rss, json.loads(out.strip().splitlines()[-1])


def _prune_cmd(calib: str, opt: list[str], mode: str) -> list[str]:
    """This project's `sparsegpt prune` of SmolLM2-135M with ``opt`` in ``mode`` (default or sequential)."""
    cmd = [sys.executable, "-m", "flows.cli", "prune", "smollm2-135m", "--calib", calib, "--no-progress", *opt]
    return cmd + (["--sequential"] if mode == "sequential" else [])


def _ours(
    args: argparse.Namespace, work: Path, label: str, opt: list[str], mode: str, calib: str, evals: str, common: list
) -> tuple[float, float, float, float]:
    """Two `sparsegpt prune` processes of the quality part, one with and one without evaluation (the
    "without evaluation" figure is that second process's wall time, start-up included, not the first's
    wall less its evaluation timings: the evaluate task also loads models and tokenizes the windows).
    Prints their line; returns (wall with evaluation, peak MiB, pruned ppl, wall without evaluation)."""
    name = f"{label.replace(':', '-').replace('%', '')}-{mode}"
    base = _prune_cmd(calib, ["--no-cache", *common, *opt], mode)
    run_dir = work / f"run-{name}"
    cmd = base + ["--run-dir", str(run_dir), "--eval", evals]  # each evaluates the dense model itself
    wall, rss, _ = timed_process(cmd, work / f"ours-{name}.log")
    no_eval, _, _ = timed_process(
        base + ["--run-dir", str(work / f"run-{name}-noeval"), "--eval", "none"], work / f"ours-{name}-noeval.log"
    )
    m = json.loads((run_dir / "eval" / "metrics.json").read_text())
    w = m["wikitext2"]
    stages = " ".join(f"{k} {v:.0f}" for k, v in m["timings"].items())
    evaluation = w["seconds"] + w["dense_seconds"]
    print(
        f"{label:<8} {mode:<10} {w['dense_ppl']:7.2f} {w['ppl']:8.2f} {AUTHORS[label]:8.2f} "
        f"{wall:8.1f} {rss:9.0f}  {stages} eval {evaluation:.0f}; --eval none: {no_eval:.1f} s"
    )
    return wall, rss, w["ppl"], no_eval


def dtype(args: argparse.Namespace, work: Path) -> None:
    """SparseGPT 50% on SmolLM2-135M with --dtype float32 and bfloat16 on this CPU: the half-precision
    path a GPU takes (blocks, activations and evaluation in bf16; Hessians and solves in fp32)."""
    calib = f"wikitext2={args.wikitext / 'wiki.valid.raw'}"
    evals = f"wikitext2={args.wikitext / 'wiki.test.raw'}"
    windows = ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    print(f"SmolLM2-135M 50%, calib {args.nsamples}x{args.seqlen} WikiText-2 valid, CPU, by compute dtype")
    ppl = {}
    for name in ("float32", "bfloat16"):
        run_dir = work / f"run-{name}"
        cmd = [sys.executable, "-m", "flows.cli", "prune", "smollm2-135m", "--run-dir", str(run_dir)]
        cmd += ["--calib", calib, "--eval", evals, "--no-progress", "--sparsity", "0.5", "--dtype", name]
        cmd += ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), *windows]
        wall, rss, _ = timed_process(cmd, work / f"dtype-{name}.log")
        w = json.loads((run_dir / "eval" / "metrics.json").read_text())["wikitext2"]
        ppl[name] = w["ppl"]
        print(f"{name:<9} dense {w['dense_ppl']:7.2f}  pruned {w['ppl']:7.2f}  wall {wall:7.1f} s  peak {rss:6.0f} MiB")
    print(f"pruned perplexity bf16 vs fp32: {100 * (ppl['bfloat16'] / ppl['float32'] - 1):+.2f}% (target within 3%)")


def depth(args: argparse.Namespace, work: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tests.conftest import tiny_tokenizer

    peaks = {}
    for n in (8, 32):
        model_dir = work / f"llama-{n}"
        torch.manual_seed(0)
        cfg = LlamaConfig(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=n,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=2048,
        )
        AutoModelForCausalLM.from_config(cfg).save_pretrained(model_dir)
        tiny_tokenizer().save_pretrained(model_dir)
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "prune",
            str(model_dir),
            "--run-dir",
            str(work / f"run-depth-{n}"),
            "--calib",
            "pydoc",
            "--nsamples",
            str(args.depth_nsamples),
            "--seqlen",
            "256",
            "--no-progress",
            *shlex.split(args.depth_args),
        ]
        wall, rss, _ = timed_process(cmd, work / f"depth-{n}.log")
        peaks[n] = rss
        size_mib = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
        print(
            f"random Llama, hidden 1024, {n:2d} blocks ({size_mib:.0f} MiB "
            f"of weights): wall {wall:.1f} s, peak RSS {rss:.0f} MiB"
        )
        shutil.rmtree(model_dir)
    print(f"peak RSS 32 vs 8 blocks: {100 * (peaks[32] / peaks[8] - 1):+.1f}%")


def seeds(args: argparse.Namespace, work: Path) -> None:
    calib = f"wikitext2={args.wikitext / 'wiki.valid.raw'}"
    evals = f"wikitext2={args.wikitext / 'wiki.test.raw'}"
    common = ["--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    common += ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    from stages.model.checkpoint import resolve_model

    model_dir = resolve_model("smollm2-135m")
    print(
        f"SmolLM2-135M, calib {args.nsamples}x{args.seqlen} WikiText-2 valid by seed, eval WikiText-2 test "
        f"{args.eval_windows or 'all'} windows x {args.seqlen}, CPU; pruned perplexity"
    )
    for label, opt in (s for s in SETTINGS if args.setting in ("both", s[0])):
        print(f"{'setting':<8} {'seed':>4} {'yardstick':>10} " + " ".join(f"{m:>10} {'ratio':>7}" for m in args.modes))
        ratios: dict[str, list[float]] = {mode: [] for mode in args.modes}
        for seed in args.seeds:
            seeded = ["--seed", str(seed), *common, *opt]
            base = _yardstick(model_dir, calib, evals, seeded, work / f"seed-base-{seed}.log")[2]["ppl"]
            line = f"{label:<8} {seed:>4} {base:10.2f}"
            for mode in args.modes:
                run_dir = work / f"seed-{label.replace(':', '-').replace('%', '')}-{mode}-{seed}"
                cmd = _prune_cmd(calib, ["--run-dir", str(run_dir), "--eval", evals, *seeded], mode)
                timed_process(cmd, work / f"{run_dir.name}.log")
                ppl = json.loads((run_dir / "eval" / "metrics.json").read_text())["wikitext2"]["ppl"]
                ratios[mode].append(ppl / base)
                line += f" {ppl:10.2f} {ppl / base:7.4f}"
            print(line, flush=True)
        for mode, r in ratios.items():
            mean = sum(r) / len(r)
            print(f"{label:<8} {mode}: ratio to the yardstick mean {mean:.4f}, least {min(r):.4f}, most {max(r):.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("quality", "depth", "dtype", "seeds", "all"), default="all")
    p.add_argument("--wikitext", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext2")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--depth-nsamples", type=int, default=8)
    p.add_argument("--depth-args", default="", help='part 2: more prune options, e.g. "--reconstruct"')
    p.add_argument("--setting", choices=("50%", "2:4", "both"), default="both", help="part 1: which pruning settings")
    p.add_argument(
        "--modes",
        type=lambda v: v.split(","),
        default=["default"],
        help="part 1: comma-separated modes of this project's prune, of default and sequential (--sequential)",
    )
    p.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=[0, 1, 2, 3], help="part 4: seeds")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, run dirs)")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    try:
        if args.part in ("quality", "all"):
            quality(args, work)
        if args.part in ("depth", "all"):
            depth(args, work)
        if args.part in ("dtype", "all"):
            dtype(args, work)
        if args.part == "seeds":
            seeds(args, work)
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
