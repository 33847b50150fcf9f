"""Tolerances for float32 reductions computed two ways (batched vs one at a time, trie vs full rows).

A summed log-likelihood of ~100 tokens near -131 has an fp32 ulp of 1.5e-5, and the last
bits move with the matmul kernels a CPU picks (AVX2, AVX-512, AMX, the `default` ATen
kernels), the thread count and the padding of a batch. So sums are compared with a
tolerance that grows with the number of tokens summed and the magnitude of the sum;
greedy flags and argmax predictions are still compared exactly by the tests.
"""

from __future__ import annotations

from collections.abc import Sequence


def assert_sums_close(
    got: Sequence[float],
    want: Sequence[float],
    n_terms: Sequence[int],
    per_term: float = 1e-5,
    rel: float = 1e-6,
    atol: float = 0.0,
) -> None:
    """``|got - want| <= atol + per_term * n + rel * |want|`` element-wise (``n`` terms summed), else
    AssertionError naming the mismatches."""
    assert len(got) == len(want) == len(n_terms), f"lengths differ: {len(got)}, {len(want)}, {len(n_terms)}"
    bad = []
    for j, (g, w, n) in enumerate(zip(got, want, n_terms, strict=True)):
        tol = atol + per_term * max(n, 1) + rel * abs(w)
        if not abs(g - w) <= tol:
            bad.append(f"[{j}] {g!r} vs {w!r} (diff {abs(g - w):.3g} > tol {tol:.3g}, {n} terms)")
    assert not bad, f"{len(bad)} of {len(got)} sums differ: " + "; ".join(bad[:5])
