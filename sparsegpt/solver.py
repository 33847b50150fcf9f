"""The SparseGPT solve (Frantar & Alistarh 2023, Algorithm 1) for one linear layer.

`sparsegpt_prune(W, H, ...)` prunes ``W`` ``(rows, cols)`` column by column against the
Hessian ``H`` of its inputs: adaptive mask selection per block of ``blocksize``
columns (unstructured) or per group of ``prune_m`` columns (N:M), the OBS error
update inside the block and the lazy batched update of the columns after it,
optionally quantizing the surviving weights inside the same loop.

The column loop is blocked twice: each block of ``blocksize`` columns is split into
sub-blocks of ``subblock`` columns. A column's OBS update touches only the rest of
its sub-block (O(rows · subblock) work); the rest of the block and the rest of the
layer are updated with one matrix product per sub-block and per block. This is the
same arithmetic as the paper's loop, reordered into matrix products. ``kernel="triton"`` runs each
block's column loop as one Triton kernel instead (`sparsegpt.kernel`, a GPU's fast path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsegpt.hessian import damped_energy, error_energy, hessian_inverse, output_energy, squared_norm
from sparsegpt.kernel import column_loop, triton_missing
from sparsegpt.masks import check_prior_mask, lowest_k, target_count
from sparsegpt.quant import QuantGrid, quant_grid, quantize
from sparsegpt.spec import QuantSpec, check_nm, check_sparsity


@dataclass(frozen=True)
class PruneResult:
    """A pruned layer."""

    weight: torch.Tensor
    """``(rows, cols)`` pruned (and possibly quantized) weight, in the input's dtype and device."""
    mask: torch.Tensor
    """``(rows, cols)`` bool, True where a weight was pruned."""
    loss: float
    """The OBS loss the solve accumulated, ``½ Σ (w − q)² / [Hinv]_jj²``."""
    percdamp: float
    """The dampening actually used (larger than asked when retries were needed)."""
    grid: QuantGrid | None = None
    """The quantization grid the surviving weights were rounded to (joint quantization only)."""

    @property
    def sparsity(self) -> float:
        # an exact count, no float copy of the mask (at Llama-3.1-8B's down projection 235 MB, faulted in)
        return int(torch.count_nonzero(self.mask)) / self.mask.numel()


