"""Whether fusing a block's forward pass moves the prune stage: eager against `torch.compile`.

`bench_floor.py` puts the forward passes of a SmolLM2 block inside the prune stage about 1.3x over
the products they must do (its linear layers and attention). Part of that is the model's elementwise
work (RMSNorm, rotary, SiLU, the residual adds), which only fusion removes, and on a CPU the only
general fuser is `torch.compile` (inductor, C++ code built with the machine's compiler at run time);
the rest is what running inside the stage adds (hooks, cold caches, fresh memory). This times block
``--block``'s forward on one calibration batch as the prune stage runs it (`stages.model.blocks.run_block`,
the kwargs captured at batch 1 as the capture stage does), eager and compiled, next to the same
products as bare calls, and prints the compile's one-off cost and how far the compiled output is from
the eager one: the eager/products ratio is what fusion could remove at most.

    python benchmarks/bench_compile.py                   # SmolLM2-135M, batch 8 x 512, 2 threads
    python benchmarks/bench_compile.py --model DIR --batch-size 4 --seqlen 2048 --dynamic

The forward's work does not depend on the weights' values, so the block's random calibration batch
is as good as a real one here. Run it alone on the machine: every figure is a wall time.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import flows  # noqa: E402, F401  (before torch: the CLI's allocator settings, see flows/__init__.py)

# isort: split
import torch  # noqa: E402

from benchmarks.bench_floor import bare, forward_floor  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--block", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dynamic", action="store_true", help="compile with dynamic shapes (torch.compile(dynamic=True))")
    args = p.parse_args()

    from stages.model.blocks import find_layers, load_block, run_block
    from stages.model.capture import capture_inputs
    from stages.model.checkpoint import resolve_model
    from stages.model.models import load_config

    model_dir = resolve_model(args.model)
    config = load_config(model_dir)
    block = load_block(model_dir, args.block, "cpu", torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (1, args.seqlen))
    _, kwargs = capture_inputs(model_dir, ids, "cpu", torch.float32, 1)
    x = torch.randn(args.batch_size, args.seqlen, config.hidden_size)

    with torch.inference_mode():
        # the floor: the block's products alone (its linear layers and causal attention), as bench_floor's
        layers = find_layers(block)
        linear, attention = forward_floor(
            layers, list(layers), config, args.seqlen, args.batch_size, 1, repeat=args.repeats
        )
        floor = sum(linear.values()) + attention
        eager_out = run_block(block, x, kwargs)
        eager = bare(lambda: run_block(block, x, kwargs), args.repeats)
        compiled_block = torch.compile(block, dynamic=args.dynamic)
        t0 = time.perf_counter()
        compiled_out = run_block(compiled_block, x, kwargs)
        first = time.perf_counter() - t0
        compiled = bare(lambda: run_block(compiled_block, x, kwargs), args.repeats)
    diff = (compiled_out - eager_out).abs().max().item()
    scale = eager_out.abs().max().item()

    print(
        f"{args.model} block {args.block} ({type(block).__name__}), batch {args.batch_size} x {args.seqlen}, "
        f"fp32, {torch.get_num_threads()} threads, torch {torch.__version__}; least of {args.repeats} calls"
    )
    print(f"{'forward':<26} {'seconds':>8} {'/ floor':>8}")
    print(f"{'products alone (floor)':<26} {floor:8.4f} {1:8.2f}")
    print(f"{'eager (run_block)':<26} {eager:8.4f} {eager / floor:8.2f}")
    print(f"{'torch.compile':<26} {compiled:8.4f} {compiled / floor:8.2f}")
    print(f"compiled / eager {compiled / eager:.3f}; compile (first call) {first:.1f} s")
    print(f"largest |compiled - eager| {diff:.2e} (largest |eager| {scale:.2e})")
    saved = eager - compiled
    if saved > 0:
        print(f"the compile pays for itself after {(first - compiled) / saved:.0f} forwards of this shape")
    else:
        print("the compiled forward saves nothing at this shape")


if __name__ == "__main__":
    main()
