"""Hessians of a linear layer's inputs and the inverse factor the solve needs.

``H = (2/n) Σ x xᵀ`` is kept as a running mean in fp32 so that calibration
batches can be streamed in (`accumulate_hessian`). `hessian_inverse` applies the
paper's conditioning (dead inputs, dampening) and returns the upper Cholesky
factor of ``H⁻¹`` that Algorithm 1 reads its rows from.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class HessianError(ValueError):
    """The Hessian is not positive definite even after dampening."""


def accumulate_hessian(H: torch.Tensor | None, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """Fold a batch of inputs into the running Hessian ``H = (2/n) Σ x xᵀ``.

    ``x`` is ``(batch, seq, cols)`` or ``(seq, cols)`` (one sample), in any dtype; ``n``
    counts samples seen so far, as the reference implementation does. ``H`` is
    ``None`` before the first batch, else an fp32 ``(cols, cols)`` tensor that is
    updated in place. Returns ``(H, n)``.
    """
    cols = x.shape[-1]
    batch = x.shape[0] if x.dim() >= 3 else 1
    x = x.reshape(-1, cols)  # (tokens, cols)
    if x.dtype != torch.float32:
        x = x.float()
    if H is None:
        H = torch.zeros(cols, cols, dtype=torch.float32, device=x.device)
    elif H.shape != (cols, cols) or H.dtype != torch.float32:
        raise ValueError(
            f"H has shape {tuple(H.shape)} and dtype {H.dtype}; expected ({cols}, {cols}) float32 "
            "for inputs with that many columns"
        )
    n_new = n + batch
    beta, alpha = n / n_new, 2.0 / n_new
    # H is symmetric: compute the diagonal and upper blocks with GEMMs, mirror the rest. A GEMM's
    # xᵀx is not bit-symmetric on every CPU kernel (AVX2 MKL tiles (i, j) and (j, i) differently),
    # so each diagonal block keeps its upper triangle and mirrors it: H is exactly symmetric everywhere.
    edges = symmetric_edges(cols)
    parts = len(edges) - 1
    for a in range(parts):
        ra = slice(edges[a], edges[a + 1])
        for b in range(a, parts):
            rb = slice(edges[b], edges[b + 1])
            H[ra, rb].addmm_(x[:, ra].t(), x[:, rb], beta=beta, alpha=alpha)  # H <- H·n/(n+b) + (2/(n+b)) xᵀx
            if b > a:
                H[rb, ra].copy_(H[ra, rb].t())
        block = H[ra, ra]
        upper = block.triu(1).t()
        block.triu_().add_(upper)
    return H, n_new


def accumulate_diagonal(d: torch.Tensor | None, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    """The diagonal of `accumulate_hessian`'s ``H`` alone, ``(2/n) Σ x²`` per column, with the same running
    rescaling: ``(cols,)`` instead of ``(cols, cols)`` (Wanda's and OWL's scores need only this)."""
    cols = x.shape[-1]
    batch = x.shape[0] if x.dim() >= 3 else 1
    x = x.reshape(-1, cols).float()
    if d is None:
        d = torch.zeros(cols, dtype=torch.float32, device=x.device)
    n_new = n + batch
    d.mul_(n / n_new).add_(x.square().sum(dim=0), alpha=2.0 / n_new)
    return d, n_new


def symmetric_edges(cols: int) -> list[int]:
    """The column blocks' edges of the symmetric update (`accumulate_hessian`): block ``a`` is
    ``edges[a]:edges[a + 1]``."""
    parts = _symmetric_parts(cols)
    return [cols * k // parts for k in range(parts + 1)]


def _symmetric_parts(cols: int) -> int:
    """Column blocks for the symmetric update: ``p`` blocks compute ``(p + 1) / 2p`` of the full product.

    Blocks at least 144 wide keep each GEMM efficient; past 8 blocks the saving is under 6% and narrower
    blocks cost more than it. Measured on 4096 tokens, 2 AVX2 threads (least of 7): 576 columns 13.4 ms
    whole, 9.0 in 4 blocks; 960: 36.5 -> 23.8 (6); 1536: 73 in 2 -> 64 in 8; 4096 on 2048 tokens: 424
    whole, 248 in 4, 232 in 8, 251 in 16.
    """
    return max(1, min(8, cols // 144))


def hessian_inverse(
    H: torch.Tensor,
    percdamp: float = 0.01,
    *,
    name: str = "",
    damp_retries: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Condition ``H`` and return ``(Hinv, dead, percdamp_used)``.

    Dead inputs (``diag(H) == 0``) get ``H[d, d] = 1`` (the caller zeroes ``W[:, d]``);
    ``percdamp · mean(diag H)`` is added to the diagonal. ``Hinv`` is the upper
    Cholesky factor of ``H⁻¹``, shape ``(cols, cols)``. ``H`` itself is not modified.
    When the factorisation fails, the damping is multiplied by 10 up to
    ``damp_retries`` times (each retry is logged); after that `HessianError` names
    the layer and suggests a larger ``percdamp``.
    """
    if not 0 <= percdamp:
        raise ValueError(f"percdamp must be >= 0 (the paper uses 0.01), got {percdamp}")
    # The upper factor U of H⁻¹ = UᵀU is J·inv(L)·J with L the lower Cholesky factor of J·H·J (J: the
    # reversal): one factorisation and one triangular inverse, 2/3·cols³ flops against the authors'
    # 4/3·cols³ (factor, invert, factor again), and closer to the float64 factor (1536 columns: relative
    # error 8.2e-8 against 9.6e-8). H is worked on reversed throughout.
    R = H.flip(0, 1).to(torch.float32)  # (cols, cols), reversed: a copy; the caller's H stays as it was
    dead = torch.diag(R) == 0
    R[dead, dead] = 1
    mean_diag = torch.mean(torch.diag(R)).item()
    where = f" of layer {name!r}" if name else ""
    # At most two (cols, cols) matrices live at once besides the caller's H (down_proj of a 70B model:
    # 28672 columns, 3.3 GB each), on a CPU one: the copy is factored in place (with a (cols/2)² temporary),
    # inverted in place and reversed in place. A retry copies the caller's H again rather than keeping a
    # spare copy: fresh (cols, cols) matrices are page-faulted in, 0.1 s at 14336 columns on warm memory
    # and up to 5-9 s where a VM hands the guest its memory back (bench_scale's machine).
    by_halves = _by_halves(R.device)
    for attempt in range(damp_retries + 1):
        if attempt > 0:
            R = H.flip(0, 1).to(torch.float32)
            R[dead, dead] = 1
        R.diagonal().add_(percdamp * mean_diag)
        if by_halves:
            info = _cholesky_lower_(R)
            L = R  # factored in place
        else:
            L, info = torch.linalg.cholesky_ex(R)
            info = int(info)
        del R
        if info == 0 and _all_finite(L):
            _invert_lower_(L, by_halves=by_halves)
            if _all_finite(L):
                return (_reverse_(L) if by_halves else L.flip(0, 1)), dead.flip(0), percdamp
        del L
        if attempt < damp_retries:
            new = percdamp * 10 if percdamp > 0 else 0.01
            log.warning("Hessian%s is not positive definite with percdamp=%g; retrying with %g", where, percdamp, new)
            percdamp = new
    raise HessianError(
        f"the Hessian{where} is not positive definite after dampening with percdamp={percdamp:g}; "
        "use a larger percdamp (e.g. 0.1), more calibration samples, or allow damping retries"
    )


