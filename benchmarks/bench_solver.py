"""Benchmark of the algorithm core: SparseGPT solve, Hessian accumulation, plain matmul.

For each linear shape (Llama-7B's and the embedded SmolLM2-135M's) it times
`sparsegpt.sparsegpt_prune` next to a straightforward implementation of the paper's
Algorithm 1 (one column at a time, lazy block updates: the yardstick), and the
Hessian accumulation of calibration tokens of the same input width next to a plain
square matmul of this machine. Prints seconds and effective GFLOP/s, and the solve's own
products (its factor and lazy updates as bare calls) with the share of the solve beyond
them: the column loop's.

    python benchmarks/bench_solver.py                 # all shapes, CPU
    python benchmarks/bench_solver.py --small         # only the embedded model's shapes
    python benchmarks/bench_solver.py --device cuda --dtype float16
    python benchmarks/bench_solver.py --device cuda --solve-only --kernels torch,triton [--nm 2:4]

``--kernels torch,triton`` also times the solve with the Triton column loop (`sparsegpt.kernel`) and
prints its speed-up over the torch loop and how far its result is from the torch loop's (masks that
differ, largest weight difference relative to the weights' largest); ``--block-rows`` times the kernel
alone on one block of each shape's widths for tile heights 4..32 (the kernel's default: 16, N:M 8).
``--factor`` times `hessian_inverse` on each distinct input width (and ``--factor-cols``'s) by the CPU's
path (Cholesky and triangular inverse by halves) and by cuSOLVER's (a GPU's: `torch.linalg.cholesky_ex`,
plain products), with each one's relative distance from the float64 factor (up to 8192 columns).
``--layouts`` times the torch loop with each layout of its block buffers (column-contiguous, a CPU's
default, and row-major, a GPU's) and prints the time the column layout saves.

    python benchmarks/bench_solver.py --small --solve-only --layouts [--nm 2:4]
    python benchmarks/bench_solver.py --solve-only --factor --factor-cols 14336
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from sparsegpt import accumulate_hessian, hessian, hessian_inverse, solver, sparsegpt_prune
from stages.config import parse_nm

LLAMA_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]
SMOLLM2 = [(576, 576), (192, 576), (1536, 576), (576, 1536)]


def paper_algorithm_1(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float,
    blocksize: int = 128,
    percdamp: float = 0.01,
    prunen: int = 0,
    prunem: int = 0,
):
    """The yardstick: the paper's Algorithm 1 as the authors wrote it (fasterprune, with their N:M)."""
    W = W.clone().float()
    rows, cols = W.shape
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(H))
    diag = torch.arange(cols, device=W.device)
    H[diag, diag] += damp
    H = torch.linalg.cholesky(H)
    H = torch.cholesky_inverse(H)
    Hinv = torch.linalg.cholesky(H, upper=True)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if prunen == 0:
            tmp = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            thresh = torch.sort(tmp.flatten())[0][int(tmp.numel() * sparsity)]
            mask1 = tmp <= thresh
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prunen != 0 and i % prunem == 0:
                tmp = W1[:, i : i + prunem] ** 2 / torch.diag(Hinv1)[i : i + prunem].reshape(1, -1) ** 2
                mask1.scatter_(1, i + torch.topk(tmp, prunen, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])
    return W


