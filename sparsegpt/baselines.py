"""Baseline pruners: magnitude and Wanda (Sun et al. 2024).

Both take the weight ``(rows, cols)`` and return a `PruneResult` with the OBS loss
left at 0 (no solve). Magnitude compares ``|W|`` over the whole layer; Wanda scores
``|W_ij| · ‖X_j‖₂`` and compares within each output row. Both support N:M and a
prior mask that stays pruned.
"""

from __future__ import annotations

import torch

from sparsegpt.masks import check_prior_mask, lowest_k, nm_select, target_count
from sparsegpt.solver import PruneResult
from sparsegpt.spec import check_nm, check_sparsity

_INF = float("inf")


def magnitude_prune(
    W: torch.Tensor,
    sparsity: float = 0.5,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    prior_mask: torch.Tensor | None = None,
) -> PruneResult:
    """Prune the smallest ``|W|`` of the layer (or of each N:M group)."""
    return _prune_by_score(W, W.detach().float().abs(), sparsity, prune_n, prune_m, prior_mask, per_row=False)


def wanda_prune(
    W: torch.Tensor,
    x_norm_sq: torch.Tensor,
    sparsity: float = 0.5,
    *,
    prune_n: int = 0,
    prune_m: int = 0,
    prior_mask: torch.Tensor | None = None,
) -> PruneResult:
    """Prune the lowest ``|W_ij| · ‖X_j‖₂`` in each output row (or N:M group).

    ``x_norm_sq`` ``(cols,)`` is ``Σ x_j²`` over the calibration tokens, or anything
    proportional to it, such as ``diag(H)``.
    """
    cols = W.shape[1]
    if x_norm_sq.shape != (cols,):
        raise ValueError(f"x_norm_sq must have shape ({cols},), got {tuple(x_norm_sq.shape)}")
    score = W.detach().float().abs() * x_norm_sq.to(W.device).float().clamp(min=0).sqrt().unsqueeze(0)
    return _prune_by_score(W, score, sparsity, prune_n, prune_m, prior_mask, per_row=True)


def _prune_by_score(
    W: torch.Tensor,
    score: torch.Tensor,
    sparsity: float,
    prune_n: int,
    prune_m: int,
    prior: torch.Tensor | None,
    per_row: bool,
) -> PruneResult:
    rows, cols = W.shape
    check_sparsity(sparsity)
    check_nm(prune_n, prune_m, cols)
    target = rows * cols * prune_n // prune_m if prune_m else target_count(rows * cols, sparsity)
    check_prior_mask(prior, W.shape, target)
    if prior is not None:
        prior = prior.to(W.device)
    if prune_m:
        if prior is not None:
            score = score.masked_fill(prior, -_INF)
        mask = nm_select(score, prune_n, prune_m)
    elif per_row:
        k = int(cols * sparsity)  # Wanda prunes the same count in every row
        if prior is not None:
            score = score.masked_fill(prior, _INF)
            k_row = (k - prior.sum(dim=1)).clamp(min=0)  # (rows,) new prunes per row
        else:
            k_row = torch.full((rows,), k, device=W.device)
        order = torch.argsort(score, dim=1)
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(cols, device=W.device).expand(rows, cols))
        mask = rank < k_row.unsqueeze(1)
    else:
        k = target - (int(prior.sum()) if prior is not None else 0)
        if prior is not None:
            score = score.masked_fill(prior, _INF)
        mask = lowest_k(score, k)
    if prior is not None:
        mask |= prior
    return PruneResult(weight=W.masked_fill(mask, 0), mask=mask, loss=0.0, percdamp=0.0)