def _reverse_(A: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``A ← J·A·J`` (both axes reversed, as ``A.flip(0, 1)``) in place for a square ``A``, ``rows`` rows at a
    time: temporaries of ``(rows, n)`` instead of a second ``(n, n)`` matrix."""
    n = A.shape[0]
    for i in range(0, n // 2, rows):
        k = min(rows, n // 2 - i)
        top, bottom = A[i : i + k], A[n - i - k : n - i]
        kept = top.clone()
        top.copy_(bottom.flip(0, 1))
        bottom.copy_(kept.flip(0, 1))
    if n % 2:
        A[n // 2].copy_(A[n // 2].flip(0))
    return A


def _by_halves(device: torch.device) -> bool:
    """Whether `hessian_inverse` factors and inverts by halves with triangular products (`_cholesky_lower_`,
    `_invert_lower_` with ``by_halves``): on a CPU, where torch's Cholesky runs at 70-90 GFLOP/s from 1536 to
    4096 columns (Intel Xeon, 2 threads) and the halves' products at 250-350. A GPU keeps cuSOLVER's
    factor and the inverse's plain products, its measured path."""
    return device.type == "cpu"


def _cholesky_lower_(A: torch.Tensor, leaf: int = 256) -> int:
    """Factor ``A`` ``(n, n)`` in place into its lower Cholesky factor (upper triangle zeroed), reading only
    its lower triangle. Returns LAPACK's ``info``: 0, or the order of the first leading minor that is not
    positive definite (``A`` is then partly overwritten). By halves, ``n³/3`` flops as LAPACK's ``potrf``:
    ``L₁₁`` of ``A₁₁``, ``L₂₁ = A₂₁·L₁₁⁻ᵀ`` (a triangular solve), ``L₂₂`` of ``A₂₂ − L₂₁·L₂₁ᵀ`` (its lower
    column blocks only, as `accumulate_hessian`); one ``(n/2)²`` temporary at a time. On this Intel Xeon
    (2 threads): 1536 columns 17.9 -> 8.3 ms, 4096 225 -> 128 ms, 14336 5.9 -> 5.3 s against
    `torch.linalg.cholesky`; 576: 0.8 ms either way."""
    n = A.shape[0]
    if n <= leaf:
        L, info = torch.linalg.cholesky_ex(A)
        A.copy_(L)
        return int(info)
    h = n // 2
    A11, A21, A22 = A[:h, :h], A[h:, :h], A[h:, h:]
    info = _cholesky_lower_(A11, leaf)
    if info:
        return info
    A21.copy_(torch.linalg.solve_triangular(A11, A21.t(), upper=False).t())
    edges = symmetric_edges(n - h)
    for a in range(len(edges) - 1):  # row block a of A₂₂, its columns up to the diagonal block's end
        rows, upto = slice(edges[a], edges[a + 1]), edges[a + 1]
        A22[rows, :upto].addmm_(A21[rows], A21[:upto].t(), alpha=-1)
    info = _cholesky_lower_(A22, leaf)
    if info:
        return info + h
    A[:h, h:] = 0
    return 0


def _invert_lower_(L: torch.Tensor, leaf: int = 128, *, by_halves: bool = False) -> torch.Tensor:
    """Invert the lower-triangular ``L`` ``(n, n)`` in place (LAPACK's ``trtri``, which torch does not expose;
    `torch.linalg.solve_triangular` against the identity costs ``n³``): by halves,
    ``[[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [−D⁻¹·C·A⁻¹, D⁻¹]]``. ``C·A⁻¹`` and ``D⁻¹·(C·A⁻¹)`` are plain products
    (``2n³/3`` flops in all, one ``(n/2)²`` temporary at a time) or, with ``by_halves``, triangular products
    by halves in place (`_trmm_right_`, `_trmm_left_`: ``n³/3`` flops, as ``trtri``; Intel Xeon, 2
    threads: 4096 columns 155 -> 121 ms, 14336 6.2 -> 3.6 s)."""
    n = L.shape[0]
    if n <= leaf:
        eye = torch.eye(n, dtype=L.dtype, device=L.device)
        L.copy_(torch.linalg.solve_triangular(L, eye, upper=False))
        return L
    h = n // 2
    A, C, D = L[:h, :h], L[h:, :h], L[h:, h:]
    _invert_lower_(A, leaf, by_halves=by_halves)
    _invert_lower_(D, leaf, by_halves=by_halves)
    if by_halves:
        _trmm_left_(D, _trmm_right_(C, A))
    else:
        CA = C @ A
        torch.matmul(D, CA, out=C)
    C.neg_()
    return L


def _trmm_right_(X: torch.Tensor, T: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """``X ← X·T`` in place for a lower-triangular ``T`` ``(k, k)``: ``[X₁·T₁₁ + X₂·T₂₁, X₂·T₂₂]``, half the
    flops of a plain product."""
    k = T.shape[0]
    if k <= leaf:
        X.copy_(X @ T)
        return X
    h = k // 2
    X1, X2 = X[:, :h], X[:, h:]
    _trmm_right_(X1, T[:h, :h], leaf)
    X1.addmm_(X2, T[h:, :h])  # X₂ is still the input's
    _trmm_right_(X2, T[h:, h:], leaf)
    return X


def _trmm_left_(T: torch.Tensor, X: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """``X ← T·X`` in place for a lower-triangular ``T`` ``(k, k)``: ``[T₁₁·X₁; T₂₁·X₁ + T₂₂·X₂]``."""
    k = T.shape[0]
    if k <= leaf:
        X.copy_(T @ X)
        return X
    h = k // 2
    X1, X2 = X[:h], X[h:]
    _trmm_left_(T[h:, h:], X2, leaf)
    X2.addmm_(T[h:, :h], X1)  # X₁ is still the input's
    _trmm_left_(T[:h, :h], X1, leaf)
    return X


def _all_finite(t: torch.Tensor) -> bool:
    """True when every entry of ``t`` is finite. A sum is NaN or infinite when any entry is, and one pass
    (0.11 ms against 6.65 ms for `isfinite` at 1536 columns); only when the sum is not finite is
    each entry checked, since finite entries can overflow an fp32 sum."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> float:
    """Relative output error ``‖WX − ŴX‖² / ‖WX‖²`` computed through ``H ∝ X Xᵀ``.

    Exact for the calibration inputs ``H`` was accumulated from (the ``2/n`` factor
    cancels). Returns 0.0 for an all-zero output.
    """
    num = error_energy(W, W_hat, H, rows)
    den = output_energy(W, H, rows)
    return num / den if den > 0 else 0.0


def error_energy(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> float:
    """``tr((W − Ŵ) H (W − Ŵ)ᵀ)`` (``‖WX − ŴX‖²`` up to H's scale), ``rows`` rows at a time (``(rows, cols)``
    temporaries instead of three of the weight's size); each row's sum in fp32, their total in fp64."""
    W, W_hat = W.float(), W_hat.float()
    total = 0.0
    for r in range(0, W.shape[0], rows):
        D = W[r : r + rows] - W_hat[r : r + rows]
        total += float(torch.linalg.vecdot(D @ H, D).double().sum())
    return total


def output_energy(W: torch.Tensor, H: torch.Tensor, rows: int = 1024) -> float:
    """``tr(W H Wᵀ)`` (``‖WX‖²`` up to H's scale), ``rows`` rows of ``W`` at a time; each row's sum in fp32,
    their total in fp64 (a cast of the whole product to fp64 took 2-3x the time of these sums)."""
    W = W.float()
    total = 0.0
    for r in range(0, W.shape[0], rows):
        total += float(torch.linalg.vecdot(W[r : r + rows] @ H, W[r : r + rows]).double().sum())
    return total


def damped_energy(W: torch.Tensor, Hinv: torch.Tensor, rows: int = 1024) -> float:
    """``tr(W (H + λI) Wᵀ)`` from `hessian_inverse`'s factor ``Hinv`` (``U``: ``(H + λI)⁻¹ = UᵀU``, so
    ``H + λI = U⁻¹U⁻ᵀ``) as ``‖W U⁻¹‖²``: a triangular solve, half the flops of `output_energy`'s product
    with ``H``, ``rows`` rows of ``W`` at a time. ``W``'s columns that ``hessian_inverse`` found dead must be
    zero (their diagonal was set to 1)."""
    W = W.float()
    total = 0.0
    for r in range(0, W.shape[0], rows):
        total += squared_norm(torch.linalg.solve_triangular(Hinv, W[r : r + rows], upper=True, left=False))
    return total


def squared_norm(A: torch.Tensor, B: torch.Tensor | None = None, rows: int = 1024) -> float:
    """``‖A‖²`` or ``‖A − B‖²`` of ``(rows, cols)`` matrices: fp32 row norms (one pass, no temporary for
    ``‖A‖²``; ``rows`` rows of ``A − B`` at a time) summed in fp64. At 1024 x 14336 1.1 ms against 40 ms
    for a sum cast to fp64, relative distance from the fp64 sum 4e-8."""
    total = 0.0
    for r in range(0, A.shape[0], rows):
        chunk = A[r : r + rows] if B is None else A[r : r + rows] - B[r : r + rows]
        total += float(torch.linalg.vector_norm(chunk, dim=-1).double().square().sum())
    return total