def timed(fn, device: torch.device, repeats: int) -> float:
    """Best wall time of ``repeats`` calls, after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def realistic_hessian(cols: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(cols)
    X = torch.randn(4096, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols**0.5)
    X = X * torch.exp(torch.randn(cols, generator=g))
    H, _ = accumulate_hessian(None, X.to(device), 0)
    return H


def bench_solve(rows: int, cols: int, args, device: torch.device) -> None:
    W = (torch.randn(rows, cols) / cols**0.5).to(device=device, dtype=getattr(torch, args.dtype))
    H = realistic_hessian(cols, device)
    n, m = args.prune_nm
    flops = rows * cols * (cols + args.blocksize) + cols**3  # lazy updates + in-block updates + Cholesky

    def solve(kernel: str):
        return sparsegpt_prune(W, H, 0.5, prune_n=n, prune_m=m, blocksize=args.blocksize, kernel=kernel)

    ours = timed(lambda: solve("torch"), device, args.repeats)
    ref = timed(lambda: paper_algorithm_1(W, H, 0.5, args.blocksize, prunen=n, prunem=m), device, args.repeats)
    products = timed(lambda: solve_products(W, H, args.blocksize), device, args.repeats)
    print(
        f"solve   {rows:>6}x{cols:<6} {args.nm or '50%'} ours {ours:8.3f} s {flops / ours / 1e9:8.1f} GFLOP/s | "
        f"Algorithm 1 {ref:8.3f} s {flops / ref / 1e9:8.1f} GFLOP/s | speed-up {ref / ours:5.2f}x | "
        f"its products {products:8.3f} s, the column loop {100 * max(0.0, 1 - products / ours):4.1f}% of ours"
    )
    if "triton" in args.kernels:
        fused = timed(lambda: solve("triton"), device, args.repeats)
        a, b = solve("torch"), solve("triton")
        moved = int((a.mask != b.mask).sum())
        diff = float((a.weight - b.weight).abs().max() / a.weight.abs().max())
        print(
            f"  triton column loop {fused:8.3f} s {flops / fused / 1e9:8.1f} GFLOP/s | {ours / fused:5.2f}x the torch "
            f"loop, {ref / fused:5.2f}x Algorithm 1 | the solve beyond its products "
            f"{100 * max(0.0, 1 - products / fused):4.1f}% | masks differ at {moved} of {a.mask.numel()}, "
            f"largest weight difference {diff:.1e} of the largest weight, OBS loss {b.loss / a.loss:.6f}x"
        )


def bench_factor(cols: int, args, device: torch.device) -> None:
    """`hessian_inverse` by halves (a CPU's path) and by `torch.linalg.cholesky_ex` (a GPU's), timed, each
    against the float64 factor of the authors' chain."""
    H = realistic_hessian(cols, device)
    times, factors = {}, {}
    for halves in (True, False):
        with mock.patch.object(hessian, "_by_halves", lambda device, halves=halves: halves):
            times[halves] = timed(lambda: hessian_inverse(H), device, args.repeats if cols <= 8192 else 1)
            factors[halves] = hessian_inverse(H)[0]
    line = f"factor  {cols:>6} cols by halves {times[True]:8.4f} s | cholesky_ex {times[False]:8.4f} s | "
    line += f"{times[False] / times[True]:5.2f}x"
    if cols <= 8192:
        ref = H.double()
        ref.diagonal().add_(0.01 * ref.diagonal().mean())
        ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
        err = {k: float((U.double() - ref).norm() / ref.norm()) for k, U in factors.items()}
        line += f" | from the float64 factor {err[True]:.1e} and {err[False]:.1e}"
    print(line)


def bench_layouts(rows: int, cols: int, args, device: torch.device) -> None:
    """The torch loop's solve (its factor included) with column-contiguous and with row-major block buffers."""
    W = (torch.randn(rows, cols) / cols**0.5).to(device=device, dtype=getattr(torch, args.dtype))
    H = realistic_hessian(cols, device)
    n, m = args.prune_nm
    times = {}
    for layout in (True, False):
        with mock.patch.object(solver, "_by_column", lambda device, kernel, layout=layout: layout):
            times[layout] = timed(lambda: sparsegpt_prune(W, H, 0.5, prune_n=n, prune_m=m), device, args.repeats)
    print(
        f"layout  {rows:>6}x{cols:<6} {args.nm or '50%'} by column {times[True]:8.4f} s | by row {times[False]:8.4f} s"
        f" | by column takes {100 * (1 - times[True] / times[False]):5.1f}% less time"
    )


def bench_block_rows(rows: int, count: int, args, device: torch.device) -> None:
    """The kernel alone on one block ``(rows, count)`` for each tile height."""
    from sparsegpt.kernel import column_loop

    n, m = args.prune_nm
    Hinv1 = torch.linalg.cholesky(realistic_hessian(count, device).inverse(), upper=True)  # (count, count)
    W0 = torch.randn(rows, count, device=device)
    mask0 = torch.rand(rows, count, device=device) < 0.5 if not m else torch.zeros(rows, count, dtype=torch.bool)
    W1, Err1, mask1 = torch.empty_like(W0), torch.empty_like(W0), torch.empty_like(mask0, device=device)
    line = []
    for br in (4, 8, 16, 32):

        def run(br: int = br) -> None:
            W1.copy_(W0)
            mask1.copy_(mask0)
            column_loop(W1, Err1, mask1, Hinv1, None, n, m, block_rows=br)

        line.append(f"{br}: {1e3 * timed(run, device, args.repeats):7.3f} ms")
    print(f"kernel  {rows:>6}x{count:<4} {args.nm or 'unstructured'} block rows " + " | ".join(line))


