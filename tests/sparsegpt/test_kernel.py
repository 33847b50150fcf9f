"""The Triton column loop (`sparsegpt.kernel`) against the torch loop and the authors' algorithm.

On a CPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before triton
is imported); `benchmarks/gpu_check.sh` runs these tests (marked `device`) compiled on a GPU. Skipped where
triton is not installed.
"""

from __future__ import annotations

import pytest
import torch

from sparsegpt import QuantSpec, nm_pattern_ok, sparsegpt_prune
from sparsegpt.kernel import column_loop
from sparsegpt.solver import _block_quotas
from tests.sparsegpt.reference import paper_prune
from tests.sparsegpt.test_solver import layer

pytest.importorskip("triton")

CASES = [
    # rows, cols, blocksize, sparsity, n, m: full and partial blocks, widths that are not powers of two
    (64, 96, 32, 0.5, 0, 0),
    (40, 200, 128, 0.7, 0, 0),
    (33, 130, 128, 0.5, 0, 0),
    (64, 256, 128, 0.0, 2, 4),
    (48, 200, 40, 0.0, 4, 8),
    (40, 96, 48, 0.0, 1, 4),
]


@pytest.mark.device
@pytest.mark.parametrize("rows,cols,bs,sparsity,n,m", CASES)
def test_the_kernel_agrees_with_the_torch_loop(device, rows, cols, bs, sparsity, n, m):
    """Same masks, weights and loss to float32 rounding: the torch loop updates by sub-blocks, the kernel
    column by column, which only reorders the sums."""
    W, H, _ = layer(rows, cols, seed=rows + cols + n)
    W, H = W.to(device), H.to(device)
    ref = sparsegpt_prune(W, H, sparsity, prune_n=n, prune_m=m, blocksize=bs)
    got = sparsegpt_prune(W, H, sparsity, prune_n=n, prune_m=m, blocksize=bs, kernel="triton")
    assert torch.equal(got.mask, ref.mask)
    if n:
        assert nm_pattern_ok(got.mask.cpu(), n, m)
    else:
        assert int(got.mask.sum()) == round(rows * cols * sparsity)
    torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-5)
    assert got.loss == pytest.approx(ref.loss, rel=1e-5)


@pytest.mark.device
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_the_kernel_agrees_with_the_paper_algorithm(device, n, m):
    """The kernel's loop is the authors' (a rank-1 update of the rest of the block per column)."""
    rows, cols, bs = 96, 256, 64
    W, H, _ = layer(rows, cols, seed=5)
    res = sparsegpt_prune(W.to(device), H.to(device), 0.5, prune_n=n, prune_m=m, blocksize=bs, kernel="triton")
    counts = None if n else _block_quotas(None, rows, cols, bs, rows * cols // 2)
    ref_W, ref_mask, ref_loss = paper_prune(W, H, 0.5, prunen=n, prunem=m, blocksize=bs, block_counts=counts)
    assert torch.equal(res.mask.cpu(), ref_mask)
    torch.testing.assert_close(res.weight.cpu(), ref_W, rtol=1e-4, atol=1e-5)
    assert res.loss == pytest.approx(ref_loss, rel=1e-4)


@pytest.mark.device
@pytest.mark.parametrize("n,m,sparsity", [(0, 0, 0.6), (2, 4, 0.0)])
def test_a_prior_mask_stays_pruned(device, n, m, sparsity):
    """Unstructured: the prior is part of the block's mask before the loop. N:M: the prior's weights are each
    group's first choices, and a group with more than N of them keeps them all."""
    rows, cols = 48, 128
    W, H, _ = layer(rows, cols, seed=9)
    g = torch.Generator().manual_seed(1)
    prior = torch.rand(rows, cols, generator=g) < 0.2
    if n:
        prior = torch.zeros(rows, cols, dtype=torch.bool)
        prior[:, ::4] = True
        prior[:, 1::4] = torch.rand(rows, cols // 4, generator=g) < 0.3  # some groups hold 2 pruned already
    kw = dict(prune_n=n, prune_m=m, blocksize=64, prior_mask=prior.to(device))
    ref = sparsegpt_prune(W.to(device), H.to(device), sparsity, **kw)
    got = sparsegpt_prune(W.to(device), H.to(device), sparsity, kernel="triton", **kw)
    assert torch.equal(got.mask, ref.mask)
    assert bool((got.mask.cpu() | ~prior).all())
    torch.testing.assert_close(got.weight, ref.weight, rtol=1e-5, atol=1e-5)


def test_ties_in_a_group_go_to_the_earlier_columns():
    """Equal scores (dead inputs, zeros) are chosen left to right, so the pattern stays exact."""
    rows, count = 4, 8
    W1 = torch.zeros(rows, count)  # every score 0: all tie
    W1[1] = torch.arange(1.0, 9.0)  # distinct: the two smallest of each group of four
    mask1 = torch.zeros(rows, count, dtype=torch.bool)
    Hinv1, Err1 = torch.eye(count), torch.empty(rows, count)
    column_loop(W1, Err1, mask1, Hinv1, None, 2, 4)
    want = torch.tensor([1, 1, 0, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(mask1[0], want) and torch.equal(mask1[1], want)
    torch.testing.assert_close(W1[1], torch.tensor([0.0, 0, 3, 4, 0, 0, 7, 8]))
    torch.testing.assert_close(Err1[1], torch.tensor([1.0, 2, 0, 0, 5, 6, 0, 0]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(kernel="cuda"), "kernel must be 'torch' or 'triton'"),
        (dict(kernel="triton", quant=QuantSpec(4)), "does not do joint quantization"),
    ],
)
def test_bad_kernel_arguments(kwargs, match):
    W, H, _ = layer(8, 16)
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(W, H, 0.5, **kwargs)


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    import sparsegpt.kernel as kernel

    monkeypatch.setattr(kernel, "_interpreting", lambda: False)
    W, H, _ = layer(8, 16)
    with pytest.raises(ValueError, match="runs on a GPU, not on cpu; use kernel 'torch'"):
        sparsegpt_prune(W, H, 0.5, kernel="triton")
