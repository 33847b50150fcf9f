"""Block-wise reconstruction: train a pruned block's surviving weights so that its outputs match the dense
model's, the mask fixed (EBFT, Guo et al. 2024, "EBFT: Effective and Block-Wise Fine-Tuning for Sparse
LLMs").

`reconstruct_block` takes a block just solved (its zeros are the mask), its inputs (the pruned model's
stream) and the targets (the dense model's outputs: `dense-stream` or `dense-block`, see
`ReconstructConfig`), both indexable by sample (`ShardSet`s), and runs Adam in float32 on every
floating parameter of the block (linear weights and biases, norms) with a linear decay of the learning
rate. The pruned weights have zero gradient and are set to zero again after each step, so they are
exactly zero throughout. The loss is the normalised MSE ``‖f(x) − y‖² / ‖y‖²``. When training does not
lower it on the samples (or it turns NaN), the block keeps its solved weights and the stats say so.
Memory: the block in float32 with its gradients and Adam's two moments (16 bytes a parameter), a copy of
the solved weights (in the checkpoint's dtype when the caller says so) and one batch's activations.
Pure tensors and modules: no files here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from stages.config import ReconstructConfig
from stages.model.blocks import Kwargs, block_output, find_layers, move_kwargs


@dataclass(frozen=True)
class ReconstructStats:
    """What reconstruction did to one block."""

    before: float
    """Normalised MSE ‖f(x) − y‖² / ‖y‖² of the solved block on the reconstruction samples."""
    after: float
    """The same for the weights the block keeps (equal to `before` when it keeps its solved weights)."""
    trained: float
    """The same for the trained weights (NaN when training diverged)."""
    steps: int
    """Optimizer steps taken."""
    seconds: float
    """Wall time, the two loss passes included."""
    kept_solved: bool
    """Training did not lower the loss or turned NaN: the block keeps its solved weights."""


def _forward(block: nn.Module, x: torch.Tensor, kwargs: Kwargs) -> torch.Tensor:
    moved = {k: move_kwargs(v, x.shape[0], x.device, x.dtype) for k, v in kwargs.items()}
    return block_output(block(x, **moved))


def _batch(samples: Sequence[torch.Tensor], index: Sequence[int], device: torch.device) -> torch.Tensor:
    x = torch.stack([samples[int(k)] for k in index])
    if torch.device(device).type == "cuda" and x.device.type == "cpu":  # from pinned memory, no host wait
        return x.pin_memory().to(device, non_blocking=True).float()
    return x.to(device=device, dtype=torch.float32)


@torch.no_grad()
def normalised_mse(
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    kwargs: Kwargs,
    batch_size: int,
    count: int,
) -> float:
    """‖f(x) − y‖² / ‖y‖² summed over the first `count` samples (the block in its own dtype, the sums in
    float32)."""
    device, dtype = next(block.parameters()).device, next(block.parameters()).dtype
    err, norm = torch.zeros((), device=device), torch.zeros((), device=device)  # no host sync per batch
    for lo in range(0, count, batch_size):
        index = range(lo, min(lo + batch_size, count))
        y = _batch(targets, index, device)
        out = _forward(block, _batch(inputs, index, device).to(dtype), kwargs)
        err += (out.float() - y).square().sum()
        norm += y.square().sum()
    return float(err) / max(float(norm), 1e-30)


def reconstruct_block(
    block: nn.Module,
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    kwargs: Kwargs,
    cfg: ReconstructConfig,
    seed: int,
    evaluate: Callable[[nn.Module], float] | None = None,
    solved_dtypes: Mapping[str, torch.dtype] | None = None,
) -> ReconstructStats:
    """Train ``block`` in place (see the module doc); its dtype is unchanged on return.

    ``inputs[k]`` and ``targets[k]`` are sample k's ``(seqlen, hidden)`` input and target; the first
    ``cfg.samples`` (all by default) are used, in an order drawn from ``seed`` each epoch. ``evaluate``
    gives the trained block's normalised MSE on them (default: a pass of `normalised_mse`); a caller that
    runs the block over the samples anyway measures it in that pass. When the stats say `kept_solved`,
    the block holds its solved weights again, whatever ``evaluate`` did to it. The solved weights are kept
    aside in ``solved_dtypes`` (state-dict name -> dtype; e.g. a bf16 checkpoint's, when the block already
    holds weights rounded through them: half the memory of a float32 copy, restored exactly).
    """
    t0 = time.perf_counter()
    count = min(len(inputs), len(targets), cfg.samples or len(inputs))
    keep = solved_dtypes or {}
    solved = {k: v.detach().to(keep.get(k, v.dtype), copy=True) for k, v in block.state_dict().items()}
    before = normalised_mse(block, inputs, targets, kwargs, cfg.batch_size, count)
    dtype = next(block.parameters()).dtype
    block.float()  # float32 weights, gradients and Adam moments whatever the compute dtype
    layers = find_layers(block)
    # True = pruned, in each parameter's own orientation (GPT-2's Conv1D stores (in, out))
    masks = {name: layer.weight == 0 for name, layer in layers.items()}
    params = [p for p in block.parameters() if p.is_floating_point()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=cfg.lr, foreach=False)  # no full-size temporaries of every moment
    total = cfg.epochs * math.ceil(count / cfg.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
    generator = torch.Generator().manual_seed(seed)
    device = params[0].device
    steps, finite = 0, True
    try:
        for _ in range(cfg.epochs):
            order = torch.randperm(count, generator=generator).tolist()
            for lo in range(0, count, cfg.batch_size):
                index = order[lo : lo + cfg.batch_size]
                y = _batch(targets, index, device)
                out = _forward(block, _batch(inputs, index, device), kwargs)
                loss = (out - y).square().sum() / y.square().sum().clamp_min(1e-30)
                if device.type != "cuda" and not torch.isfinite(loss):  # on a GPU: once an epoch, below
                    finite = False
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for name, layer in layers.items():
                    if layer.weight.grad is not None:
                        layer.weight.grad.masked_fill_(masks[name], 0.0)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                steps += 1
                with torch.no_grad():
                    for name, layer in layers.items():
                        layer.weight.masked_fill_(masks[name], 0.0)
            if device.type == "cuda" and not all(bool(torch.isfinite(p).all()) for p in params):
                finite = False  # a NaN loss makes every later step NaN: checked once, not a host sync a step
            if not finite:
                break
    finally:
        del optimizer
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
    block.to(dtype)
    if not finite:
        after = math.nan
    elif evaluate is not None:
        after = evaluate(block)
    else:
        after = normalised_mse(block, inputs, targets, kwargs, cfg.batch_size, count)
    kept = not (after < before)  # NaN compares false: kept
    if kept:
        block.load_state_dict(solved)
    return ReconstructStats(
        before=before,
        after=before if kept else after,
        trained=after,
        steps=steps,
        seconds=time.perf_counter() - t0,
        kept_solved=kept,
    )
