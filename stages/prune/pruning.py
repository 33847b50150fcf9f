"""Pruning one decoder block: Hessians by shared input, the solve, the outputs.

`prune_block` takes a loaded block and its calibration inputs and prunes every
linear layer in it, as the SparseGPT reference does: one forward pass of the dense
block accumulates the Hessians (once per distinct input: q/k/v share one, gate/up
share one), every layer is then solved, and the caller runs the pruned block to get
the next block's inputs. Pure tensors and modules: no files here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields

import torch
from torch import nn

from sparsegpt import (
    PruneResult,
    QuantGrid,
    accumulate_diagonal,
    accumulate_hessian,
    hessian_inverse,
    magnitude_prune,
    outlier_ratio,
    reconstruction_error,
    solved_error,
    sparsegpt_prune,
    wanda_prune,
)
from stages.config import SolverConfig
from stages.model.blocks import Kwargs, find_layers, get_weight, run_block, set_weight


@dataclass(frozen=True)
class LayerStats:
    """What pruning did to one linear layer."""

    sparsity: float
    """Achieved fraction of zero weights."""
    target: float
    """The sparsity asked of this layer."""
    loss: float
    """OBS loss of the solve (0 for the baselines)."""
    rel_error: float
    """‖WX − ŴX‖² / ‖WX‖² on the calibration inputs."""
    percdamp: float
    """Dampening used (larger than configured when a retry was needed)."""
    shape: tuple[int, int]
    """(out_features, in_features)."""
    seconds: float
    """Wall time of the solve."""
    grid: QuantGrid | None = field(default=None, repr=False, compare=False)
    """The quantization grid of joint quantization (saved beside the block, not in its record)."""

    def record(self) -> dict:
        """The JSON-able fields, for the block record."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "grid"}


class _StopPass(Exception):
    """Raised from the last layer's hook: the rest of the block's forward is not needed."""


class HessianCollector:
    """Forward pre-hooks that accumulate one Hessian per distinct layer input.

    Layers whose inputs are the very same tensor in a forward pass (same storage,
    shape and strides, kept alive until the pass ends) share one Hessian.
    """

    def __init__(self, layers: dict[str, nn.Module], diagonal: bool = False, stop_early: bool = True):
        self.layers = layers
        self.stop_early = stop_early
        """Stop each pass at the last layer's input (nothing after it is needed for the Hessians)."""
        self.diagonal_only = diagonal
        """Accumulate only each Hessian's diagonal ((in,) instead of (in, in)): what OWL's scores need."""
        self.order: list[str] = []  # call order seen in the first pass
        self.last: str | None = None  # after the first pass: the last layer called
        self.owner: dict[str, str] = {}  # layer name -> name of the layer whose Hessian it shares
        self.H: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._seen: dict[tuple, tuple[torch.Tensor, str]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0]
            if self.last is None:
                self.order.append(name)
            key = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            if key in self._seen:
                self.owner.setdefault(name, self._seen[key][1])
            else:
                self._seen[key] = (x, name)  # holding x keeps its storage from being reused in this pass
                self.owner.setdefault(name, name)
                if self.owner[name] == name:
                    accumulate = accumulate_diagonal if self.diagonal_only else accumulate_hessian
                    self.H[name], self.n[name] = accumulate(self.H.get(name), x, self.n.get(name, 0))
            if self.stop_early and name == self.last:
                raise _StopPass  # nothing after the last layer's input is needed for Hessians

        return hook

    def end_pass(self) -> None:
        if self.last is None and self.order:
            self.last = self.order[-1]
        self._seen.clear()

    def hessian(self, name: str) -> torch.Tensor:
        if self.diagonal_only:
            raise RuntimeError("this collector holds only the Hessians' diagonals")
        return self.H[self.owner[name]]

    def diagonal(self, name: str) -> torch.Tensor:
        """diag(H) of layer `name`'s input, (in,)."""
        H = self.H[self.owner[name]]
        return H if self.diagonal_only else torch.diag(H)

    def release(self, done: Iterable[str]) -> None:
        """Drop the Hessians that no layer outside `done` shares any more (each is (in, in) fp32)."""
        needed = {self.owner[name] for name in self.owner if name not in set(done)}
        for owner in [o for o in self.H if o not in needed]:
            del self.H[owner]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._seen.clear()


def collect_hessians(
    block: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[torch.Tensor],
    layer_kwargs: Kwargs,
    diagonal: bool = False,
    outputs: Callable[[torch.Tensor], None] | None = None,
) -> HessianCollector:
    """Run the dense block over all calibration batches and return the collected Hessians (or, with
    `diagonal`, only their diagonals). With `outputs`, each batch's forward runs to the end and its
    output goes to `outputs` (the dense block's outputs, at the cost of the rest of the forward)."""
    collector = HessianCollector(layers, diagonal, stop_early=outputs is None)
    try:
        for x in batches:
            try:
                out = run_block(block, x, layer_kwargs)
                if outputs is not None:
                    outputs(out)
            except _StopPass:
                pass
            collector.end_pass()
    finally:
        collector.close()
    missing = [name for name in layers if name not in collector.owner]
    if missing:
        raise RuntimeError(f"layers never ran in the block's forward pass: {', '.join(missing)}")
    return collector


