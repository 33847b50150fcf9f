"""The speed issue's quality table on a GPU, without Prefect (a device image may have none): the authors'
code next to ours on one real model, the same calibration and evaluation windows, the same dtype.

For each setting (``--settings 50%,2:4``) it runs `benchmarks/baseline_authors.py --device` (a
subprocess: their scripts' GPU placement, their fasterprune loop) and then our one-shot stages
(`stages.prune.oneshot.run_steps`, what `sparsegpt prune` runs inside its flow) in each mode of ``--modes``
with each kernel of ``--kernels``, and the pruned model's perplexity on the same windows in the same
dtype (block by block, `blockwise_perplexity`). Prints per row: perplexity and its ratio to the
authors', our whole one-shot stages' and prune stage's seconds against the authors' prune seconds
(their catch + Hessians + solves; it leaves out loading and sampling), and the GPU memory peak of the
prune against theirs. JSON of every figure to ``--out``.

    python benchmarks/gpu_table.py --model DIR --wikitext DIR --device cuda --dtype bfloat16

``--device cpu`` rehearses it here (small ``--nsamples``/``--seqlen``); the figures mean something on a GPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.gpu_bench import timed_steps  # noqa: E402
from stages.config import PruneConfig  # noqa: E402
from stages.evaluate.evaluate import blockwise_perplexity  # noqa: E402
from stages.evaluate.perplexity import eval_windows  # noqa: E402
from stages.model.models import load_tokenizer  # noqa: E402


def calib_spec(args: argparse.Namespace) -> str:
    return f"wikitext2={args.wikitext / 'wiki.valid.raw'}"


def eval_spec(args: argparse.Namespace) -> str:
    return f"wikitext2={args.wikitext / 'wiki.test.raw'}"


def authors(args: argparse.Namespace, setting: str) -> dict:
    """benchmarks/baseline_authors.py on the device, as a subprocess; its JSON line."""
    cmd = [
        sys.executable, "-m", "benchmarks.baseline_authors", str(args.model),
        "--calib", calib_spec(args), "--eval", eval_spec(args),
        "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--eval-windows", str(args.eval_windows),
        "--device", args.device, "--dtype", args.dtype,
    ]  # fmt: skip
    cmd += ["--nm", setting] if ":" in setting else ["--sparsity", str(float(setting.rstrip("%")) / 100)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def ours(args: argparse.Namespace, setting: str, mode: str, kernel: str, windows: torch.Tensor) -> dict:
    """Our one-shot stages, then the pruned model's perplexity; seconds and the prune's GPU peak."""
    run_dir = args.work / f"run-{setting.replace(':', '_').rstrip('%')}-{mode}-{kernel}"
    shutil.rmtree(run_dir, ignore_errors=True)
    options = dict(
        model=str(args.model), run_dir=str(run_dir), calib=calib_spec(args), nsamples=args.nsamples,
        seqlen=args.seqlen, device=args.device, dtype=args.dtype, progress=False, kernel=kernel,
        sequential=mode == "sequential", cache=False,
    )  # fmt: skip
    if ":" in setting:
        options["nm"] = setting
    else:
        options["sparsity"] = float(setting.rstrip("%")) / 100
    run, _, timings, wall, peak_gib = timed_steps(PruneConfig.of(**options))
    peak = peak_gib * 1024 if peak_gib is not None else float("nan")
    ppl = blockwise_perplexity(run.model, windows, device=args.device, dtype=getattr(torch, args.dtype)).ppl
    return {"ppl": ppl, "stages_s": wall, "prune_s": timings["prune"], "gpu_peak_mib": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, required=True, help="a local checkpoint directory")
    p.add_argument("--wikitext", type=Path, required=True, help="folder with wiki.valid.raw and wiki.test.raw")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", help="the model's dtype in both (the authors' GPU scripts: float16)")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--settings", default="50%,2:4")
    p.add_argument("--modes", default="default,sequential")
    p.add_argument("--kernels", default="torch,triton")
    p.add_argument("--work", type=Path, default=Path("/tmp/gpu-table"))
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no GPU; run it on one (--device cpu only rehearses it: bench_pipeline.py is the CPU table)")
        return 2
    args.work.mkdir(parents=True, exist_ok=True)
    windows = eval_windows(load_tokenizer(args.model), eval_spec(args), args.seqlen, args.eval_windows)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows, figures = [], {"device": name, "torch": torch.__version__, "dtype": args.dtype}
    for setting in args.settings.split(","):
        ref = authors(args, setting)
        ref["prune_gpu_peak_mib"] = ref["prune_gpu_peak_mib"] or float("nan")
        figures[setting] = {"authors": ref}
        rows.append(
            f"{setting:>5} authors     {'':>6} ppl {ref['ppl']:8.3f}          | prune {ref['seconds']['prune']:6.1f} s"
            f"           | GPU peak {ref['prune_gpu_peak_mib']:7.0f} MiB  (dense {ref['dense_ppl']:.3f})"
        )
        print(rows[-1], flush=True)
        for mode in args.modes.split(","):
            for kernel in args.kernels.split(","):
                got = ours(args, setting, mode, kernel, windows)
                figures[setting][f"{mode} {kernel}"] = got
                rows.append(
                    f"{setting:>5} {mode:<11} {kernel:>6} ppl {got['ppl']:8.3f} {got['ppl'] / ref['ppl']:.4f}x | "
                    f"stages {got['stages_s']:5.1f} s {got['stages_s'] / ref['seconds']['prune']:.2f}x, prune "
                    f"{got['prune_s']:5.1f} s {got['prune_s'] / ref['seconds']['prune']:.2f}x | GPU peak "
                    f"{got['gpu_peak_mib']:7.0f} MiB {got['gpu_peak_mib'] / ref['prune_gpu_peak_mib']:.2f}x"
                )
                print(rows[-1], flush=True)
    print("\n".join(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
