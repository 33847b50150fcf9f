"""Scale check: the CLI's prune, eval and tasks stages on a random-init checkpoint of a real
model's shape, measured, next to a FLOP and byte model projected to Llama-2-70B and OPT-175B.

1. Writes (or reuses, see benchmarks/scale_ckpt.py) a bf16 checkpoint of `--shape` under
   `--work`, one tensor at a time, as its own process (its time and peak RSS are printed).
2. Runs each stage as its own process of this checkout (`python -m flows.cli`, cwd and
   PYTHONPATH = the repo root, OMP_NUM_THREADS = --threads) on tiny data:
     prune  CKPT --run-dir R --sparsity 0.5 --calib pydoc --nsamples 4 --seqlen 256 [--prune-args ...]
     eval   CKPT --eval pydoc --seqlen 256 --eval-windows 4            (perplexity, block by block)
     tasks  CKPT --tasks piqa=...,arc_easy=... --limit 20               (block by block too)
   and prints per stage: wall time, peak RSS (process tree), peak size of the run directory
   against the checkpoint's, bytes read/written (/proc/PID/io, children included), bytes
   hashed (per block, from the block records' bytes_hashed), and for prune the dtypes of the
   output vs the input checkpoint and what `blocks/` still holds. A stage that fails (an
   OOM kill included) is reported with its exit status and the harness goes on.
3. Prints the measured time per block against the model's prediction for the same shape on
   this CPU (rates measured now), then the projection (benchmarks/scale_model.py).

    python benchmarks/bench_scale.py --shape smollm2-1.7b --blocks 2                 # minutes
    python benchmarks/bench_scale.py --shape llama3-8b --blocks 4 --keep             # ~3 GiB checkpoint
    python benchmarks/bench_scale.py --shape llama3-8b --stages prune --keep         # full depth: hours
    python benchmarks/bench_scale.py --shape opt-6.7b --blocks 2 --prune-args "--nm 2:4"
    python benchmarks/bench_scale.py --shape llama3-8b --stages prune --mem-cap-gib 8   # checkpoint > its RAM

Disk under --work (default /work/scale-work): the checkpoint (llama3-8b full depth: 14 GiB
with the tokenizer's 49k vocabulary), and during prune the run directory: blocks/ in the
checkpoint's dtype, which model/ hard-links, plus model/'s non-block tensors and two
activation boundaries: plan ~30 GiB free for llama3-8b full depth. Without --keep the checkpoint and the run directory
are deleted at the end; with it a rerun reuses the checkpoint (the run directory is always
started afresh so that every figure is measured).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import struct
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import scale_model as sm
from benchmarks.memcap import CapUnavailable, MemoryCap
from benchmarks.scale_ckpt import SHAPES, build_config
from benchmarks.scale_monitor import Measured, dir_bytes, run_measured

GIB = 1 << 30
STAGES = ("prune", "eval", "tasks")
TASK_FILES = {
    "piqa": "piqa_valid.jsonl",
    "arc_easy": "ARC-Easy-Dev.jsonl",
    "arc_challenge": "ARC-Easy-Dev.jsonl",
    "hellaswag": "hellaswag_val_6lines.txt",
    "winogrande": "winogrande_dev.jsonl",
    "boolq": "boolq_dev.jsonl",
    "lambada": "lambada_test.jsonl",
    "storycloze": "storycloze_val_spring2016.csv",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--blocks", type=int, default=None, help="keep the first K decoder blocks (default: full depth)")
    p.add_argument("--work", type=Path, default=Path("/work/scale-work"), help="checkpoints, run dirs, logs")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and run directory for a cheap rerun")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of prune,eval,tasks")
    p.add_argument("--prune-args", default="", help='extra prune options, e.g. "--nm 2:4" or "--method wanda"')
    p.add_argument("--nsamples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--eval-model", choices=("ckpt", "pruned"), default="ckpt", help="what eval and tasks score")
    p.add_argument("--tasks", default="piqa,arc_easy", help=f"task names among {', '.join(TASK_FILES)}")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--task-samples", type=Path, default=ROOT.parent / "shared" / "data" / "task-samples")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every child")
    p.add_argument("--shard-gib", type=float, default=4.0)
    p.add_argument(
        "--mem-cap-gib",
        type=float,
        default=None,
        help="run each stage in a memory cgroup of this size (page cache counted, no swap): "
        "a RAM smaller than the checkpoint",
    )
    p.add_argument("--gpu", choices=sorted(sm.GPUS), default="a100-80gb", help="projection's GPU")
    args = p.parse_args(argv)
    if args.mem_cap_gib is not None and args.mem_cap_gib <= 0:
        p.error(f"--mem-cap-gib must be positive, got {args.mem_cap_gib}")
    bad = set(args.stages.split(",")) - set(STAGES)
    if bad:
        p.error(f"unknown stages {sorted(bad)}; choose among {', '.join(STAGES)}")
    return args


def child_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", PREFECT_HOME=str(args.work / "prefect-home")
    )
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    return env


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def dtypes(folder: Path) -> str:
    """Counts of tensor dtypes in the safetensors headers of `folder` ('BF16 x291')."""
    found: Counter[str] = Counter()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        found.update(v["dtype"] for k, v in header.items() if k != "__metadata__")
    return ", ".join(f"{d} x{c}" for d, c in found.most_common()) or "no safetensors"


def task_specs(args: argparse.Namespace) -> str | None:
    """piqa=DIR/piqa_valid.jsonl,... or None when the sample folder is missing."""
    if not args.task_samples.is_dir():
        return None
    names = [t.strip() for t in args.tasks.split(",") if t.strip()]
    return ",".join(f"{t}={args.task_samples / TASK_FILES[t]}" for t in names)


def commands(args: argparse.Namespace, ckpt: Path, run_dir: Path) -> dict[str, list[str] | str]:
    """The command of each stage, or a reason it is skipped."""
    cli = [sys.executable, "-m", "flows.cli"]
    model = str(run_dir / "model") if args.eval_model == "pruned" else str(ckpt)
    tasks = task_specs(args)
    return {
        "prune": [
            *cli,
            "prune",
            str(ckpt),
            "--run-dir",
            str(run_dir),
            "--sparsity",
            "0.5",
            "--calib",
            "pydoc",
            "--nsamples",
            str(args.nsamples),
            "--seqlen",
            str(args.seqlen),
            "--no-progress",
            *shlex.split(args.prune_args),
        ],
        "eval": [
            *cli,
            "eval",
            model,
            "--eval",
            "pydoc",
            "--seqlen",
            str(args.seqlen),
            "--eval-windows",
            str(args.eval_windows),
        ],
        "tasks": [*cli, "eval", model, "--tasks", tasks, "--limit", str(args.limit)]
        if tasks
        else f"skipped: no task samples at {args.task_samples} (give --task-samples DIR)",
    }


def hashed(run_dir: Path | None) -> str:
    """Bytes hashed per pruned block, from the block records (`bytes_hashed`), or n/a."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir or Path("/nonexistent")).glob("blocks/block_*.json"))]
    per = [r["bytes_hashed"] for r in records if "bytes_hashed" in r]
    return f"{gib(sum(per) / len(per))} per block ({len(per)} blocks)" if per else "n/a (not recorded)"


