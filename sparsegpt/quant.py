"""The quantization grid of joint sparsification and quantization.

Per-output-channel asymmetric min-max grid (as GPTQ and the SparseGPT reference
compute it), optionally one grid per group of ``groupsize`` input columns. The grid
is computed once from the layer's weights before pruning; `quantize` rounds to it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsegpt.spec import QuantSpec


@dataclass(frozen=True)
class QuantGrid:
    """Per-column scale and zero point, expanded to ``(rows, cols)`` views of group grids."""

    scale: torch.Tensor
    """``(rows, ngroups)`` step sizes."""
    zero: torch.Tensor
    """``(rows, ngroups)`` integer zero points, stored as float."""
    maxq: int
    """Largest integer level."""
    groupsize: int
    """Columns per group (``cols`` when per channel)."""

    def column(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero of input column ``j``, each ``(rows,)``."""
        g = j // self.groupsize
        return self.scale[:, g], self.zero[:, g]


def quant_grid(W: torch.Tensor, spec: QuantSpec) -> QuantGrid:
    """Min-max grid of ``W`` ``(rows, cols)``; the range always includes 0.

    ``scale = (max − min) / (2^bits − 1)``, ``zero = round(−min / scale)``; a group
    whose weights are all zero gets the range [-1, 1] as in the reference code.
    """
    rows, cols = W.shape
    gs = spec.groupsize or cols
    if cols % gs:
        raise ValueError(f"groupsize {gs} must divide the layer's {cols} input columns")
    Wg = W.float().reshape(rows, cols // gs, gs)  # (rows, ngroups, gs)
    xmin = Wg.amin(dim=2).clamp(max=0)
    xmax = Wg.amax(dim=2).clamp(min=0)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin[both_zero] = -1
    xmax[both_zero] = 1
    scale = (xmax - xmin) / spec.maxq
    zero = torch.round(-xmin / scale)
    return QuantGrid(scale=scale, zero=zero, maxq=spec.maxq, groupsize=gs)


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Round ``x`` to the grid: ``scale · (clamp(round(x/scale) + zero, 0, maxq) − zero)``."""
    q = torch.clamp(torch.round(x / scale) + zero, 0, maxq)
    return scale * (q - zero)
