"""A straightforward in-memory SparseGPT pipeline, in the style of the authors' scripts.

Whole model in memory, all activations in memory, one Hessian per linear layer,
block 0's inputs caught with a hook that raises. The tests compare the block-wise,
disk-backed pipeline against it. `sequential=True` is the "true sequential" variant the
simple way: for each layer in forward order, one more pass over all samples through the
block as pruned so far, which stops at that layer's input.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from sparsegpt import accumulate_hessian, sparsegpt_prune
from stages.model.blocks import find_blocks, find_layers, get_weight, set_weight


class _Caught(Exception):
    pass


@torch.no_grad()
def reference_prune(
    model_dir,
    ids: torch.Tensor,
    sparsity: float = 0.5,
    prune_n: int = 0,
    prune_m: int = 0,
    blocksize: int = 128,
    percdamp: float = 0.01,
    sequential: bool = False,
):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    _, blocks = find_blocks(model)
    inps, caught = [], {}

    def catch(_module, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        caught.update(kwargs)
        raise _Caught

    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    for j in range(ids.shape[0]):
        try:
            model(ids[j : j + 1], use_cache=False)
        except _Caught:
            pass
    handle.remove()
    kwargs = {
        k: v
        for k, v in caught.items()
        if k
        not in ("hidden_states", "past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions")
    }
    solve = dict(sparsity=sparsity, prune_n=prune_n, prune_m=prune_m, blocksize=blocksize, percdamp=percdamp)
    for block in blocks:
        if sequential:
            sequential_prune_block(block, inps, kwargs, solve)
        else:
            dense_prune_block(block, inps, kwargs, solve)
        outs = []
        for x in inps:
            out = block(x, **kwargs)
            outs.append(out[0] if isinstance(out, tuple) else out)
        inps = outs
    return model


def dense_prune_block(block, inps, kwargs, solve: dict) -> None:
    """Every layer against the dense block's inputs: one pass collects all Hessians."""
    layers = find_layers(block)
    H = {name: None for name in layers}
    n = {name: 0 for name in layers}

    def hook(name):
        def f(_m, args):
            H[name], n[name] = accumulate_hessian(H[name], args[0], n[name])

        return f

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    for x in inps:
        block(x, **kwargs)
    for h in handles:
        h.remove()
    for name, layer in layers.items():
        set_weight(layer, sparsegpt_prune(get_weight(layer).detach(), H[name], **solve).weight)


def forward_order(block, x, kwargs) -> list[str]:
    order = []
    handles = [
        m.register_forward_pre_hook(lambda _m, _a, name=name: order.append(name))
        for name, m in find_layers(block).items()
    ]
    block(x, **kwargs)
    for h in handles:
        h.remove()
    return order


def sequential_prune_block(block, inps, kwargs, solve: dict) -> None:
    """Each layer, in forward order, against its inputs through the layers pruned before it."""
    layers = find_layers(block)
    for name in forward_order(block, inps[0], kwargs):
        state = {"H": None, "n": 0}

        def catch(_m, args, state=state):
            state["H"], state["n"] = accumulate_hessian(state["H"], args[0], state["n"])
            raise _Caught

        handle = layers[name].register_forward_pre_hook(catch)
        for x in inps:
            try:
                block(x, **kwargs)
            except _Caught:
                pass
        handle.remove()
        layer = layers[name]
        set_weight(layer, sparsegpt_prune(get_weight(layer).detach(), state["H"], **solve).weight)
