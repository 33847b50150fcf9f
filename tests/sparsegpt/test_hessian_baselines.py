"""Hessian accumulation, the baselines, and OWL allocation vs direct computations."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsegpt import (
    QuantSpec,
    accumulate_diagonal,
    accumulate_hessian,
    magnitude_prune,
    nm_pattern_ok,
    outlier_ratio,
    owl_sparsities,
    quant_grid,
    wanda_prune,
)


def test_running_hessian_equals_batch_mean():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(b, 16, 24, generator=g, dtype=torch.float64).to(torch.bfloat16) for b in (3, 1, 5)]
    H, n = None, 0
    for x in batches:
        H, n = accumulate_hessian(H, x, n)
    X = torch.cat([x.double() for x in batches]).reshape(-1, 24)
    expected = 2 / 9 * X.T @ X
    assert n == 9 and H.dtype == torch.float32
    torch.testing.assert_close(H.double(), expected, rtol=1e-5, atol=1e-5)


def test_running_diagonal_equals_the_hessians_diagonal():
    """What OWL accumulates: diag(2/n X^T X), as a vector, with the same running rescaling and counting."""
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(b, 16, 24, generator=g) for b in (3, 1, 5)] + [torch.randn(16, 24, generator=g)]
    H = d = None
    n = m = 0
    for x in batches:
        H, n = accumulate_hessian(H, x, n)
        d, m = accumulate_diagonal(d, x, m)
    X = torch.cat([x.reshape(-1, 24).double() for x in batches])
    assert n == m == 10 and d.shape == (24,) and d.dtype == torch.float32
    torch.testing.assert_close(d.double(), (X.square().sum(0) * 2 / 10), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(d, torch.diag(H), rtol=1e-5, atol=1e-6)


def test_two_dim_input_counts_as_one_sample():
    x = torch.randn(10, 8)
    H, n = accumulate_hessian(None, x, 0)
    assert n == 1
    torch.testing.assert_close(H, 2 * x.T @ x)


def test_hessian_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="expected"):
        accumulate_hessian(torch.zeros(4, 4), torch.randn(2, 3, 5), 1)


def test_magnitude_prunes_smallest_of_layer():
    W = torch.randn(20, 40)
    res = magnitude_prune(W, 0.3)
    k = round(800 * 0.3)
    assert int(res.mask.sum()) == k
    assert W.abs()[res.mask].max() <= W.abs()[~res.mask].min()
    nm = magnitude_prune(W, prune_n=2, prune_m=4)
    assert nm_pattern_ok(nm.mask, 2, 4) and int(nm.mask.sum()) == 400


def test_wanda_is_per_row_with_input_norms():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 32, generator=g)
    norms = torch.rand(32, generator=g) * 10
    res = wanda_prune(W, norms, 0.5)
    score = W.abs() * norms.sqrt()
    assert torch.all(res.mask.sum(dim=1) == 16)
    for r in range(16):
        assert score[r][res.mask[r]].max() <= score[r][~res.mask[r]].min()
    nm = wanda_prune(W, norms, prune_n=2, prune_m=4)
    assert nm_pattern_ok(nm.mask, 2, 4)


def test_baselines_keep_prior_mask():
    W = torch.randn(16, 32)
    prior = magnitude_prune(W, 0.25).mask
    for res in (magnitude_prune(W, 0.5, prior_mask=prior), wanda_prune(W, torch.ones(32), 0.5, prior_mask=prior)):
        assert torch.all(res.mask[prior]) and int(res.mask.sum()) == 256


def test_owl_allocation():
    ratios = [0.01, 0.05, 0.02, 0.03]
    s = owl_sparsities(ratios, 0.7, lam=0.08)
    assert sum(s) / 4 == pytest.approx(0.7)
    assert max(s) - min(s) == pytest.approx(0.16)  # the spread is 2λ, as in the authors' code
    assert all(0.7 - 0.16 <= x <= 0.7 + 0.16 for x in s)
    assert s[1] < s[3] < s[2] < s[0]  # more outliers, lower sparsity
    assert owl_sparsities([0.1, 0.1], 0.5) == [0.5, 0.5]
    with pytest.raises(ValueError, match="lambda"):
        owl_sparsities(ratios, 0.5, lam=1.5)


def test_outlier_ratio_counts_large_scores():
    W = torch.ones(10, 10)
    norms = torch.ones(10)
    norms[0] = 10_000.0  # column 0 scores 100, the rest 1; mean 10.9; 5x mean = 54.5
    assert outlier_ratio(W, norms) == pytest.approx(0.1)


def test_quant_grid_includes_zero_and_groups():
    W = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, 0.5, 0.0]])
    grid = quant_grid(W, QuantSpec(bits=2))
    # Row 0: range [0, 4] (0 forced in), scale 4/3, zero 0.
    assert grid.scale[0, 0] == pytest.approx(4 / 3) and grid.zero[0, 0] == 0
    grouped = quant_grid(W, QuantSpec(bits=2, groupsize=2))
    assert grouped.scale.shape == (2, 2)
    with pytest.raises(ValueError, match="groupsize"):
        quant_grid(W, QuantSpec(bits=2, groupsize=3))


@pytest.mark.parametrize("cols", [100, 300, 1030, 4100])
def test_blocked_symmetric_update_equals_plain_gemm(cols):
    g = torch.Generator().manual_seed(cols)
    H, n = None, 0
    xs = [torch.randn(2, 8, cols, generator=g) for _ in range(2)]
    for x in xs:
        H, n = accumulate_hessian(H, x, n)
    X = torch.cat(xs).reshape(-1, cols).double()
    torch.testing.assert_close(H.double(), 2 / 4 * X.T @ X, rtol=1e-5, atol=1e-4)
    assert torch.equal(H, H.T)


def test_all_finite_is_exact_also_when_the_sum_overflows():
    from sparsegpt.hessian import _all_finite

    big = torch.full((4, 4), 3e38)  # finite entries whose fp32 sum is inf
    assert _all_finite(big) and _all_finite(torch.eye(3))
    for bad in (float("nan"), float("inf"), float("-inf")):
        t = torch.eye(3)
        t[1, 2] = bad
        assert not _all_finite(t)
    mixed = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not _all_finite(mixed)


def _spd(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    X = torch.randn(2 * n, n, generator=g, dtype=dtype)
    return X.T @ X / n + torch.eye(n, dtype=dtype)  # a Hessian


@pytest.mark.parametrize("by_halves", [False, True])
@pytest.mark.parametrize("n", [1, 7, 128, 300])
def test_invert_lower_in_place_equals_inverse(n, by_halves):
    from sparsegpt.hessian import _invert_lower_

    L = torch.linalg.cholesky(_spd(n))  # a Hessian's factor
    got = _invert_lower_(L.clone(), leaf=32, by_halves=by_halves)  # 300: unequal halves, leaves of 18-19
    torch.testing.assert_close(got, torch.linalg.inv(L), rtol=1e-10, atol=1e-10)
    assert torch.equal(got, got.tril())


@pytest.mark.parametrize("k", [1, 5, 16, 77])
def test_triangular_products_in_place_equal_plain_products(k):
    from sparsegpt.hessian import _trmm_left_, _trmm_right_

    g = torch.Generator().manual_seed(k)
    T = torch.randn(k, k, generator=g, dtype=torch.float64).tril()
    X = torch.randn(9, k, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_trmm_right_(X.clone(), T, leaf=4), X @ T, rtol=1e-12, atol=1e-12)
    Y = X.t().contiguous()  # (k, 9)
    torch.testing.assert_close(_trmm_left_(T, Y.clone(), leaf=4), T @ Y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [1, 7, 64, 300])
def test_cholesky_in_place_equals_lapacks_and_reads_the_lower_triangle(n):
    from sparsegpt.hessian import _cholesky_lower_

    A = _spd(n)
    got = A.clone()
    got[torch.ones(n, n, dtype=torch.bool).triu(1)] = float("nan")  # the upper triangle is never read
    assert _cholesky_lower_(got, leaf=16) == 0  # 300: unequal halves, leaves of 9-10
    torch.testing.assert_close(got, torch.linalg.cholesky(A), rtol=1e-10, atol=1e-10)
    assert torch.equal(got, got.tril())


@pytest.mark.parametrize("bad", [3, 40, 41, 299])
def test_cholesky_in_place_reports_the_first_failing_minor_as_lapack(bad):
    from sparsegpt.hessian import _cholesky_lower_

    A = _spd(300)
    A[bad, bad] = -1.0  # leading minors up to `bad` stay positive definite
    expected = int(torch.linalg.cholesky_ex(A).info)
    assert expected == bad + 1 and _cholesky_lower_(A.clone(), leaf=16) == expected


@pytest.mark.parametrize("by_halves", [False, True])
def test_hessian_inverse_retries_a_minor_that_fails_in_either_path(monkeypatch, caplog, by_halves):
    """A Hessian that is positive definite in its first 500 columns only (reversed, its last 100): the
    in-place factor by halves fails in its second half and retries on a fresh copy, as cuSOLVER's path."""
    from sparsegpt import hessian, hessian_inverse

    monkeypatch.setattr(hessian, "_by_halves", lambda device: by_halves)
    H = _spd(600, torch.float32)
    H[20, 20] = -0.5  # reversed: minor 580 fails, past the first half of 300
    H0 = H.clone()
    with pytest.raises(hessian.HessianError, match="percdamp"):
        hessian_inverse(H, 0.0)
    with caplog.at_level(logging.WARNING, logger="sparsegpt.hessian"):
        U, _, damp = hessian_inverse(H, 0.01, damp_retries=3)
    assert torch.equal(H, H0) and damp > 0.01 and "retrying" in caplog.text
    assert torch.equal(U, hessian_inverse(H, damp)[0])  # a retry starts from a fresh copy: the same bits
    ref = H.double()
    ref.diagonal().add_(damp * ref.diagonal().mean())
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(ref)), upper=True)
    assert float((U.double() - ref).norm() / ref.norm()) < 1e-5


def test_both_factor_paths_agree(monkeypatch):
    """A CPU factors by halves; cuSOLVER's path (a GPU's) gives the same factor to float32 rounding."""
    from sparsegpt import hessian

    H = _spd(700, torch.float32)
    assert hessian._by_halves(H.device)
    U_halves = hessian.hessian_inverse(H, 0.01)[0]
    monkeypatch.setattr(hessian, "_by_halves", lambda device: False)
    U_lapack = hessian.hessian_inverse(H, 0.01)[0]
    assert torch.equal(U_halves, U_halves.triu())
    assert float((U_halves - U_lapack).norm() / U_lapack.norm()) < 1e-6


@pytest.mark.parametrize("n,rows", [(1, 4), (7, 2), (8, 3), (9, 4), (300, 256), (301, 64)])
def test_reverse_in_place_equals_flip(n, rows):
    """`_reverse_` reverses both axes in place as `flip(0, 1)` does, for odd and even sizes and chunks that
    do and do not divide the half."""
    from sparsegpt.hessian import _reverse_

    A = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    expected = A.flip(0, 1)
    got = _reverse_(A, rows=rows)
    assert got is A and torch.equal(got, expected)
