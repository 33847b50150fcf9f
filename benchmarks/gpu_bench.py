"""The scale harness's GPU part, without Prefect (the device image has none): prune and evaluate a
random-init checkpoint of a real model's shape on a GPU, stage by stage, with the GPU memory peak.

Run by benchmarks/gpu_check.sh on the device machine; runs on a CPU too (`--device cpu`, for trying it
here). Steps, each timed, each stage's `torch.cuda.max_memory_allocated` printed:
1. writes the checkpoint (`--shape`, first `--blocks` blocks; benchmarks/scale_ckpt.py, bf16 shards)
   with the tokenizer files of `--tokenizer` (default: the embedded SmolLM2's folder);
2. `run_pipeline` (the one-shot stages the flow runs) with `--device`, `--dtype auto` (bf16 on a GPU)
   and `--sparsity`/`--nm`/`--method`/`--sequential` on `--nsamples` x `--seqlen` pydoc windows: wall time per step
   (prepare, calibrate, capture, prune, assemble), seconds a block and the layer solves' seconds a block
   (`--kernel`: the solve's column loop, torch or triton);
3. the pruned model's perplexity block by block on `--eval-windows` pydoc windows in the GPU's bf16,
   the GPU's fp32 and the CPU's fp32 (the ratios show the half-precision path against fp32; the
   weights are random, so the perplexities themselves mean nothing); `--eval-windows 0` skips it.
Prints one table and writes it as JSON to `--out` if given.

    python benchmarks/gpu_bench.py --shape smollm2-1.7b --blocks 8 --work /tmp/gpu-work --device cuda
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.scale_ckpt import SHAPES, write_checkpoint  # noqa: E402
from stages.config import PruneConfig  # noqa: E402
from stages.evaluate.evaluate import blockwise_perplexity  # noqa: E402
from stages.evaluate.perplexity import eval_windows  # noqa: E402
from stages.model.models import load_tokenizer  # noqa: E402
from stages.prune.oneshot import run_steps  # noqa: E402
from stages.run.rundir import RunLock  # noqa: E402

GIB = 1 << 30


def _peak(device: str) -> float | None:
    """GiB allocated at most on the GPU since the last reset (None on a CPU)."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def _reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def timed_steps(cfg: PruneConfig) -> tuple:
    """`run_steps` under the run's lock: (run, block records, seconds per step, wall seconds, the GPU peak in GiB
    or None on a CPU)."""
    timings: dict[str, float] = {}
    _reset(cfg.runtime.device)
    t0 = time.perf_counter()
    with RunLock(cfg.run_dir):
        run, records = run_steps(cfg, timings=timings)
    peak = _peak(cfg.runtime.device)
    return run, records, timings, time.perf_counter() - t0, peak


def prune(args: argparse.Namespace, ckpt: Path, run_dir: Path) -> dict:
    """The one-shot stages on ``ckpt`` (no evaluation); wall time per step, seconds a block, GPU peak."""
    options = dict(
        model=str(ckpt), run_dir=str(run_dir), calib="pydoc", nsamples=args.nsamples, seqlen=args.seqlen,
        sparsity=args.sparsity, method=args.method, device=args.device, dtype="auto", progress=False,
        kernel=args.kernel,
    )  # fmt: skip
    if args.nm:
        options["nm"] = args.nm
    if args.sequential:
        options["sequential"] = True
    run, records, timings, wall, peak = timed_steps(PruneConfig.of(**options))
    blocks = len(records)
    return {
        "wall_s": round(wall, 1),
        "steps_s": {k: round(v, 1) for k, v in timings.items()},
        "s_per_block": round(timings.get("prune", wall) / max(blocks, 1), 2),
        "solve_s_per_block": round(
            sum(sum(r["seconds"] for r in rec["layers"].values()) for rec in records) / max(blocks, 1), 3
        ),
        "kernel": args.kernel,
        "gpu_peak_gib": peak,
        "dtype": str(run.dtype).removeprefix("torch."),
        "model": str(run.model),
    }


def perplexities(args: argparse.Namespace, model: Path) -> dict:
    """The pruned model's perplexity in the GPU's bf16, the GPU's fp32 and the CPU's fp32, each timed."""
    tok = load_tokenizer(model)
    windows = eval_windows(tok, "pydoc", args.seqlen, args.eval_windows)
    settings = [(args.device, torch.bfloat16), (args.device, torch.float32)]
    if args.device != "cpu":
        settings.append(("cpu", torch.float32))
    out = {}
    for device, dtype in settings:
        _reset(device)
        t0 = time.perf_counter()
        ppl = blockwise_perplexity(model, windows, device=device, dtype=dtype, batch_size=4)
        name = f"{device} {str(dtype).removeprefix('torch.')}"
        out[name] = {"ppl": ppl.ppl, "s": round(time.perf_counter() - t0, 1), "gpu_peak_gib": _peak(device)}
    fp32 = out.get("cpu float32", out[f"{args.device} float32"])["ppl"]
    for row in out.values():
        row["vs_cpu_fp32"] = row["ppl"] / fp32
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="smollm2-1.7b", choices=sorted(SHAPES))
    p.add_argument("--blocks", type=int, default=8, help="first K blocks of the shape (default 8)")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-work"))
    p.add_argument("--tokenizer", type=Path, default=None, help="folder with tokenizer.json (default: embedded)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default=None, help="e.g. 2:4")
    p.add_argument("--method", default="sparsegpt")
    p.add_argument("--sequential", action="store_true", help="prune in sequential mode (one forward a block)")
    p.add_argument("--kernel", default="torch", choices=("torch", "triton"), help="the solve's column loop")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=8, help="0: no perplexity step")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no GPU; run it on the device machine or with --device cpu")
        return 2
    ckpt, run_dir = args.work / f"{args.shape}-{args.blocks}", args.work / "run"
    t0 = time.perf_counter()
    marker = write_checkpoint(args.shape, ckpt, args.blocks, tok_dir=args.tokenizer)
    figures = {
        "shape": args.shape,
        "blocks": args.blocks,
        "checkpoint_gib": round(marker["bytes"] / GIB, 2),
        "write_s": round(time.perf_counter() - t0, 1),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
    }
    shutil.rmtree(run_dir, ignore_errors=True)
    figures["prune"] = prune(args, ckpt, run_dir)
    if args.eval_windows > 0:
        figures["perplexity"] = perplexities(args, Path(figures["prune"]["model"]))
    print(json.dumps(figures, indent=2))
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
