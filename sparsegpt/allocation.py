"""Per-layer sparsity allocation: uniform, or OWL (Yin et al. 2024).

OWL (outlier-weighted layerwise sparsity) gives layers with more activation
outliers a lower sparsity. A layer's outlier ratio is the fraction of its Wanda
scores ``|W_ij| · ‖X_j‖₂`` above ``M`` times their mean; ratios are mapped linearly
onto densities spanning ``2λ`` (more outliers, lower sparsity), then shifted so the
mean sparsity is ``s``, as in the authors' code: every layer lies within ``s ± 2λ``
and the spread is ``2λ`` (``s ± λ`` exactly when the ratios are symmetric).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsegpt.spec import check_sparsity


def outlier_ratio(W: torch.Tensor, x_norm_sq: torch.Tensor, threshold: float = 5.0) -> float:
    """Fraction of ``|W_ij| · ‖X_j‖₂`` above ``threshold`` × their mean (OWL's M, default 5)."""
    score = W.detach().float().abs() * x_norm_sq.to(W.device).float().clamp(min=0).sqrt().unsqueeze(0)
    return float((score > threshold * score.mean()).float().mean())


def owl_sparsities(ratios: Sequence[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """Per-layer sparsities from outlier ratios: mean ``sparsity``, spread ``2 · lam``.

    Equal ratios (or a single layer) give the uniform allocation. Values are clipped
    to [0, 0.99] should ``sparsity ± lam`` leave that range (the mean then moves).
    """
    check_sparsity(sparsity)
    if not 0 <= lam < 1:
        raise ValueError(f"OWL lambda must be in [0, 1) (the paper uses 0.08), got {lam}")
    if len(ratios) == 0:
        raise ValueError("owl_sparsities needs at least one layer's outlier ratio")
    r = torch.tensor(list(ratios), dtype=torch.float64)
    spread = float(r.max() - r.min())
    if spread == 0:
        return [float(sparsity)] * len(r)
    density = (r - r.min()) / spread * (2 * lam)
    density = density - density.mean() + (1 - sparsity)
    return [min(max(1 - float(x), 0.0), 0.99) for x in density]
