"""Sequential mode (`--sequential`): a block's layers pruned in forward order, in one forward pass.

Each linear layer is solved against the Hessian of its inputs as the already-pruned layers
before it in the block produce them (the "true sequential" variant of GPTQ/SparseGPT
follow-ups), and the same pass ends with the pruned block's outputs, the next block's
inputs: one forward per block instead of the default's two (the dense Hessians' pass,
then the pruned block's).

How, without per-architecture code: every calibration batch runs the block's own forward
in a greenlet of its own (a coroutine with its own stack, in this thread), and a forward
pre-hook on each linear layer parks it at the layer's input. The batches run one at a
time, in batch order (`_Batch.step`), on this thread: the same kernels, thread pool and
heap as a plain loop (OS threads instead gave each batch its own OpenMP team and malloc
arena). Torch's thread-local modes (grad, autocast) are shared by the batches, so a block
whose forward holds one open across a linear layer's call is not supported. Once every
batch waits at the same layer, its Hessian is accumulated from their inputs in batch
order, the layer is solved (and its weight rounded through the checkpoint's dtype, as it
will be saved), and the batches go on to the next layer. Layers whose input is the very
tensor an earlier layer got (q/k/v, gate/up) share that layer's Hessian. The batches'
in-flight activations of one block are held at once (`stages.prune.check.sequential_bytes`
estimates them).

A block whose batches do not all stop at the same layers in the same order (data-dependent
routing, a layer called twice) raises `NotSequential` before any output is given; the caller
reloads the dense block and prunes it the default way.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable

import greenlet
import torch
from torch import nn

from sparsegpt import accumulate_hessian
from stages.config import SolverConfig
from stages.model.blocks import Kwargs, find_layers, round_to_stored, run_block
from stages.prune.pruning import LayerStats, SharedFactor, prune_layer


class NotSequential(Exception):
    """The block's forward cannot be split at its layers' inputs the same way for every batch."""


class _Batch:
    """One calibration batch's forward, in a greenlet that runs only inside `step`."""

    def __init__(self, block: nn.Module, x: torch.Tensor, kwargs: Kwargs):
        self.at: str | None = None
        """The layer whose input the batch is parked at; None once its forward has returned."""
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self._seen: list[tuple[weakref.ref, str]] = []  # inputs given to earlier layers, while alive
        self.greenlet = greenlet.greenlet(lambda: run_block(block, x, kwargs))

    def park(self, name: str, x: torch.Tensor) -> None:
        """Called from the layer's pre-hook inside this batch's greenlet: hand control back to `step`."""
        self.at, self.input = name, x
        self.greenlet.parent.switch()
        self.input = None

    def shared_with(self, x: torch.Tensor) -> str | None:
        """The earlier layer whose input was this very tensor (same storage, shape and strides), if any."""
        self._seen = [(ref, name) for ref, name in self._seen if ref() is not None]
        for ref, name in self._seen:
            y = ref()
            if y is not None and (y.data_ptr(), y.shape, y.stride()) == (x.data_ptr(), x.shape, x.stride()):
                return name
        return None

    def remember(self, x: torch.Tensor, name: str) -> None:
        self._seen.append((weakref.ref(x), name))

    def step(self) -> None:
        """Let the batch run to its next layer's input, or to the end of the block (errors raise here)."""
        out = self.greenlet.switch()
        if self.greenlet.dead:
            self.at, self.output = None, out

    def stop(self) -> None:
        """Unwind a parked batch's forward (GreenletExit inside it)."""
        if self.greenlet and not self.greenlet.dead:
            self.greenlet.throw()


@torch.no_grad()
def prune_block_sequential(
    block: nn.Module,
    batches: Iterable[torch.Tensor],
    layer_kwargs: Kwargs,
    cfg: SolverConfig,
    sparsity: float,
    prefix: str = "",
    stored: dict[str, torch.dtype] | None = None,
    outputs: Callable[[torch.Tensor], None] | None = None,
) -> dict[str, LayerStats]:
    """Prune every linear layer of ``block`` in place, in forward order, in one pass; return per-layer stats.

    ``batches`` yields the block's calibration inputs on its device; ``stored`` (block-relative
    names -> checkpoint dtypes) rounds each solved weight as it will be saved, before later layers
    see its outputs; ``outputs`` receives the pruned block's outputs, batch by batch in order.
    Raises `NotSequential` (the block untouched by later passes, its outputs not given) when the
    batches do not stop at the same layers in the same order.
    """
    layers = find_layers(block)
    current: dict[greenlet.greenlet, _Batch] = {}

    def hook(name: str) -> Callable:
        def pre_hook(_module: nn.Module, args: tuple) -> None:
            batch = current.get(greenlet.getcurrent())
            if batch is not None:
                batch.park(name, args[0])

        return pre_hook

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    running: list[_Batch] = []
    try:
        for x in batches:
            batch = _Batch(block, x, layer_kwargs)
            current[batch.greenlet] = batch
            running.append(batch)
            batch.step()
        stats: dict[str, LayerStats] = {}
        hessians: dict[str, torch.Tensor] = {}
        factors = SharedFactor()
        while running and running[0].at is not None:
            name = _same_layer(running, block)
            if name in stats:
                raise NotSequential(f"layer {name} runs twice in one forward of {type(block).__name__}")
            owners = {batch.shared_with(batch.input) for batch in running}
            owner = owners.pop() if len(owners) == 1 else None
            if owner is None:
                H, n = None, 0
                for batch in running:  # batch order, as the default mode's pass
                    H, n = accumulate_hessian(H, batch.input, n)
                    batch.remember(batch.input, name)
                hessians[name], owner = H, name
            stats[name] = prune_layer(layers[name], hessians[owner], cfg, sparsity, f"{prefix}{name}", factors)
            if stored:
                round_to_stored(layers[name], {k.removeprefix(f"{name}."): v for k, v in stored.items()})
            for batch in running:
                batch.step()
        _same_layer(running, block)  # every batch at the end of the block
        missing = [name for name in layers if name not in stats]
        if missing:
            raise RuntimeError(f"layers never ran in the block's forward pass: {', '.join(missing)}")
        for batch in running:
            if outputs is not None:
                outputs(batch.output)
            batch.output = None
        return {name: stats[name] for name in layers}
    finally:
        for batch in running:
            batch.stop()
        for h in handles:
            h.remove()


def _same_layer(running: list[_Batch], block: nn.Module) -> str | None:
    """The layer every batch waits at (None: every forward has returned), or `NotSequential`."""
    at = {batch.at for batch in running}
    if len(at) != 1:
        names = ", ".join(sorted(str(a) for a in at))
        raise NotSequential(f"the batches of {type(block).__name__} stop at different layers ({names})")
    return at.pop()