def print_stage(name: str, m: Measured, ckpt_bytes: int, log: Path, run_dir: Path | None = None) -> None:
    status = "ok" if m.failure is None else f"FAILED ({m.failure}; log {log})"
    io = m.io
    print(f"[{name}] {status}")
    print(f"  wall {m.wall_s:.1f} s | peak RSS tree {gib(m.peak_rss_tree)}, largest process {gib(m.peak_rss_max)}")
    if m.cap is not None:
        peak = gib(m.cap_peak) if m.cap_peak is not None else "not counted"
        kills = m.oom_kills if m.oom_kills is not None else "not counted"
        print(f"  memory cap {m.cap}: peak usage {peak} (page cache included), OOM kills {kills}")
    if m.disk_peak:
        print(
            f"  run dir on disk: peak {gib(m.disk_peak)}, end {gib(m.disk_end)}; checkpoint {gib(ckpt_bytes)}, "
            f"peak/checkpoint {m.disk_peak / ckpt_bytes:.2f}"
        )
    print(
        f"  read {gib(io.get('read_bytes', 0))} from disk, {gib(io.get('rchar', 0))} by read() | written "
        f"{gib(io.get('write_bytes', 0))} to disk, {gib(io.get('wchar', 0))} by write() | hashed {hashed(run_dir)}"
    )
    if m.failure is not None:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        print("  log tail: " + "\n            ".join(tail))


