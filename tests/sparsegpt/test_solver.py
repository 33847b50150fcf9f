"""SparseGPT solve vs the authors' algorithm and textbook OBS, on seeded random layers."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsegpt import (
    HessianError,
    QuantSpec,
    accumulate_hessian,
    hessian_inverse,
    magnitude_prune,
    nm_pattern_ok,
    reconstruction_error,
    solved_error,
    sparsegpt_prune,
    wanda_prune,
)
from sparsegpt.solver import _block_quotas
from tests.sparsegpt.reference import naive_obs, paper_prune


def layer(rows: int, cols: int, seed: int = 0, tokens: int = 512):
    """A random weight and a realistic Hessian from correlated, unevenly scaled inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    scales = torch.exp(torch.randn(cols, generator=g))  # some channels much louder (outliers)
    X = (
        torch.randn(4, tokens // 4, cols, generator=g) @ mix + 0.1 * torch.randn(4, tokens // 4, cols, generator=g)
    ) * scales
    W = torch.randn(rows, cols, generator=g) / cols**0.5
    H, _ = accumulate_hessian(None, X, 0)
    return W, H, X.reshape(-1, cols)


SHAPES = [(64, 96, 32), (48, 200, 64), (128, 128, 128), (96, 130, 128), (32, 256, 16)]


@pytest.mark.parametrize("rows,cols,bs", SHAPES)
def test_unstructured_matches_paper_algorithm(rows, cols, bs):
    W, H, _ = layer(rows, cols, seed=rows + cols)
    res = sparsegpt_prune(W, H, 0.5, blocksize=bs)
    counts = _block_quotas(None, rows, cols, bs, rows * cols // 2)
    ref_W, ref_mask, ref_loss = paper_prune(W, H, 0.5, blocksize=bs, block_counts=counts)
    assert torch.equal(res.mask, ref_mask)
    torch.testing.assert_close(res.weight, ref_W, rtol=1e-4, atol=1e-5)
    assert res.loss == pytest.approx(ref_loss, rel=1e-4)


@pytest.mark.parametrize("rows,cols,bs", [(128, 256, 128), (64, 300, 128), (256, 512, 64), (192, 576, 128)])
def test_unstructured_threshold_rule_agrees(rows, cols, bs):
    """The authors' threshold rule prunes one weight more per block than the exact target.

    On blocks of realistic size (thousands of weights) that single weight, and what it
    changes downstream, leaves the masks agreeing in at least 99.9% of positions.
    """
    W, H, _ = layer(rows, cols, seed=7 * rows + cols)
    res = sparsegpt_prune(W, H, 0.5, blocksize=bs)
    _, ref_mask, _ = paper_prune(W, H, 0.5, blocksize=bs)
    agree = (res.mask == ref_mask).float().mean().item()
    assert agree >= 0.999, agree


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("rows,cols,bs", [(64, 96, 32), (48, 200, 40), (128, 256, 128)])
def test_nm_matches_paper_algorithm(n, m, rows, cols, bs):
    if cols % m or bs % m:
        pytest.skip("shape not divisible by M")
    W, H, _ = layer(rows, cols, seed=cols)
    res = sparsegpt_prune(W, H, prune_n=n, prune_m=m, blocksize=bs)
    ref_W, ref_mask, _ = paper_prune(W, H, 0, prunen=n, prunem=m, blocksize=bs)
    assert (res.mask == ref_mask).float().mean() >= 0.999
    assert nm_pattern_ok(res.mask, n, m)
    if torch.equal(res.mask, ref_mask):
        torch.testing.assert_close(res.weight, ref_W, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("nm", [(0, 0), (2, 4)])
def test_joint_quantization_matches_paper_algorithm(bits, nm):
    rows, cols, bs = 64, 160, 64
    W, H, _ = layer(rows, cols, seed=bits)
    quota = _block_quotas(None, rows, cols, bs, rows * cols // 2)
    res = sparsegpt_prune(W, H, 0.5, prune_n=nm[0], prune_m=nm[1], blocksize=bs, quant=QuantSpec(bits))
    ref_W, ref_mask, _ = paper_prune(
        W, H, 0.5, prunen=nm[0], prunem=nm[1], blocksize=bs, wbits=bits, block_counts=quota
    )
    agree = (res.mask == ref_mask).float().mean().item()
    assert agree >= 0.999
    # Rounding to the grid can flip a value at a half step; nearly all weights agree to fp32 precision.
    close = torch.isclose(res.weight, ref_W, rtol=1e-4, atol=1e-5).float().mean().item()
    assert close >= 0.999, close
    levels = {len(torch.unique(r[~m])) for r, m in zip(res.weight, res.mask, strict=True)}
    assert max(levels) <= 2**bits


def test_matches_textbook_obs_with_explicit_inverses():
    W, H, _ = layer(24, 40, seed=3)
    res = sparsegpt_prune(W, H, 0.6, blocksize=16)
    slow = naive_obs(W, H, res.mask)
    torch.testing.assert_close(res.weight.double(), slow, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.9, 0.0])
def test_exact_unstructured_sparsity(sparsity):
    W, H, _ = layer(50, 130, seed=1)
    res = sparsegpt_prune(W, H, sparsity, blocksize=32)
    assert int(res.mask.sum()) == round(50 * 130 * sparsity)
    assert torch.all(res.weight[res.mask] == 0)


def test_prior_mask_grows_to_target():
    W, H, _ = layer(64, 128, seed=5)
    first = sparsegpt_prune(W, H, 0.5, blocksize=32)
    second = sparsegpt_prune(first.weight, H, 0.7, blocksize=32, prior_mask=first.mask)
    assert torch.all(second.mask[first.mask]), "a weight pruned earlier came back"
    assert int(second.mask.sum()) == round(64 * 128 * 0.7)
    assert torch.all(second.weight[second.mask] == 0)
    nm = sparsegpt_prune(first.weight, H, prune_n=6, prune_m=8, blocksize=32, prior_mask=first.mask)
    assert torch.all(nm.mask[first.mask]) and nm_pattern_ok(nm.mask, 6, 8)


def test_sparsegpt_beats_magnitude_and_wanda():
    W, H, X = layer(128, 256, seed=11, tokens=2048)
    for n, m, s in [(0, 0, 0.5), (2, 4, 0.5), (0, 0, 0.7)]:
        sg = reconstruction_error(W, sparsegpt_prune(W, H, s, prune_n=n, prune_m=m).weight, H)
        mag = reconstruction_error(W, magnitude_prune(W, s, prune_n=n, prune_m=m).weight, H)
        wanda = reconstruction_error(W, wanda_prune(W, torch.diag(H), s, prune_n=n, prune_m=m).weight, H)
        assert sg < wanda < mag, (n, m, s, sg, wanda, mag)


def test_reconstruction_error_equals_direct_computation():
    W, H, X = layer(32, 64, seed=2)
    W_hat = magnitude_prune(W, 0.5).weight
    direct = ((X @ (W - W_hat).T).square().sum() / (X @ W.T).square().sum()).item()
    assert reconstruction_error(W, W_hat, H) == pytest.approx(direct, rel=1e-4)
    assert reconstruction_error(W, W_hat, H, rows=5) == pytest.approx(direct, rel=1e-4)  # in chunks of rows


def test_dead_inputs_are_zeroed():
    W, H, _ = layer(16, 32, seed=4)
    H[5, :] = 0
    H[:, 5] = 0
    res = sparsegpt_prune(W, H, 0.5, blocksize=16)
    assert torch.all(res.weight[:, 5] == 0)


def test_dtype_device_and_inputs_untouched():
    W, H, _ = layer(32, 64, seed=6)
    W16, H0 = W.to(torch.bfloat16), H.clone()
    res = sparsegpt_prune(W16, H, 0.5, blocksize=32)
    assert res.weight.dtype == torch.bfloat16 and res.weight.device == W16.device
    assert torch.equal(H, H0)
    assert res.mask.dtype == torch.bool and res.mask.shape == W.shape


def test_singular_hessian_names_layer_and_retries(caplog):
    H = torch.tensor([[1.0, 2.0], [2.0, 1.0]]).repeat(4, 4)  # indefinite
    W = torch.randn(4, 8)
    with pytest.raises(HessianError, match=r"model.layers.3.mlp.up_proj.*percdamp"):
        sparsegpt_prune(W, H, 0.5, blocksize=8, name="model.layers.3.mlp.up_proj")
    with caplog.at_level(logging.WARNING, logger="sparsegpt.hessian"):
        res = sparsegpt_prune(W, H, 0.5, blocksize=8, name="L", damp_retries=4)
    assert res.percdamp > 0.01 and "retrying" in caplog.text


def test_a_given_factor_gives_the_same_bits_and_a_wrong_one_is_refused():
    W, H, _ = layer(24, 64, seed=8)
    factor = hessian_inverse(H, 0.01)
    for kw in ({"sparsity": 0.5}, {"prune_n": 2, "prune_m": 4}, {"sparsity": 0.5, "quant": QuantSpec(4)}):
        a, b = sparsegpt_prune(W, H, blocksize=32, **kw), sparsegpt_prune(W, H, blocksize=32, factor=factor, **kw)
        assert torch.equal(a.weight, b.weight) and torch.equal(a.mask, b.mask) and a.loss == b.loss
    with pytest.raises(ValueError, match=r"factor must be \(64, 64\)"):
        sparsegpt_prune(W, H, 0.5, factor=hessian_inverse(H[:32, :32], 0.01))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"sparsity": 1.0}, r"\[0, 1\)"),
        ({"sparsity": -0.1}, r"\[0, 1\)"),
        ({"prune_n": 4, "prune_m": 4}, "0 < N < M"),
        ({"prune_n": 2, "prune_m": 5}, "multiple of M=5"),
        ({"prune_n": 2, "prune_m": 4, "blocksize": 30}, "blocksize"),
        ({"quant": "Q"}, None),
        ({"prior_mask": torch.zeros(3, 3, dtype=torch.bool)}, "shape"),
        ({"prior_mask": torch.ones(8, 16, dtype=torch.bool)}, "only grows"),
    ],
)
def test_bad_arguments(kwargs, match):
    W, H, _ = layer(8, 16, seed=0)
    if kwargs.get("quant") == "Q":
        for bits in (1, 9):
            with pytest.raises(ValueError, match="2..8"):
                QuantSpec(bits)
        return
    with pytest.raises(ValueError, match=match):
        sparsegpt_prune(W, H, **{"sparsity": 0.5, **kwargs})


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prune_n": 2, "prune_m": 4}, {"quant": QuantSpec(4)}, {"percdamp": 0.1}, {"dead": True}, {"prior": True}],
    ids=["unstructured", "2:4", "quantized", "damped", "dead inputs", "prior mask"],
)
def test_solved_error_is_the_reconstruction_error(kwargs):
    """The error from the solve's loss against the direct computation, over the solve's variants; a heavily
    damped solve (the loss mostly damping) takes the direct computation and agrees exactly."""
    W, H, _ = layer(96, 160, seed=4)
    kwargs = dict(kwargs)
    if kwargs.pop("dead", False):
        H[:, 7], H[7, :], H[:, 90], H[90, :] = 0, 0, 0, 0
    if kwargs.pop("prior", False):
        kwargs["prior_mask"] = sparsegpt_prune(W, H, 0.3, blocksize=32).mask
    factor = hessian_inverse(H, kwargs.get("percdamp", 0.01))
    res = sparsegpt_prune(W, H, 0.6, blocksize=32, factor=factor, **kwargs)
    direct = reconstruction_error(W, res.weight, H)
    assert solved_error(W, res, H) == pytest.approx(direct, rel=1e-5)
    assert solved_error(W, res, H, Hinv=factor[0]) == pytest.approx(direct, rel=1e-5)  # ‖W₀U⁻¹‖² − λ‖W₀‖²
    damped = sparsegpt_prune(W, H, 0.6, blocksize=32, percdamp=100.0)
    assert solved_error(W, damped, H) == reconstruction_error(W, damped.weight, H)
    half = sparsegpt_prune(W.bfloat16(), H, 0.6, blocksize=32)  # rounded after the solve: computed directly
    assert solved_error(W.bfloat16(), half, H) == reconstruction_error(W.bfloat16(), half.weight, H)
    # the denominator from the factor also where the numerator is computed with H
    for r, f in ((damped, hessian_inverse(H, 100.0)), (half, hessian_inverse(H, 0.01))):
        w = W.to(r.weight.dtype)
        assert solved_error(w, r, H, Hinv=f[0]) == pytest.approx(reconstruction_error(w, r.weight, H), rel=1e-5)


