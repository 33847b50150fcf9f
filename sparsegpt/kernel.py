"""The SparseGPT column loop of one block as a single Triton kernel (``sparsegpt_prune(kernel="triton")``).

On a GPU the torch column loop is launch-bound: two small kernels per column (its error and its OBS
update) and five per N:M group, each a few microseconds of launch for microseconds of work, 82-94% of
the solve on an H200 (`benchmarks/bench_solver.py`). The loop is independent across rows (a row's
errors, updates and N:M choices read only that row and ``Hinv1``), so one program holds a tile of
``block_rows`` rows of the block in registers and runs all its columns: per column ``j`` the error
``err = w_j · [pruned]/d_j``, the update ``W1[:, j+1:] -= err ⊗ Hinv1[j, j+1:]``, and at the first
column of each N:M group the group's choice (the ``prune_n`` lowest ``w²/d²`` of the row, earlier
columns first among equal scores, a prior mask's weights first). One launch per block.

It is the paper's loop itself (a rank-1 update of the whole rest of the block per column), where the
torch loop splits the block into sub-blocks and updates the rest of each with one product; the two
agree to float32 rounding (`tests/sparsegpt/test_kernel.py`), so masks differ only where rounding decides a
near tie (none on the tests' layers and SmolLM2's shapes; 24-1668 of 17-45M weights on Llama-7B's, in blocks
after the first, whose inputs carry the earlier blocks' rounding). Joint
quantization stays on the torch loop. On a CPU the kernel runs only in Triton's interpreter (numpy, slow;
``TRITON_INTERPRET=1``): for tests, not for use.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import torch


def triton_missing() -> str | None:
    """Why ``kernel="triton"`` cannot run here (the package is missing), or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"kernel triton needs the triton package ({e}); pip install triton, or use kernel torch"
    return None


def column_loop(
    W1: torch.Tensor,
    Err1: torch.Tensor,
    mask1: torch.Tensor,
    Hinv1: torch.Tensor,
    prior1: torch.Tensor | None,
    prune_n: int,
    prune_m: int,
    block_rows: int | None = None,
) -> None:
    """Run the OBS column loop of one block in place, as `sparsegpt.solver._solve_block` does without
    quantization.

    ``W1`` ``(rows, count)`` float32 holds the block's weights and ends with its pruned weights, ``Err1``
    (same shape) receives the scaled errors, ``mask1`` (bool, same shape) is the block's mask (unstructured:
    chosen before the loop; N:M: all False, filled here), ``Hinv1`` ``(count, count)`` is the upper factor's
    block and ``prior1`` (bool or None) an earlier mask that stays pruned (N:M only; an unstructured prior is
    already in ``mask1``). ``W1``, ``Err1`` and ``mask1`` must be contiguous.
    """
    missing = triton_missing()
    if missing:
        raise RuntimeError(missing)
    rows, count = W1.shape
    for name, t in (("W1", W1), ("Err1", Err1), ("mask1", mask1)):
        if t.shape != (rows, count) or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous ({rows}, {count}), got {tuple(t.shape)}")
    width = max(16, 1 << (count - 1).bit_length())  # the tile's columns: a power of two
    if block_rows is None:
        block_rows = max(1, min(8 if prune_m else 16, 2048 // width))  # the fastest on an H200 at 128 wide
    prior = prior1 if prior1 is not None else mask1  # never read without HAS_PRIOR
    grid = (-(-rows // block_rows),)
    if W1.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"kernel 'triton' runs on a GPU, not on {W1.device.type}; use kernel 'torch' (Triton's interpreter, "
            "TRITON_INTERPRET=1 before triton is imported, runs it on a CPU for tests)"
        )
    _kernel()[grid](
        W1,
        Err1,
        mask1.view(torch.uint8),
        prior.view(torch.uint8),
        Hinv1,
        rows,
        count,
        W1.stride(0),
        prior.stride(0),
        Hinv1.stride(0),
        Hinv1.stride(1),
        BR=block_rows,
        BC=width,
        N=prune_n,
        M=prune_m,
        HAS_PRIOR=prior1 is not None and prune_m > 0,
    )


@cache
def _kernel() -> Any:
    """The kernel: compiled for the GPU, or wrapped for Triton's interpreter when TRITON_INTERPRET=1 was set
    before triton's first import (the interpreter replaces triton's own library functions then)."""
    import triton

    from sparsegpt.kernel_src import column_loop_kernel

    return triton.jit(column_loop_kernel)


def _interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs
    except ImportError:  # triton < 3.4 reads the variable itself
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return bool(knobs.runtime.interpret)