def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    sparsity: float = 0.5,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    quant: QuantSpec | None = None,
    prior_mask: torch.Tensor | None = None,
    name: str = "",
    damp_retries: int = 0,
    subblock: int = 16,
    factor: tuple[torch.Tensor, torch.Tensor, float] | None = None,
    kernel: str = "torch",
) -> PruneResult:
    """Prune ``W`` ``(rows, cols)`` with SparseGPT against ``H`` ``(cols, cols)``.

    ``sparsity`` is the unstructured target (ignored when ``prune_n:prune_m`` is set).
    ``quant`` turns on joint quantization; ``prior_mask`` (True = pruned) is kept
    pruned and grown to the target. ``name`` appears in errors; ``damp_retries``
    allows that many tenfold increases of ``percdamp`` when the Hessian is singular.
    ``factor`` is `hessian_inverse` ``(H, percdamp, damp_retries=...)``'s result when the caller already
    has it (layers that share ``H`` factor it once); ``H`` is then only checked for its shape.
    ``kernel`` runs each block's column loop as torch calls ("torch") or as one Triton kernel ("triton",
    `sparsegpt.kernel`: a GPU's fast path, equal to float32 rounding; no joint quantization).
    Runs on ``W``'s device in fp32; ``H`` is not modified.
    """
    rows, cols = W.shape
    check_sparsity(sparsity)
    check_nm(prune_n, prune_m, cols, blocksize)
    if not (isinstance(blocksize, int) and blocksize > 0 and isinstance(subblock, int) and subblock > 0):
        raise ValueError(f"blocksize and subblock must be positive integers, got {blocksize}, {subblock}")
    if H.shape != (cols, cols):
        raise ValueError(f"H must be ({cols}, {cols}) for a weight with {cols} input columns, got {tuple(H.shape)}")
    target = rows * cols * prune_n // prune_m if prune_m else target_count(rows * cols, sparsity)
    check_prior_mask(prior_mask, W.shape, target)
    if kernel not in ("torch", "triton"):
        raise ValueError(f"kernel must be 'torch' or 'triton', got {kernel!r}")
    if kernel == "triton":
        if quant is not None:
            raise ValueError("kernel 'triton' does not do joint quantization; use kernel 'torch' with quant")
        if missing := triton_missing():
            raise ValueError(missing)

    out_dtype = W.dtype
    W = W.detach().to(torch.float32, copy=True)  # (rows, cols)
    grid = quant_grid(W, quant) if quant is not None else None
    if factor is None:
        factor = hessian_inverse(H.to(W.device), percdamp, name=name, damp_retries=damp_retries)
    Hinv, dead, used_damp = factor
    if Hinv.shape != (cols, cols) or Hinv.device != W.device:
        raise ValueError(f"factor must be ({cols}, {cols}) on {W.device}, got {tuple(Hinv.shape)} on {Hinv.device}")
    W[:, dead] = 0
    prior = prior_mask.to(W.device) if prior_mask is not None else None
    if prune_m:
        # Sub-blocks hold whole N:M groups so that each group is chosen on up-to-date weights.
        subblock = max(prune_m, subblock // prune_m * prune_m)
    quota = _block_quotas(prior, rows, cols, blocksize, target) if not prune_m else None

    mask = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    loss = torch.zeros((), dtype=torch.float32, device=W.device)
    spaces: dict[int, _BlockSpace] = {}  # by column count: all blocks but the last share one
    by_column = _by_column(W.device, kernel)
    for b, i1 in enumerate(range(0, cols, blocksize)):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        space = spaces.get(count) or spaces.setdefault(count, _BlockSpace(W, Hinv, count, subblock, prune_m, by_column))
        space.load(W[:, i1:i2], Hinv[i1:i2, i1:i2])
        prior1 = prior[:, i1:i2] if prior is not None else None
        if prune_m:
            space.mask1.zero_()
        else:
            space.mask1.copy_(_select_unstructured(space.W1, space.Hinv1, prior1, quota[b]))
        if kernel == "triton":
            column_loop(space.W1, space.Err1, space.mask1, space.Hinv1, prior1, prune_n, prune_m)
        else:
            _solve_block(space, prior1, prune_n, prune_m, grid, i1)
        W[:, i1:i2] = space.W1
        mask[:, i1:i2] = space.mask1
        loss += torch.sum(space.Err1 * space.Err1) / 2
        W[:, i2:].addmm_(space.Err1, Hinv[i1:i2, i2:], alpha=-1)
    return PruneResult(weight=W.to(out_dtype), mask=mask, loss=float(loss), percdamp=used_damp, grid=grid)


def solved_error(
    W: torch.Tensor, result: PruneResult, H: torch.Tensor, max_cancel: float = 8.0, *, Hinv: torch.Tensor | None = None
) -> float:
    """`reconstruction_error` ``(W, result.weight, H)`` of a `sparsegpt_prune` result, from its OBS loss: no
    product with ``H`` for the numerator, and with the solve's factor ``Hinv`` none for the denominator.

    The solve's scaled errors ``E`` give ``W₀ − Ŵ = E·U`` (``U``: the upper Cholesky factor of the damped
    ``H⁻¹``; ``W₀``: ``W`` with its dead inputs zeroed, which ``H`` ignores), so ``2·loss = ‖E‖² =
    tr((W₀ − Ŵ)(H + λI)(W₀ − Ŵ)ᵀ)`` and the numerator is ``2·loss − λ‖W₀ − Ŵ‖²``. The denominator ``‖WX‖²``
    is ``tr(W H Wᵀ)``; given ``Hinv`` (``U``, the factor the solve used) it is ``‖W₀U⁻¹‖² − λ‖W₀‖²``
    (`damped_energy`: a triangular solve, half the flops of the product with ``H``: at Llama-3.1-8B's down
    projection 0.84 TFLOP a layer against 1.68). When a ``λ`` term is more than ``1 − 1/max_cancel`` of what it
    is taken from (a Hessian of fewer tokens than columns: the damping dominates the error's energy), the
    difference would lose precision, and when the result was rounded to a lower precision than the solve's
    the loss no longer describes it: that part is computed with ``H`` (`error_energy`, `output_energy`).
    Agrees with `reconstruction_error` to about 1e-6 (SmolLM2's layers).
    """
    diag = torch.diag(H).float()
    dead = diag == 0
    damp = result.percdamp * float(torch.where(dead, 1.0, diag).mean())  # as hessian_inverse dampens
    W0 = W.float().masked_fill(dead.unsqueeze(0), 0) if bool(dead.any()) else W.float()
    num = None
    if result.weight.dtype == torch.float32:
        num = 2 * result.loss - damp * squared_norm(W0, result.weight)
        num = num if num * max_cancel > 2 * result.loss else None
    if num is None:
        num = error_energy(W, result.weight, H)
    den = None
    if Hinv is not None:
        damped = damped_energy(W0, Hinv)
        den = damped - damp * squared_norm(W0)
        den = den if den * max_cancel > damped else None
    if den is None:
        den = output_energy(W, H)
    return num / den if den > 0 else 0.0


def _by_column(device: torch.device, kernel: str) -> bool:
    """Whether the column loop's buffers hold each column contiguous: on a CPU with the torch loop, where a
    column's error and OBS update run 2-5x faster than over columns strided by the block's width
    (a SmolLM2 layer's solve takes 10-30% less time: bench_solver.py --layouts). The Triton kernel reads rows;
    a GPU's torch loop keeps its measured layout."""
    return kernel == "torch" and device.type == "cpu"


def _block_quotas(prior: torch.Tensor | None, rows: int, cols: int, blocksize: int, target: int) -> list[int]:
    """New weights to prune in each block so that the layer hits ``target`` exactly.

    The prunes still needed are spread over blocks in proportion to the weights each
    block has left, rounding the running total, so per-block rounding never adds up.
    """
    starts = range(0, cols, blocksize)
    if prior is None:
        free = [rows * (min(i + blocksize, cols) - i) for i in starts]
        needed = target
    else:
        pruned_per_col = prior.sum(dim=0)
        free = [rows * (min(i + blocksize, cols) - i) - int(pruned_per_col[i : i + blocksize].sum()) for i in starts]
        needed = target - int(prior.sum())
    total_free = sum(free)
    quotas, done, cum = [], 0, 0
    for f in free:
        cum += f
        upto = int(round(needed * cum / total_free)) if total_free else 0
        quotas.append(upto - done)
        done = upto
    return quotas


def _select_unstructured(W1: torch.Tensor, Hinv1: torch.Tensor, prior1: torch.Tensor | None, k: int) -> torch.Tensor:
    """The block's mask: its prior mask plus the ``k`` lowest ``w² / [Hinv]_jj²`` elsewhere."""
    scores = W1.square() / torch.diag(Hinv1).square().unsqueeze(0)  # (rows, count)
    if prior1 is None:
        return lowest_k(scores, k)
    scores.masked_fill_(prior1, float("inf"))
    return lowest_k(scores, k) | prior1


class _BlockSpace:
    """One block's buffers and the views the column loop reads, made once per layer and block width.

    Slicing a tensor is a dispatch (2-3 µs on a CPU), as much as the column's arithmetic: with every view
    the loop needs made here, each column costs two dispatches (its error and its OBS update) and each
    N:M group five. `load` copies the next block in; the views follow the buffers.
    """

    def __init__(
        self, W: torch.Tensor, Hinv: torch.Tensor, count: int, subblock: int, prune_m: int, by_column: bool
    ) -> None:
        rows = W.shape[0]
        f32 = dict(dtype=torch.float32, device=W.device)

        def buffer(dtype: torch.dtype = torch.float32) -> torch.Tensor:  # (rows, count)
            if by_column:  # each column contiguous: a column's ops 2-5x faster on a CPU than strided by count
                return torch.empty(count, rows, dtype=dtype, device=W.device).t()
            return torch.empty(rows, count, dtype=dtype, device=W.device)

        self.W1 = buffer()
        self.Err1 = buffer()
        self.scaled = buffer()  # mask / d: err_j = w_j * scaled[:, j] without quantization
        self.Hinv1 = torch.empty(count, count, **f32)  # (count, count), upper triangular
        if Hinv.stride(0) < Hinv.stride(1):  # in Hinv's layout (column-major from Cholesky): same BLAS paths
            self.Hinv1 = self.Hinv1.t()
        self.d = torch.empty(count, **f32)  # diag(Hinv1)
        self.mask1 = buffer(torch.bool)
        self.w_cols, self.err_cols = self.W1.unbind(1), self.Err1.unbind(1)
        self.scaled_cols, h_rows = self.scaled.unbind(1), self.Hinv1.unbind(0)
        self.subblocks = []  # (s1, s2, W1[:, s2:], Err1[:, s1:s2], Hinv1[s1:s2, s2:]) per sub-block
        self.rests: list[tuple[torch.Tensor, torch.Tensor] | None] = []  # (W1[:, j+1:s2], Hinv1[j, j+1:s2])
        for s1 in range(0, count, subblock):
            s2 = min(s1 + subblock, count)
            tail = (self.W1[:, s2:], self.Err1[:, s1:s2], self.Hinv1[s1:s2, s2:]) if s2 < count else None
            self.subblocks.append((s1, s2, tail))
            self.rests += [(self.W1[:, j + 1 : s2], h_rows[j][j + 1 : s2]) for j in range(s1, s2 - 1)] + [None]
        self.d2 = torch.empty(count, **f32) if prune_m else None  # d²
        if prune_m:
            self.scores = torch.empty(rows, prune_m, **f32)  # (rows, m)
            self.groups = [self._group(j, prune_m) for j in range(0, count, prune_m)]

    def _group(self, j: int, m: int) -> tuple:
        g = slice(j, j + m)
        return self.W1[:, g], self.d2[g].unsqueeze(0), self.mask1[:, g], self.scaled[:, g], self.d[g].unsqueeze(0)

    def load(self, W1: torch.Tensor, Hinv1: torch.Tensor) -> None:
        """Copy a block's weights ``(rows, count)`` and its ``Hinv`` block ``(count, count)`` in."""
        self.W1.copy_(W1)
        self.Hinv1.copy_(Hinv1)
        self.d.copy_(torch.diagonal(self.Hinv1))
        if self.d2 is not None:
            torch.mul(self.d, self.d, out=self.d2)


def _solve_block(
    space: _BlockSpace,
    prior1: torch.Tensor | None,
    prune_n: int,
    prune_m: int,
    grid: QuantGrid | None,
    col0: int,
) -> None:
    """Run the OBS column loop over the block loaded in ``space``, in place.

    On return ``space.W1`` holds the final pruned/quantized weights of the block, ``space.Err1`` its
    errors ``(rows, count)`` and, for N:M, ``space.mask1`` the groups chosen on the way.
    """
    W1, mask1, d = space.W1, space.mask1, space.d
    if not prune_m:
        torch.div(mask1, d.unsqueeze(0), out=space.scaled)
    w_cols, err_cols, scaled_cols, rests = space.w_cols, space.err_cols, space.scaled_cols, space.rests
    for s1, s2, tail in space.subblocks:
        for j in range(s1, s2):
            if prune_m and j % prune_m == 0:
                _select_nm_group(space, j // prune_m, prior1, j, prune_n, prune_m)
            w, err = w_cols[j], err_cols[j]
            if grid is None:
                torch.mul(w, scaled_cols[j], out=err)
            else:
                scale, zero = grid.column(col0 + j)
                q = quantize(w.masked_fill(mask1[:, j], 0), scale, zero, grid.maxq)
                torch.div(w - q, d[j], out=err)
                w.copy_(q)
            rest = rests[j]
            if rest is not None:
                rest[0].addr_(err, rest[1], alpha=-1)
        if tail is not None:
            tail[0].addmm_(tail[1], tail[2], alpha=-1)
    _zero_where_(W1, mask1)


def _zero_where_(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x.masked_fill_(mask, 0)`` for a float32 ``x``, bit for bit (+0.0 also where ``x`` is NaN or -0.0), as
    an AND of its bits with ``mask − 1`` (all ones where kept): on a CPU 16 against 137 µs at 576x128 and 29
    against 363 µs at 1536x128, where a bool mask's `masked_fill_` is not vectorised."""
    x.view(torch.int32).bitwise_and_(mask.to(torch.int32).sub_(1))
    return x


def _select_nm_group(
    space: _BlockSpace, k: int, prior1: torch.Tensor | None, j: int, prune_n: int, prune_m: int
) -> None:
    """Choose the ``prune_n`` lowest-scoring weights of group ``k``, the ``prune_m`` columns from ``j``."""
    w, d2, gmask, scaled, d = space.groups[k]
    scores = space.scores
    torch.mul(w, w, out=scores)
    scores.div_(d2)  # w² / d²
    if prior1 is not None:
        gprior = prior1[:, j : j + prune_m]
        scores.masked_fill_(gprior, float("-inf"))
    idx = torch.topk(scores, prune_n, dim=1, largest=False).indices
    gmask.scatter_(1, idx, True)
    if prior1 is not None:
        gmask |= gprior
    torch.div(gmask, d, out=scaled)
