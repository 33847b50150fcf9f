"""Zero-shot scoring block by block: the whole model is never in memory.

`Blockwise(model_dir, ...)` stands for a checkpoint wherever `stages.evaluate.tasks.zeroshot`
takes a model. Its requests become the same passes of token tries as for a model in
memory (`stages.evaluate.tasks.scoring`), but the passes go through the model the way
perplexity does (`stages.evaluate.evaluate.blockwise_perplexity`): the trunk (embeddings,
rotary tables, mask preparation; `stages.model.capture.Head`) gives each pass's block-0
inputs and the keyword arguments every block receives for it (the trie's 4D mask and
positions included), then each block is loaded once and run over every pass, and the
model's head projects only the kept positions of one pass at a time. Peak memory is the
non-block weights, one block, the hidden states of the passes in flight (at most
`max_bytes` of them: more passes mean more groups, each a walk through all blocks) and one
pass's logits. The probe that decides whether tries are safe for the model rides along in
the first group; if it disagrees, every row is scored as its own causal sequence instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from stages.evaluate.tasks.scoring import (
    Pass,
    _full_attention_only,
    _Row,
    finish_pass,
    prepare_pass,
    probe_agrees,
    probe_rows,
    tree_batches,
)
from stages.model.blocks import Kwargs, load_block, move_kwargs, run_block, skeleton
from stages.model.capture import Head
from stages.model.models import load_config
from stages.run.memory import GrowthTrim, keep_freed_memory
from stages.run.transfer import HostSink, device_batches

MAX_BYTES = 1 << 30
"""Hidden states of the passes walked through the blocks together (default 1 GiB); more passes make more
groups, each of which loads every block once."""
HEAD_CHUNK = 256
"""Kept positions per call of the head: bounds its logits to (256, vocab) before the log-softmax."""


@dataclass(frozen=True)
class Blockwise:
    """A checkpoint scored block by block: pass it where `zeroshot` takes a model."""

    model_dir: Path
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    trust_remote_code: bool = False
    max_bytes: int = MAX_BYTES

    @property
    def config(self):  # noqa: ANN201  a transformers PretrainedConfig
        return load_config(self.model_dir, self.trust_remote_code)


@dataclass
class _InFlight:
    """One pass on its way through the blocks: its hidden states (on the CPU) and each block's kwargs."""

    p: Pass
    hidden: torch.Tensor
    kwargs: list[Kwargs]


class _Landing:
    """A `HostSink` sink: successive outputs become the flights' hidden states, in order."""

    def __init__(self, flights: list[_InFlight]) -> None:
        self.flights = iter(flights)

    def __call__(self, hidden: torch.Tensor) -> None:
        next(self.flights).hidden = hidden


def _model_kwargs(p: Pass, dtype: torch.dtype, device: torch.device) -> dict:
    """What the model's forward gets for a pass of tries: an additive 4D mask and position ids."""
    if not p.tree_kw:
        return {}
    sees = p.tree_kw["sees"].to(device)
    mask = torch.zeros(sees.shape, dtype=dtype, device=device)
    mask.masked_fill_(~sees, torch.finfo(dtype).min)
    return {"attention_mask": mask[:, None], "position_ids": p.tree_kw["positions"].to(device)}


def _walk(
    model: Blockwise, trunk: Head, passes: list[Pass], progress: bool = False
) -> Iterator[tuple[Pass, torch.Tensor]]:
    """Run passes through every block, one block in memory; yield (pass, logits at its kept nodes)."""
    cpu = torch.device("cpu")
    flights = []
    for p in passes:
        hidden, kwargs = trunk.block_inputs(p.ids, **_model_kwargs(p, model.dtype, trunk.device))
        flights.append(_InFlight(p, hidden.to(cpu), kwargs))
    n_blocks = skeleton(model.model_dir, model.trust_remote_code).num_blocks
    keep_freed_memory()  # each batch reuses the pages the last one freed
    trim = GrowthTrim()
    for i in tqdm(range(n_blocks), desc="tasks: blocks", disable=not progress, leave=False):
        block = load_block(model.model_dir, i, model.device, model.dtype, model.trust_remote_code)
        with HostSink(_Landing(flights)) as outputs:
            for f, x in zip(flights, device_batches((f.hidden for f in flights), trunk.device), strict=True):
                kwargs = {k: move_kwargs(v, 1, trunk.device, model.dtype) for k, v in f.kwargs[i].items()}
                outputs(run_block(block, x, kwargs))
        del block
        trim()
    for f in flights:
        kept = f.hidden[f.p.keep]  # (n_keep, hidden): the final norm and the head act on each position alone
        logits = torch.cat([trunk(kept[None, a : a + HEAD_CHUNK])[0] for a in range(0, len(kept), HEAD_CHUNK)])
        yield f.p, logits


def _groups(passes: list[Pass], max_bytes: int, width: int) -> list[list[Pass]]:
    """Consecutive passes whose hidden states together stay within `max_bytes` (a pass alone may exceed it)."""
    groups: list[list[Pass]] = []
    used = 0
    for p in passes:
        size = p.ids.numel() * width
        if not groups or used + size > max_bytes:
            groups.append([])
            used = 0
        groups[-1].append(p)
        used += size
    return groups


@torch.inference_mode()
def blockwise_scores(
    model: Blockwise, rows: Iterable[_Row], batch_size: int, progress: bool = False
) -> dict[int, tuple[float, bool]]:
    """{request index: (loglik, greedy)} of every request of `rows`, block by block."""
    rows = list(rows)
    config = model.config
    width = int(getattr(config.get_text_config(), "hidden_size", 0) or 0) * model.dtype.itemsize
    trunk = Head(model.model_dir, model.device, model.dtype, model.trust_remote_code)
    tries = _full_attention_only(config)
    probe = probe_rows(config) if tries else []
    plain_probe = [prepare_pass(b) for b in tree_batches(probe, False, 1)]
    tree_probe = [prepare_pass(b) for b in tree_batches(probe, True, 8)]
    passes = [prepare_pass(b) for b in tree_batches(rows, tries, batch_size)]
    groups = _groups(passes, model.max_bytes, width) or [[]]
    out: dict[int, tuple[float, bool]] = {}
    for g, group in enumerate(groups):
        first = plain_probe + tree_probe if g == 0 else []
        walked = _walk(model, trunk, first + group, progress)
        results = {id(p): list(finish_pass(p, logits)) for p, logits in walked}
        if g == 0 and tries:
            want = {j: r for p in plain_probe for j, r in results[id(p)]}
            got = {j: r for p in tree_probe for j, r in results[id(p)]}
            if not probe_agrees(want, got, model.dtype):  # tries are not safe here: score plain rows
                passes = [prepare_pass(b) for b in tree_batches(rows, False, batch_size)]
                return _plain(model, trunk, passes, width, progress)
        for p in group:
            out.update(results[id(p)])
    return out


def _plain(
    model: Blockwise, trunk: Head, passes: list[Pass], width: int, progress: bool = False
) -> dict[int, tuple[float, bool]]:
    out: dict[int, tuple[float, bool]] = {}
    for group in _groups(passes, model.max_bytes, width):
        for p, logits in _walk(model, trunk, group, progress):
            out.update(finish_pass(p, logits))
    return out
