"""The SparseGPT algorithm core: pure torch, tensors in and tensors out.

One linear layer at a time: accumulate the Hessian of its inputs with
:func:`accumulate_hessian`, then prune its weight with :func:`sparsegpt_prune`
(unstructured, N:M, optionally jointly quantized, optionally growing an earlier
round's mask). :func:`magnitude_prune` and :func:`wanda_prune` are the baselines;
:func:`owl_sparsities` allocates per-layer sparsities. Nothing here knows about
files, Prefect or transformers' model classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sparsegpt.allocation import outlier_ratio, owl_sparsities
    from sparsegpt.baselines import magnitude_prune, wanda_prune
    from sparsegpt.hessian import (
        HessianError,
        accumulate_diagonal,
        accumulate_hessian,
        hessian_inverse,
        reconstruction_error,
    )
    from sparsegpt.masks import check_prior_mask, nm_pattern_ok
    from sparsegpt.quant import QuantGrid, quant_grid, quantize
    from sparsegpt.solver import PruneResult, solved_error, sparsegpt_prune
    from sparsegpt.spec import QuantSpec, check_nm, check_sparsity

# Imported on first use: `sparsegpt.spec` (argument checks) must not pull in torch.
_EXPORTS = {
    "HessianError": "sparsegpt.hessian",
    "PruneResult": "sparsegpt.solver",
    "QuantGrid": "sparsegpt.quant",
    "QuantSpec": "sparsegpt.spec",
    "accumulate_diagonal": "sparsegpt.hessian",
    "accumulate_hessian": "sparsegpt.hessian",
    "check_nm": "sparsegpt.spec",
    "check_prior_mask": "sparsegpt.masks",
    "check_sparsity": "sparsegpt.spec",
    "hessian_inverse": "sparsegpt.hessian",
    "magnitude_prune": "sparsegpt.baselines",
    "nm_pattern_ok": "sparsegpt.masks",
    "outlier_ratio": "sparsegpt.allocation",
    "owl_sparsities": "sparsegpt.allocation",
    "quant_grid": "sparsegpt.quant",
    "quantize": "sparsegpt.quant",
    "reconstruction_error": "sparsegpt.hessian",
    "solved_error": "sparsegpt.solver",
    "sparsegpt_prune": "sparsegpt.solver",
    "wanda_prune": "sparsegpt.baselines",
}

__all__ = [
    "HessianError",
    "PruneResult",
    "QuantGrid",
    "QuantSpec",
    "accumulate_diagonal",
    "accumulate_hessian",
    "check_nm",
    "check_prior_mask",
    "check_sparsity",
    "hessian_inverse",
    "magnitude_prune",
    "nm_pattern_ok",
    "outlier_ratio",
    "owl_sparsities",
    "quant_grid",
    "quantize",
    "reconstruction_error",
    "solved_error",
    "sparsegpt_prune",
    "wanda_prune",
]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sparsegpt' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
