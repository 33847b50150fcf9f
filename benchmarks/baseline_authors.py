"""A straightforward SparseGPT job in the style of the authors' scripts: the yardstick.

Whole model in memory, every calibration activation in memory, one Hessian per
linear layer (added one sample at a time, as their `add_batch`), the paper's column
loop (their `fasterprune`), then perplexity the way their `llama_eval` computes it
(all windows' activations in memory, block by block). It uses this project only to
draw the same calibration and evaluation windows, and its generic block finder
(their scripts hard-code `model.model.layers`). With ``--device cuda`` it does what their
scripts do on a GPU: the blocks stay on the CPU and each moves to the GPU for its turn, the
activations and Hessians live on the GPU, the model in ``--dtype`` (theirs: float16).

    python benchmarks/baseline_authors.py MODEL_DIR --calib SPEC --eval SPEC [--nm 2:4] [--device cuda] ...

Prints perplexities, stage times, the peak resident memory and (on a GPU) the GPU memory peak
as JSON on its last line.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import time

import numpy as np
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks.bench_solver import paper_algorithm_1
from stages.config import CalibConfig
from stages.data.calibration import sample_calibration
from stages.evaluate.perplexity import eval_windows
from stages.model.blocks import find_blocks, find_layers, get_weight, set_weight


class SparseGPTLayer:
    """Their per-layer object: a Hessian of its own, fed one sample at a time."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        W = get_weight(layer)
        self.H = torch.zeros(W.shape[1], W.shape[1], device=W.device)
        self.nsamples = 0

    def add_batch(self, inp: torch.Tensor) -> None:
        inp = inp.reshape(-1, inp.shape[-1]).t()
        self.H *= self.nsamples / (self.nsamples + 1)
        self.nsamples += 1
        inp = math.sqrt(2 / self.nsamples) * inp.float()
        self.H += inp.matmul(inp.t())


class _Caught(Exception):
    pass


def catch_inputs(model, blocks, ids):
    """Their Catcher: run the model until block 0 and keep its inputs and kwargs (``ids`` on the model's
    device: its embeddings')."""
    inps, cache = [], {}

    def hook(_m, args, kwargs):
        inps.append(args[0] if args else kwargs.pop("hidden_states"))
        cache.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _Caught

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    for j in range(ids.shape[0]):
        try:
            model(ids[j : j + 1], use_cache=False)
        except _Caught:
            pass
    h.remove()
    return inps, {k: v for k, v in cache.items() if not k.startswith("past_key") and k not in ("cache", "use_cache")}


def block_out(out):
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def prune(model, ids, sparsity, prunen, prunem, device="cpu"):
    _, blocks = find_blocks(model)
    inps, kwargs = catch_inputs(model, blocks, ids)
    for block in blocks:
        block.to(device)
        gpts = {name: SparseGPTLayer(m) for name, m in find_layers(block).items()}
        handles = [g.layer.register_forward_hook(lambda m, i, o, g=g: g.add_batch(i[0].data)) for g in gpts.values()]
        for x in inps:
            block(x, **kwargs)
        for h in handles:
            h.remove()
        for g in gpts.values():
            W = get_weight(g.layer).detach()
            new = paper_algorithm_1(W, g.H, sparsity, prunen=prunen, prunem=prunem)
            set_weight(g.layer, new.to(W.dtype))
            del g.H
        inps = [block_out(block(x, **kwargs)) for x in inps]
        block.to("cpu")


@torch.no_grad()
def perplexity(model, windows, device="cpu"):
    """Their llama_eval, with the final layers found generically through the model's own head."""
    _, blocks = find_blocks(model)
    inps, kwargs = catch_inputs(model, blocks, windows)
    tuple_out = isinstance(blocks[0].to(device)(inps[0], **kwargs), tuple)
    for block in blocks:
        block.to(device)
        inps = [block_out(block(x, **kwargs)) for x in inps]
        block.to("cpu")
    # The final norm and lm_head, found generically: block 0 returns the last hidden
    # states, the other blocks pass them through, and the model's own forward does the rest.
    nlls, seqlen = [], windows.shape[1]
    saved = list(blocks)
    inject = _Inject(tuple_out)
    for k in range(len(saved)):
        blocks[k] = inject if k == 0 else _Pass(tuple_out)
    for j, x in enumerate(inps):
        inject.hidden = x
        logits = model(windows[j : j + 1], use_cache=False).logits
        loss = nn.functional.cross_entropy(logits[0, :-1].float(), windows[j, 1:])
        nlls.append(loss.float() * seqlen)
    for k, b in enumerate(saved):
        blocks[k] = b
    return math.exp(torch.stack(nlls).sum().item() / (len(inps) * seqlen))


class _Inject(nn.Module):
    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out, self.hidden = tuple_out, None

    def forward(self, *args, **kw):
        return (self.hidden,) if self.tuple_out else self.hidden


class _Pass(nn.Module):
    def __init__(self, tuple_out: bool):
        super().__init__()
        self.tuple_out = tuple_out

    def forward(self, hidden_states, *args, **kw):
        return (hidden_states,) if self.tuple_out else hidden_states


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir")
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nm", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (blocks move to it one at a time)")
    p.add_argument("--dtype", default="float32", help="the model's dtype (their GPU scripts: float16)")
    args = p.parse_args()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=getattr(torch, args.dtype)).eval()
    cuda = args.device.startswith("cuda")
    if cuda:  # everything but the blocks on the GPU, as their scripts place the embeddings, norm and head
        _, blocks = find_blocks(model)
        model.to(args.device)
        for block in blocks:
            block.to("cpu")
    ids = torch.from_numpy(
        sample_calibration(tok, CalibConfig(args.calib, args.nsamples, args.seqlen, args.seed)).astype(np.int64)
    ).to(args.device)
    t_load = time.perf_counter()  # the eval windows' tokenization is evaluation work, not the prune's
    windows = eval_windows(tok, args.eval, args.seqlen, args.eval_windows).to(args.device)
    dense = perplexity(model, windows, args.device)
    t_dense = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    n, m = (int(v) for v in args.nm.split(":")) if args.nm else (0, 0)
    prune(model, ids, args.sparsity, n, m, args.device)
    if cuda:
        torch.cuda.synchronize()
    t_prune = time.perf_counter()
    gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    pruned = perplexity(model, windows, args.device)
    t_end = time.perf_counter()
    print(
        json.dumps(
            {
                "dense_ppl": dense,
                "ppl": pruned,
                "windows": int(windows.shape[0]),
                "seconds": {
                    "load": t_load - t0,
                    "dense_eval": t_dense - t_load,
                    "prune": t_prune - t_dense,
                    "pruned_eval": t_end - t_prune,
                    "total": t_end - t0,
                },
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "prune_gpu_peak_mib": gpu_peak,
            }
        )
    )


if __name__ == "__main__":
    main()