def print_prune_outputs(ckpt: Path, run_dir: Path) -> None:
    out = run_dir / "model"
    print(f"  dtypes: output {dtypes(out) if out.is_dir() else 'no model/'} | input {dtypes(ckpt)}")
    blocks, when = run_dir / "blocks", "after assembly" if out.is_dir() else "(not assembled)"
    if blocks.is_dir():
        files = list(blocks.glob("*.safetensors"))
        linked = sum(f.stat().st_nlink > 1 for f in files)
        print(
            f"  blocks/ {when}: {gib(dir_bytes(blocks))} ({len(files)} block files, {dtypes(blocks)}; "
            f"{linked} hard-linked into model/, counted once in the run dir)"
        )
    else:
        print(f"  blocks/ absent {when}")


def calibration(args: argparse.Namespace, run_dir: Path, m: Measured) -> None:
    """The prune stage measured against the model's figures for the same shape on this CPU (fp32)."""
    records = [json.loads(p.read_text()) for p in sorted((run_dir / "blocks").glob("block_*.json"))]
    if not records:
        return
    shape = sm.shape_of(build_config(args.shape, args.blocks))
    rates = sm.cpu_rates(args.threads)
    fig = sm.project_prune(shape, rates, 4, args.nsamples, args.seqlen)
    pred = fig["per_block_s"]
    seconds = [r["seconds"] for r in records]
    solve = [sum(v["seconds"] for v in r["layers"].values()) for r in records]
    print(
        f"calibration: this CPU, {args.threads} thread(s), measured now: fp32 matmul {rates['fp32_flops'] / 1e9:.0f} "
        f"GFLOP/s, Hessian inverse {rates['fact_flops'] / 1e9:.0f} GFLOP/s, OBS loop {rates['column_s'] * 1e6:.1f} us/column"
        f" + {rates['elem_s'] * 1e9:.0f} ns/weight, sha256 {rates['sha_bps'] / 1e9:.2f} GB/s"
    )
    print(
        f"  per block: measured {sum(seconds) / len(seconds):.1f} s (min {min(seconds):.1f}, max {max(seconds):.1f}) "
        f"vs model {sum(pred.values()):.1f} s; solves measured {sum(solve) / len(solve):.1f} s vs model {pred['solve']:.1f} s"
    )
    print("  model by cause: " + ", ".join(f"{k} {v:.1f} s" for k, v in pred.items()))
    print(
        f"  stage: wall {m.wall_s:.0f} s vs model {fig['wall_s']:.0f} s (blocks + assembly; no start-up, capture) | "
        f"run dir peak {gib(m.disk_peak)} vs model {gib(fig['disk_run_bytes'])} | written {gib(m.io.get('wchar', 0))} "
        f"vs model {gib(fig['written_bytes'])} | hashed: model {gib(fig['hashed_bytes'])} | peak RSS "
        f"{gib(m.peak_rss_max)} vs model working set {gib(fig['device_bytes'])} + interpreter and libraries"
    )


def projection(args: argparse.Namespace) -> None:
    g, h = sm.GPUS[args.gpu], sm.HOST
    print(
        f"\nprojection at 128 x 2048 calibration tokens on one {args.gpu} (model and table: benchmarks/scale_model.py;"
        f" assumed {g['half_tflops']:.0f} TFLOP/s half, {g['fp32_tflops']} fp32, x{sm.EFFICIENCY} efficiency, "
        f"{sm.GPU_COLUMN_S * 1e6:.0f} us/column; host {h['ram_gib']} GiB RAM, {h['disk_gib']} GiB disk at "
        f"{h['disk_gbps']} GB/s, PCIe {h['pcie_gbps']} GB/s, sha256 {h['sha_gbps']} GB/s; budget {h['time_budget_h']:.0f} h)"
    )
    print(
        f"{'model':<11} {'stage':<6} {'wall':>7} {'GPU mem':>9} {'host RAM':>9} {'run dir':>9} {'ckpt':>8} "
        f"{'read':>9} {'written':>9} {'hashed':>9}  runs out first"
    )
    for name, (cls, fields, layers) in sm.PROJECTED.items():
        shape = sm.shape_of(cls(**fields, num_hidden_layers=layers))
        rates = sm.gpu_rates(args.gpu)
        figs = {
            "prune": sm.project_prune(shape, rates, 2, 128, 2048),
            "eval": sm.project_eval(shape, rates, 2, 128, 2048),
            "tasks": sm.project_tasks(shape, rates, 2),
        }
        for stage, f in figs.items():
            wall = f"{f['wall_s'] / 3600:.2f} h" if f["wall_s"] is not None else "n/a"
            cols = [
                f[k] / GIB
                for k in (
                    "device_bytes",
                    "host_bytes",
                    "disk_run_bytes",
                    "ckpt_bytes",
                    "read_bytes",
                    "written_bytes",
                    "hashed_bytes",
                )
            ]
            print(
                f"{name:<11} {stage:<6} {wall:>7} "
                + " ".join(f"{c:>8.1f}G" for c in cols[:4])
                + " "
                + " ".join(f"{c:>8.0f}G" for c in cols[4:])
                + f"  {sm.binding(f, args.gpu)}"
            )
        per = figs["prune"]["per_block_s"]
        print(
            f"{'':<11} per block: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in per.items())
            + f"; boundary {gib(figs['prune']['boundary_bytes'])}; output dtype = input's (assemble keeps it)"
        )