def solve_products(W: torch.Tensor, H: torch.Tensor, blocksize: int, subblock: int = 16) -> None:
    """The solve's matrix work alone: `hessian_inverse` and the lazy updates (one product per sub-block of 16
    and per block), as bare calls; what `sparsegpt_prune` spends beyond them is its column loop (the
    per-column OBS updates, mask selection) and the copies."""
    Hinv, _, _ = hessian_inverse(H)
    W = W.float()
    cols = W.shape[1]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        for s1 in range(i1, i2, subblock):
            s2 = min(s1 + subblock, i2)
            W[:, s2:i2].addmm_(W[:, s1:s2], Hinv[s1:s2, s2:i2], alpha=-1)
        W[:, i2:].addmm_(W[:, i1:i2], Hinv[i1:i2, i2:], alpha=-1)


def bench_hessian(cols: int, args, device: torch.device, matmul_gflops: float) -> None:
    seqlen = 2048
    x = torch.randn(1, seqlen, cols, device=device, dtype=getattr(torch, args.dtype))

    def run() -> None:
        H, n = None, 0
        for _ in range(args.hessian_samples):
            H, n = accumulate_hessian(H, x, n)

    secs = timed(run, device, args.repeats)
    flops = 2 * cols * cols * seqlen * args.hessian_samples
    rate = flops / secs / 1e9
    full = secs * 128 / args.hessian_samples
    print(
        f"hessian {cols:>6} cols  {args.hessian_samples}x{seqlen} tokens {secs:8.3f} s {rate:8.1f} GFLOP/s "
        f"({100 * rate / matmul_gflops:5.1f}% of matmul; 128x2048 tokens: {full:.1f} s"
        f"{' projected' if args.hessian_samples != 128 else ''})"
    )


def bench_matmul(args, device: torch.device) -> float:
    n = args.matmul_size
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    secs = timed(lambda: a @ b, device, args.repeats)
    rate = 2 * n**3 / secs / 1e9
    print(f"matmul  {n}x{n}x{n} fp32 {secs:8.4f} s {rate:8.1f} GFLOP/s  (the machine's plain matmul)")
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", help="weight dtype (float16/bfloat16 on GPU); H is always fp32")
    p.add_argument("--small", action="store_true", help="only the embedded model's shapes")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--hessian-samples",
        type=int,
        default=None,
        help="calibration samples of 2048 tokens (default 128 on GPU, 8 on CPU)",
    )
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--nm", default=None, help="N:M pattern of the solves (e.g. 2:4; default 50%% unstructured)")
    p.add_argument("--kernels", default="torch", help="torch or torch,triton (the Triton column loop too)")
    p.add_argument("--block-rows", action="store_true", help="time the Triton kernel's tile heights")
    p.add_argument("--solve-only", action="store_true", help="skip the matmul and Hessian lines")
    p.add_argument("--layouts", action="store_true", help="time the torch loop's two block-buffer layouts")
    p.add_argument("--factor", action="store_true", help="time hessian_inverse's two paths")
    p.add_argument("--factor-cols", default="", help="more widths for --factor, e.g. 14336 (Llama-3.1-8B's down)")
    args = p.parse_args()
    args.prune_nm = parse_nm(args.nm)  # (0, 0): unstructured
    device = torch.device(args.device)
    args.hessian_samples = args.hessian_samples or (128 if device.type == "cuda" else 8)
    args.matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    torch.manual_seed(0)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), torch {torch.__version__}, weights {args.dtype}, Hessian fp32")
    shapes = SMOLLM2 if args.small else SMOLLM2 + LLAMA_7B
    if not args.solve_only:
        matmul = bench_matmul(args, device)
        for cols in sorted({c for _, c in shapes}):
            bench_hessian(cols, args, device, matmul)
    for rows, cols in shapes:
        bench_solve(rows, cols, args, device)
    if args.factor:
        widths = {c for _, c in shapes} | {int(c) for c in args.factor_cols.split(",") if c}
        for cols in sorted(widths):
            bench_factor(cols, args, device)
    if args.layouts:
        for rows, cols in shapes:
            bench_layouts(rows, cols, args, device)
    if args.block_rows:
        for rows in sorted({r for r, _ in shapes}):
            bench_block_rows(rows, args.blocksize, args, device)


if __name__ == "__main__":
    main()
