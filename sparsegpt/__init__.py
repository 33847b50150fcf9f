"""The SparseGPT algorithm core: pure torch, tensors in and tensors out.

One linear layer at a time: accumulate the Hessian of its inputs with
:func:`accumulate_hessian`, then prune its weight with :func:`sparsegpt_prune`
(unstructured, N:M, optionally jointly quantized, optionally growing an earlier
round's mask). :func:`magnitude_prune` and :func:`wanda_prune` are the baselines;
:func:`owl_sparsities` allocates per-layer sparsities. Nothing here knows about
files, Prefect or transformers' model classes.
"""

from sparsegpt.allocation import outlier_ratio, owl_sparsities
from sparsegpt.baselines import magnitude_prune, wanda_prune
from sparsegpt.hessian import HessianError, accumulate_hessian, hessian_inverse, reconstruction_error
from sparsegpt.masks import check_nm, check_prior_mask, check_sparsity, nm_pattern_ok
from sparsegpt.quant import QuantGrid, QuantSpec, quant_grid, quantize
from sparsegpt.solver import PruneResult, sparsegpt_prune

__all__ = [
    "HessianError",
    "PruneResult",
    "QuantGrid",
    "QuantSpec",
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
    "sparsegpt_prune",
    "wanda_prune",
]
