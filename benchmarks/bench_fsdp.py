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
    python benchmarks/bench_fsdp.py --shape llama3-8b --blocks 4,8   # loading and saving at scale

With `--shape` (a real model's shape, random-init bf16 from `benchmarks/scale_ckpt.py`, cut to each
depth of `--blocks`) it measures instead what a model too big for one process needs of each rank
to load and save: 2 ranks read the checkpoint into fp32 FSDP2 shards (`stages.model.sharded.
load_sharded`, as the fine-tune's student) and write it back (`save_sharded`); it prints each rank's
peak RSS above its start against its shards' bytes and the largest unit's full fp32 bytes (a block,
or an untied embedding; the bound: shards + about one unit), how that excess changes with depth,
and whether every written tensor equals the checkpoint's (bf16 -> fp32 -> bf16 is exact).

Run it alone on the machine: the times are wall times. Each run is written under --work and
reused when its bench.json is there (delete --work to measure again).
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
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


def load_rank(rank: int, world: int, port: int, ckpt: Path, out: Path, report: Path) -> None:
    """One rank of the scale check: load `ckpt` sharded in fp32, save it to `out`, write its figures."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from stages.model.blocks import find_blocks
    from stages.model.sharded import load_sharded, save_sharded
    from stages.run.memory import map_large_allocations
    from stages.run.ranks import join_group

    map_large_allocations()  # as the fine-tune's ranks do
    join_group(rank, world, port, "cpu")
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    model = load_sharded(ckpt, init_device_mesh("cpu", (world,)), "cpu", torch.float32)
    loaded, t_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t0
    shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    _, blocks = find_blocks(model)
    units = [*blocks, model.get_input_embeddings(), model.get_output_embeddings()]
    unit = max(sum(p.numel() * p.element_size() for p in u.parameters()) for u in units)  # full (global) sizes
    t0 = time.perf_counter()
    save_sharded(model, ckpt, out)
    saved, t_save = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, time.perf_counter() - t0
    figures = dict(start=start, loaded=loaded, saved=saved, shards=shards, unit=unit, load_s=t_load, save_s=t_save)
    (report / f"rank{rank}.json").write_text(json.dumps(figures))
    dist.barrier()
    dist.destroy_process_group()


def same_tensors(a: Path, b: Path) -> bool:
    """Every tensor of checkpoint `a` equals `b`'s, compared one tensor at a time."""
    from stages.model.checkpoint import SafetensorsIndex

    ia, ib = SafetensorsIndex.open(a), SafetensorsIndex.open(b)
    if sorted(ia.keys()) != sorted(ib.keys()):
        return False
    for key in ia.keys():
        ta, tb = ia.load([key])[key], ib.load([key])[key]
        if ta.dtype != tb.dtype or not torch.equal(ta, tb):
            return False
    return True


def scale(shape: str, depths: list[int], work: Path) -> None:
    """Load and save `shape` cut to each depth on 2 ranks; print the per-rank memory against shards + a block."""
    from benchmarks.scale_ckpt import write_checkpoint
    from stages.run.ranks import spawn_ranks

    print(f"{shape}: load_sharded (fp32) + save_sharded on 2 gloo ranks, {torch.get_num_threads()} threads")
    print(
        "\n| blocks | checkpoint GiB | rank | shards GiB | largest unit GiB | load s | peak above start after load GiB "
        "| save s | after save GiB | excess over shards, in units | written equals checkpoint |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for k in depths:
        ckpt, out, report = work / f"{shape}-{k}", work / f"{shape}-{k}-out", work / f"{shape}-{k}-report"
        marker = write_checkpoint(shape, ckpt, blocks=k)
        report.mkdir(parents=True, exist_ok=True)
        spawn_ranks(load_rank, (ckpt, out, report), 2)
        equal = same_tensors(ckpt, out)
        for r in range(2):
            f = json.loads((report / f"rank{r}.json").read_text())
            above = max(f["loaded"], f["saved"]) - f["start"]
            print(
                f"| {k} | {marker['bytes'] / 2**30:.2f} | {r} | {f['shards'] / 2**30:.2f} | {f['unit'] / 2**30:.2f} | "
                f"{f['load_s']:.0f} | {(f['loaded'] - f['start']) / 2**30:.2f} | {f['save_s']:.0f} | "
                f"{(f['saved'] - f['start']) / 2**30:.2f} | {(above - f['shards']) / f['unit']:.2f} | "
                f"{'yes' if equal else 'NO'} |",
                flush=True,
            )
        shutil.rmtree(out, ignore_errors=True)


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
    p.add_argument("--shape", help="a scale_ckpt shape (llama3-8b, ...): measure loading and saving instead")
    p.add_argument("--blocks", default="4,8", help="with --shape: the depths to cut the shape to")
    args = p.parse_args()
    if args.shape:
        scale(args.shape, [int(x) for x in args.blocks.split(",")], args.work)
        return
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
