"""Sharded fine-tuning (FSDP2, `--nproc N`) against one process: loss curve, memory per parameter, time.

Fine-tunes one student the way a `progressive --recovery distill` round does (dense teacher,
KL + SquareHead distillation, the mask kept) once in one process and once on each rank count of
`--ranks` (gloo on this CPU), each in a fresh child process, from the same magnitude-pruned
student. For each it prints the largest difference of the loss curve and of the final weights
against one process, the fine-tune's wall time per step, the whole call's wall time (spawning and
loading the ranks included), and the peak resident memory per model parameter, of the one process
and of each rank: whole, and above the process's own peak before it loaded anything (imports and
the process group, which every process pays; the yardstick, measured in the same process).
One process holds the fp32 student, its gradients and its two AdamW moments (16 bytes a parameter)
and the teacher (4); with N ranks each holds 1/N of those, plus one block's full parameters while
it runs, plus the activations of its share of the windows.

    python benchmarks/bench_fsdp.py                           # SmolLM2-135M, 50% magnitude, 8 steps
    python benchmarks/bench_fsdp.py --steps 4 --seqlen 128 --ranks 2

Run it alone on the machine: the times are wall times. Each run is written under --work and
reused when its bench.json is there (delete --work to measure again).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from stages.finetune.config import FinetuneConfig, FinetuneRuntime
from stages.finetune.finetune import finetune

if __name__ == "__main__":
    t0 = time.perf_counter()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    fields = json.loads({cfg!r})
    cfg = FinetuneConfig(**{{**fields, "betas": tuple(fields["betas"])}})
    result = finetune({student!r}, {teacher!r}, {out!r}, cfg, FinetuneRuntime(nproc={nproc}))
    result["wall"] = time.perf_counter() - t0
    result["peak"] = result.get("peak") or [{{"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                              "rss_start": start}}]
    print("RESULT " + json.dumps({{k: result[k] for k in ("losses", "seconds", "steps", "wall", "peak", "sparsity")}}))
"""


def make_student(dense: Path, out: Path, sparsity: float) -> int:
    """Zero the smallest `sparsity` of every block linear of `dense` into `out`; return the parameter count."""
    from transformers import AutoModelForCausalLM

    from stages.model.blocks import find_blocks, find_layers
    from stages.model.models import load_tokenizer

    model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32)
    count = sum(p.numel() for p in model.parameters())
    if (out / "config.json").is_file():
        return count
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for layer in find_layers(block).values():
                W = layer.weight
                k = int(W.numel() * sparsity)
                W[W.abs() <= W.abs().flatten().kthvalue(k).values] = 0
    model.save_pretrained(out)
    load_tokenizer(dense).save_pretrained(out)
    return count


def fine_tune(student: Path, teacher: Path, out: Path, cfg: dict, nproc: int) -> dict:
    """One fine-tune in a fresh child process (its own peak RSS); reuses a finished one."""
    saved = out / "bench.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    code = CHILD.format(
        root=str(ROOT), cfg=json.dumps(cfg), student=str(student), teacher=str(teacher), out=str(out), nproc=nproc
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"bench_fsdp: the fine-tune with nproc {nproc} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    saved.write_text(json.dumps(result))
    return result


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def curve_diff(a: list[dict], b: list[dict]) -> float:
    """Largest relative difference of any logged loss term over the steps."""
    return max(abs(x[k] - y[k]) / max(abs(x[k]), 1e-12) for x, y in zip(a, b, strict=True) for k in x if k != "step")


def main() -> None:
    from stages.finetune.config import FinetuneConfig
    from stages.model.checkpoint import resolve_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--wikitext", type=Path, default=ROOT.parent / "shared" / "data" / "wikitext2")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--ranks", default="2", help="rank counts to run besides one process, e.g. 2,4")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "bench_fsdp")
    args = p.parse_args()
    train = args.wikitext / "wiki.valid.raw"  # the shared data has no train split; any text serves here
    dataset = f"wikitext2={train}" if train.is_file() else "pydoc"
    dense = resolve_model(args.model)
    student = args.work / "student"
    params = make_student(dense, student, args.sparsity)
    cfg = FinetuneConfig(
        dataset=dataset,
        steps=args.steps,
        seqlen=args.seqlen,
        micro_batch_size=args.micro_batch_size,
        grad_accum=args.grad_accum,
        lr=1e-4,
        warmup_steps=1,
        squarehead=1.0,
    ).to_dict()
    print(
        f"{args.model} ({params / 1e6:.1f}M parameters), {args.sparsity:.0%} magnitude student, dense teacher; "
        f"{args.steps} steps of {args.micro_batch_size * args.grad_accum} x {args.seqlen} tokens ({dataset}); "
        f"{torch.get_num_threads()} threads"
    )
    runs = {1: fine_tune(student, dense, args.work / "one", cfg, 1)}
    for n in (int(x) for x in args.ranks.split(",")):
        runs[n] = fine_tune(student, dense, args.work / f"ranks{n}", cfg, n)
    ref = weights(args.work / "one" / "model")

    def above(r: dict) -> int:  # the largest process's peak above its own start
        return max(p["rss"] - p["rss_start"] for p in r["peak"])

    print(
        "\n| run | s/step | whole call s | peak RSS per process MiB | bytes/parameter | above its start | "
        "loss curve max rel diff | max weight diff | zeros |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n, r in runs.items():
        w = weights(args.work / ("one" if n == 1 else f"ranks{n}") / "model")
        diff = max(float((w[k].float() - ref[k].float()).abs().max()) for k in ref)
        rss = [p["rss"] for p in r["peak"]]
        print(
            f"| {'1 process' if n == 1 else f'{n} ranks'} | {r['seconds'] / r['steps']:.2f} | {r['wall']:.1f} | "
            + " / ".join(f"{x / 2**20:.0f}" for x in rss)
            + f" | {max(rss) / params:.2f} | {above(r) / params:.2f} | "
            f"{curve_diff(runs[1]['losses'], r['losses']):.1e} | {diff:.1e} | {r['sparsity']['zeros']:.4f} |"
        )
    for n, r in runs.items():
        if n > 1:
            print(
                f"\n{n} ranks: each rank's peak above its start is {above(r) / above(runs[1]):.2f}x one process's "
                f"(1/{n} = {1 / n:.2f} is the bound for weights, gradients and optimizer state alone)"
            )
    print(f"peak RSS of this driver: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\nbench_fsdp: {time.perf_counter() - t0:.0f} s")