class SharedFactor:
    """`hessian_inverse` of the Hessian the last solved layer used, for the next layers that share it (q/k/v,
    gate/up): one factorisation per distinct input instead of one per layer, the same bits. It holds one
    factor and drops it before computing the next, so a solve still holds at most the inverse's two
    ``(in, in)`` matrices."""

    def __init__(self) -> None:
        self._H: torch.Tensor | None = None
        self._factor: tuple[torch.Tensor, torch.Tensor, float] | None = None

    def __call__(self, H: torch.Tensor, W: torch.Tensor, cfg: SolverConfig, name: str):
        if self._H is not H:
            self._H = self._factor = None
            self._factor = hessian_inverse(H.to(W.device), cfg.percdamp, name=name, damp_retries=cfg.damp_retries)
            self._H = H
        return self._factor


def solve_layer(
    W: torch.Tensor,
    H: torch.Tensor,
    cfg: SolverConfig,
    sparsity: float,
    name: str,
    factors: SharedFactor | None = None,
) -> PruneResult:
    """Prune one weight ``(out, in)`` with the configured method (``cfg.keep_pruned``: its zeros stay pruned);
    ``factors`` reuses the Hessian's factor across the layers that share ``H``."""
    n, m = cfg.prune_nm
    if cfg.method == "magnitude":
        return magnitude_prune(W, sparsity, prune_n=n, prune_m=m)
    if cfg.method == "wanda":
        return wanda_prune(W, torch.diag(H), sparsity, prune_n=n, prune_m=m)
    return sparsegpt_prune(
        W,
        H,
        sparsity,
        prune_n=n,
        prune_m=m,
        blocksize=cfg.blocksize,
        percdamp=cfg.percdamp,
        quant=cfg.quant,
        name=name,
        damp_retries=cfg.damp_retries,
        prior_mask=(W == 0) if cfg.keep_pruned else None,
        factor=factors(H, W, cfg, name) if factors is not None else None,
        kernel=cfg.kernel,
    )


def block_outlier_ratio(block: nn.Module, collector: HessianCollector, threshold: float) -> float:
    """OWL's layer outlier ratio of a block: over all its linear weights' Wanda scores."""
    total, outliers = 0, 0.0
    for name, layer in find_layers(block).items():
        W = get_weight(layer)
        outliers += outlier_ratio(W, collector.diagonal(name), threshold) * W.numel()
        total += W.numel()
    return outliers / total


@torch.no_grad()
def prune_block(
    block: nn.Module,
    batches: Callable[[], Iterable[torch.Tensor]],
    layer_kwargs: Kwargs,
    cfg: SolverConfig,
    sparsity: float,
    prefix: str = "",
    dense_outputs: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, LayerStats]:
    """Prune every linear layer of ``block`` in place; return per-layer stats.

    ``batches()`` yields the block's calibration inputs ``(b, seqlen, hidden)`` on the
    block's device. ``sparsity`` is this block's target (uniform or from OWL).
    ``dense_outputs`` receives the dense block's outputs batch by batch (the Hessians' pass
    then runs to the end of the block).
    """
    layers = find_layers(block)
    collector = collect_hessians(block, layers, batches(), layer_kwargs, outputs=dense_outputs)
    stats, factors = {}, SharedFactor()
    for name, layer in layers.items():
        stats[name] = prune_layer(layer, collector.hessian(name), cfg, sparsity, f"{prefix}{name}", factors)
        collector.release(stats.keys())  # a Hessian goes once its last layer is solved
    return stats


def prune_layer(
    layer: nn.Module,
    H: torch.Tensor,
    cfg: SolverConfig,
    sparsity: float,
    name: str,
    factors: SharedFactor | None = None,
) -> LayerStats:
    """Solve one layer against the Hessian of its inputs and write the pruned weight into it (``factors``:
    see `SharedFactor`)."""
    W = get_weight(layer).detach()  # (out, in)
    t0 = time.perf_counter()
    res = solve_layer(W, H, cfg, sparsity, name, factors)
    seconds = time.perf_counter() - t0
    if cfg.method == "sparsegpt":  # the factor the solve used, for the error's denominator
        err = solved_error(W, res, H, Hinv=factors(H, W, cfg, name)[0] if factors is not None else None)
    else:
        err = reconstruction_error(W, res.weight, H)
    set_weight(layer, res.weight)
    return LayerStats(
        sparsity=res.sparsity,
        target=cfg.target if cfg.prune_nm[1] else sparsity,
        loss=res.loss,
        rel_error=err,
        percdamp=res.percdamp,
        shape=tuple(W.shape),
        seconds=seconds,
        grid=res.grid,
    )