def write_ckpt(args: argparse.Namespace, ckpt: Path, env: dict[str, str]) -> int:
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "scale_ckpt.py"),
        "--shape",
        args.shape,
        "--out",
        str(ckpt),
        "--shard-gib",
        str(args.shard_gib),
        "--no-load-check",
        *(["--blocks", str(args.blocks)] if args.blocks else []),
    ]
    log = args.work / "logs" / f"{ckpt.name}-ckpt.log"
    m = run_measured(cmd, ROOT, env, log, watch=ckpt)
    if m.failure is not None:
        sys.exit(f"writing the checkpoint failed ({m.failure}); see {log}")
    reused = "(reused)" in log.read_text()
    size = dir_bytes(ckpt)
    print(
        f"[checkpoint] {ckpt}: {gib(size)}, {'reused' if reused else 'written'} in {m.wall_s:.1f} s, "
        f"peak RSS {gib(m.peak_rss_max)}, written to disk {gib(m.io.get('write_bytes', 0))}"
    )
    return size


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    env = child_env(args)
    tag = f"{args.shape}-b{args.blocks}" if args.blocks else f"{args.shape}-full"
    ckpt, run_dir = (
        args.work / "ckpt" / tag,
        args.work / "runs" / (tag + "".join(shlex.split(args.prune_args)).replace(":", "-")),
    )
    print(
        f"{args.shape} ({build_config(args.shape, args.blocks).num_hidden_layers} blocks), stages {args.stages}, "
        f"{args.threads} thread(s), checkout {ROOT}"
    )
    ckpt_bytes = write_ckpt(args, ckpt, env)
    cap_bytes = int(args.mem_cap_gib * GIB) if args.mem_cap_gib else None
    if cap_bytes is not None:
        try:
            MemoryCap.create(cap_bytes).close()  # fail here, in one line, rather than in every stage
        except CapUnavailable as e:
            sys.exit(f"--mem-cap-gib: {e}")
        print(
            f"memory cap per stage: {gib(cap_bytes)}; checkpoint {gib(ckpt_bytes)} = {ckpt_bytes / cap_bytes:.2f}x the cap"
        )
    cmds = commands(args, ckpt, run_dir)
    for name in args.stages.split(","):
        cmd = cmds[name]
        if isinstance(cmd, str):
            print(f"[{name}] {cmd}")
            continue
        if name == "prune":
            shutil.rmtree(run_dir, ignore_errors=True)
        print(f"$ {shlex.join(cmd[1:])}", flush=True)
        log = args.work / "logs" / f"{run_dir.name}-{name}.log"
        cap = MemoryCap.create(cap_bytes) if cap_bytes is not None else None
        try:
            m = run_measured(cmd, ROOT, env, log, watch=run_dir if name == "prune" else None, cap=cap)
        finally:
            if cap is not None:
                cap.close()
        print_stage(name, m, ckpt_bytes, log, run_dir if name == "prune" else None)
        if name == "prune":
            print_prune_outputs(ckpt, run_dir)
            calibration(args, run_dir, m)
        sys.stdout.flush()
    projection(args)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(ckpt, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