def test_solved_error_of_a_hessian_of_fewer_tokens_than_columns():
    """A rank-deficient H (8 tokens, 160 columns, percdamp 0.3): the damping is most of the loss, so the
    numerator is computed with H while the denominator still comes from the factor; both agree with the
    direct error."""
    W, H, _ = layer(96, 160, seed=6, tokens=8)
    factor = hessian_inverse(H, 0.3)
    res = sparsegpt_prune(W, H, 0.5, blocksize=32, factor=factor)
    direct = reconstruction_error(W, res.weight, H)
    damping = res.loss - direct * float(torch.trace(W @ H @ W.T)) / 2
    assert damping > (1 - 1 / 8) * res.loss  # the case: more than solved_error's max_cancel allows
    assert solved_error(W, res, H, Hinv=factor[0]) == pytest.approx(direct, rel=1e-5)


@pytest.mark.device
@pytest.mark.parametrize("ties", [False, True])
def test_lowest_k_selects_exactly_the_k_lowest(device, ties):
    """Against a stable sort: exactly k entries, none above any unselected one; distinct scores give the very
    set of `topk`; ties at the k-th value go to the first in index order (on a GPU: its sort path)."""
    from sparsegpt.masks import lowest_k

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (6, 8), generator=g).float() if ties else torch.rand(6, 8, generator=g)
    flat = scores.flatten()
    for k in range(flat.numel() + 1):
        mask = lowest_k(scores.to(device), k).flatten().cpu()
        ref = torch.zeros_like(mask)
        ref[torch.sort(flat, stable=True).indices[:k]] = True
        assert int(mask.sum()) == k
        assert torch.equal(mask, ref), k
        if not ties and 0 < k:
            topk = torch.topk(flat, k, largest=False).indices.sort().values
            assert torch.equal(mask.nonzero().flatten(), topk)


def test_the_gpu_selection_is_the_cpu_selection():
    """`lowest_k`'s sort path (GPUs) and its bucketed `kth_smallest` path (CPUs), run here on the same block of
    a (256, 128) solve with many ties."""
    from sparsegpt.masks import _lowest_k_sorted, lowest_k

    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 300, (256, 128), generator=g).float().square() / 7
    for k in (1, 4096, 16384, 16385, 32767):
        assert torch.equal(_lowest_k_sorted(scores.flatten(), k).reshape(scores.shape), lowest_k(scores, k)), k


@pytest.mark.parametrize("kind", ["squares", "ties", "inf and zeros", "negative", "nan"])
def test_kth_smallest_is_the_sorted_kth_entry(kind):
    """The bucketed selection against a sort, at sizes that take it (and values that must not)."""
    from sparsegpt.masks import kth_smallest

    g = torch.Generator().manual_seed(1)
    n = 3 * (1 << 14) + 5
    flat = torch.randn(n, generator=g).square() / torch.rand(n, generator=g).square()
    if kind == "ties":
        flat = torch.randint(0, 7, (n,), generator=g).float() / 3
    elif kind == "inf and zeros":
        flat[::3], flat[1::5] = float("inf"), 0.0
    elif kind == "negative":
        flat = torch.randn(n, generator=g)
    elif kind == "nan":
        flat[::7] = float("nan")
    for k in (1, 2, n // 3, n // 2, n // 2 + 1, n - 1, n):
        got, want = kth_smallest(flat, k), torch.kthvalue(flat, k).values
        assert got.dtype == want.dtype and (torch.equal(got, want) or (got.isnan() and want.isnan())), (k, got, want)
        if kind != "nan":
            assert torch.equal(got, torch.sort(flat).values[k - 1]), k


def test_the_triton_kernel_without_triton_says_how_to_get_it(monkeypatch):
    import sparsegpt.solver as solver

    monkeypatch.setattr(solver, "triton_missing", lambda: "kernel 'triton' needs the triton package (x)")
    W, H, _ = layer(8, 16)
    with pytest.raises(ValueError, match="needs the triton package"):
        sparsegpt_prune(W, H, 0.5, kernel="triton")


@pytest.mark.device
@pytest.mark.parametrize("n,m", [(0, 0), (2, 4)])
def test_the_solve_on_the_device_agrees_with_the_paper_algorithm(device, n, m):
    """On a GPU (benchmarks/gpu_check.sh) the solve gives the CPU reference's mask but for near ties, its
    N:M pattern exactly, and the reference's weights wherever the masks agree."""
    W, H, _ = layer(128, 256, seed=11)
    res = sparsegpt_prune(W.to(device), H.to(device), 0.5, prune_n=n, prune_m=m, blocksize=64)
    assert res.weight.device.type == res.mask.device.type == torch.device(device).type
    if n:
        ref_W, ref_mask, _ = paper_prune(W, H, 0, prunen=n, prunem=m, blocksize=64)
    else:
        counts = _block_quotas(None, 128, 256, 64, 128 * 256 // 2)
        ref_W, ref_mask, _ = paper_prune(W, H, 0.5, blocksize=64, block_counts=counts)
    mask = res.mask.cpu()
    assert (mask == ref_mask).float().mean() >= 0.999
    if n:
        assert nm_pattern_ok(mask, n, m)
    if torch.equal(mask, ref_mask):  # always on the CPU
        torch.testing.assert_close(res.weight.cpu(), ref_W, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"prune_n": 2, "prune_m": 4}, {"quant": QuantSpec(4)}, {"prior": True}],
    ids=["unstructured", "2:4", "quant", "prior"],
)
def test_both_buffer_layouts_solve_alike(monkeypatch, kwargs):
    """The CPU's column-contiguous buffers and the row layout a GPU keeps: the same masks, the same weights to
    float32 rounding (their rank-1 updates and products run different BLAS paths)."""
    import sparsegpt.solver as solver

    W, H, _ = layer(96, 200, seed=5)
    if kwargs.pop("prior", False):
        kwargs["prior_mask"] = magnitude_prune(W, 0.3).mask
    by_column = sparsegpt_prune(W, H, 0.5, blocksize=64, **kwargs)
    monkeypatch.setattr(solver, "_by_column", lambda device, kernel: False)
    by_row = sparsegpt_prune(W, H, 0.5, blocksize=64, **kwargs)
    assert solver._by_column(W.device, "torch") is False  # the patch took: the second solve used rows
    assert torch.equal(by_column.mask, by_row.mask)
    torch.testing.assert_close(by_column.weight, by_row.weight, rtol=1e-5, atol=1e-6)
    assert by_column.loss == pytest.approx(by_row.loss, rel=1e-5)


def test_zero_where_is_masked_fill_bit_for_bit():
    from sparsegpt.solver import _zero_where_

    g = torch.Generator().manual_seed(3)
    x = torch.empty(40, 24).t()  # (24, 40), column-major as the CPU's block buffers
    x.copy_(torch.randn(24, 40, generator=g))
    x[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), float("-inf")])
    mask = torch.rand(24, 40, generator=g) < 0.5
    mask[0, :4] = True
    mask[1, :4] = False
    x[1, :4] = torch.tensor([float("nan"), -0.0, float("inf"), -1.0])
    expected = x.masked_fill(mask, 0)
    got = _zero_where_(x, mask)
    assert got is x and torch.equal(got.view(torch.int32), expected.view(torch.int32))


@pytest.mark.parametrize("dead", [False, True], ids=["", "dead inputs"])
def test_damped_energy_against_float64(dead):
    """`damped_energy` from the solve's factor equals tr(W₀ (H + λI) W₀ᵀ) computed in float64 with H itself,
    over several row chunks; `output_energy` (the product with H) agrees with tr(W H Wᵀ) likewise."""
    from sparsegpt.hessian import damped_energy, output_energy

    W, H, _ = layer(70, 48, seed=5)
    if dead:
        H[:, 3], H[3, :] = 0, 0
    Hinv, dead_cols, percdamp = hessian_inverse(H, 0.05)
    W0 = W.masked_fill(dead_cols.unsqueeze(0), 0)
    Hd = H.double().clone()
    Hd[dead_cols, dead_cols] = 1
    lam = percdamp * float(torch.diag(Hd).mean())
    damped = Hd + lam * torch.eye(48, dtype=torch.float64)
    ref = float(torch.trace(W0.double() @ damped @ W0.double().T))
    assert damped_energy(W0, Hinv, rows=32) == pytest.approx(ref, rel=1e-5)
    plain = float(torch.trace(W.double() @ H.double() @ W.double().T))
    assert output_energy(W, H, rows=32) == pytest.approx(plain, rel=1e-6)
