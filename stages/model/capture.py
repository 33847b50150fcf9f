"""Capture the inputs of the first decoder block, and apply what follows the last one.

Both use the *trunk*: the real model built on the meta device, with every decoder
block replaced by a `_Stub` and all other weights (embeddings, final norm, lm_head,
rotary buffers) loaded from safetensors. `capture_inputs` runs the trunk on token ids
and records what block 0 receives (hidden states plus the keyword arguments: mask,
position ids, rotary embeddings ...), whatever the architecture computes before its
blocks. `Head` injects hidden states at block 0 and lets the others pass them
through, so the model's own forward applies its final norm, projections and lm_head.
Peak memory is the non-block weights plus one batch of activations.
"""

import contextlib
import inspect
import os

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from stages.model.blocks import Kwargs, find_blocks, materialize, meta_model, move_kwargs
from stages.model.checkpoint import SafetensorsIndex
from stages.run.transfer import HostSink, device_batches

PathLike = str | os.PathLike


class _Stop(Exception):
    """Raised by a stub to end a forward pass early (private)."""


class _StubState:
    """What the stubs of one trunk share: what to record, where to stop, what to inject."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.calls: list[tuple[int, torch.Tensor, Kwargs]] = []
        self.stop_at: int | None = None
        self.inject: torch.Tensor | None = None


class _Stub(nn.Module):
    """Stands in for decoder block `index`: records its inputs, then stops, injects or passes through."""

    def __init__(self, index: int, signature: inspect.Signature, state: _StubState) -> None:
        super().__init__()
        self.index, self.signature, self.state = index, signature, state

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        bound = self.signature.bind(hidden_states, *args, **kwargs).arguments
        named: Kwargs = {}
        for j, (name, value) in enumerate(bound.items()):
            kind = self.signature.parameters[name].kind
            if j > 0:  # the first parameter is the hidden states
                named.update(value if kind is inspect.Parameter.VAR_KEYWORD else {name: value})
        self.state.calls.append((self.index, hidden_states, named))
        if self.index == self.state.stop_at:
            raise _Stop
        if self.index == 0 and self.state.inject is not None:
            return self.state.inject
        return hidden_states


def _trunk(
    model_dir: PathLike, device: torch.device | str, dtype: torch.dtype, trust_remote_code: bool, head: bool = True
) -> tuple[PreTrainedModel, _StubState]:
    """The real model with every decoder block replaced by a `_Stub` and all other weights loaded; without
    `head` an untied output projection is left out (capture stops before it: 2 GiB less for a 128k
    vocabulary at hidden 4096 in fp32)."""
    model = meta_model(model_dir, trust_remote_code)
    _, blocks = find_blocks(model)
    state = _StubState(len(blocks))
    for i, block in enumerate(blocks):
        blocks[i] = _Stub(i, inspect.signature(block.forward), state)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if not head and out is not None and inp is not None and out.weight is not inp.weight:
        with contextlib.suppress(AttributeError, NotImplementedError):  # a model that cannot swap it keeps it
            model.set_output_embeddings(nn.Identity())
    index = SafetensorsIndex.open(model_dir)
    names = {}
    for name in model.state_dict():
        stripped = name.split(".", 1)[-1] if name.startswith(f"{model.base_model_prefix}.") else name
        key = name if name in index.weight_map else stripped if stripped in index.weight_map else None
        if key is not None:
            names[key] = name
    loaded = index.load(list(names), dtype, device)
    materialize(model, model, {names[k]: t for k, t in loaded.items()}, device)
    return model.eval(), state


def _run_trunk(model: PreTrainedModel, input_ids: torch.Tensor) -> object:
    try:
        return model(input_ids=input_ids, use_cache=False)
    except _Stop:
        return None


def _run_trunk_with(model: PreTrainedModel, input_ids: torch.Tensor, model_kwargs: dict) -> object:
    try:
        return model(input_ids=input_ids, use_cache=False, **model_kwargs)
    except _Stop:
        return None


def _clean_kwargs(kwargs: Kwargs) -> Kwargs:
    """Drop what a later block call must not get: Nones and cache objects."""
    return {k: v for k, v in kwargs.items() if v is not None and not isinstance(v, Cache)}


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


@torch.no_grad()
def capture_inputs(
    model_dir: PathLike,
    input_ids: torch.Tensor,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 8,
    trust_remote_code: bool = False,
) -> tuple[torch.Tensor, Kwargs]:
    """Inputs of block 0 for `input_ids` (n, seqlen), on CPU, and the kwargs every block receives.

    Runs the trunk (`_trunk`) with use_cache=False: once on sample 0 through all stub
    blocks to record each block's kwargs at batch size 1 (they must be the same for all
    blocks), then in batches stopping at block 0 to collect its hidden states.
    """
    if input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise ValueError(f"input_ids must be a (n, seqlen) LongTensor, got {input_ids.dtype} {tuple(input_ids.shape)}")
    model, state = _trunk(model_dir, device, dtype, trust_remote_code, head=False)
    n_blocks = state.num_blocks
    state.stop_at = n_blocks - 1
    _run_trunk(model, input_ids[:1].to(device))
    per_block = [_clean_kwargs(kw) for _, _, kw in state.calls]
    if len(per_block) != n_blocks:
        raise ValueError(f"{type(model).__name__} called {len(per_block)} of its {n_blocks} blocks; cannot capture")
    for i, kwargs in enumerate(per_block[1:], start=1):
        if kwargs.keys() != per_block[0].keys() or not all(_same(v, per_block[0][k]) for k, v in kwargs.items()):
            raise ValueError(
                f"{type(model).__name__}: block {i} receives other kwargs than block 0 (e.g. sliding-window layers); "
                "per-block kwargs are not supported yet"
            )
    state.stop_at, hidden = 0, []
    with HostSink(hidden.append) as outputs:
        for batch in device_batches(input_ids.split(batch_size), device):
            state.calls.clear()
            _run_trunk(model, batch)
            outputs(state.calls[0][1])
    cpu = torch.device("cpu")
    return torch.cat(hidden), {k: move_kwargs(v, 1, cpu, dtype) for k, v in per_block[0].items()}


class Head:
    """What follows the last decoder block (final norm, projections, lm_head), applied generically.

    It is the trunk with block 0 returning the given hidden states and the other
    blocks passing them through, so the model's own forward applies whatever comes
    after its blocks. Holds only the non-block weights.
    """

    def __init__(
        self,
        model_dir: PathLike,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self.model, self._state = _trunk(model_dir, device, dtype, trust_remote_code)

    @torch.no_grad()
    def block_inputs(self, input_ids: torch.Tensor, **model_kwargs: object) -> tuple[torch.Tensor, list[Kwargs]]:
        """What each block receives for a batch of `input_ids` (b, L) run with `model_kwargs` (e.g. an
        attention mask and position ids): block 0's hidden states, and every block's keyword arguments at
        this batch size (usually one object shared by all blocks)."""
        self._state.stop_at = self._state.num_blocks - 1
        try:
            _run_trunk_with(self.model, input_ids.to(self.device), model_kwargs)
            calls = list(self._state.calls)
        finally:
            self._state.stop_at = None
            self._state.calls.clear()
        if len(calls) != self._state.num_blocks:
            name = type(self.model).__name__
            raise ValueError(f"{name} called {len(calls)} of its {self._state.num_blocks} blocks; cannot capture")
        return calls[0][1], [_clean_kwargs(kw) for _, _, kw in calls]

    @torch.no_grad()
    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits (b, seqlen, vocab) for the last block's output `hidden` (b, seqlen, hidden)."""
        self._state.inject = hidden.to(self.device, self.dtype)
        try:
            ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=self.device)
            logits = self.model(input_ids=ids, use_cache=False).logits
        finally:
            self._state.inject = None
            self._state.calls.clear()
        if logits.shape[:2] != hidden.shape[:2]:
            name, got, given = type(self.model).__name__, tuple(logits.shape), tuple(hidden.shape)
            raise ValueError(f"{name}: the head gave logits of shape {got} for hidden states {given}")
        return logits


def head_logits(model_dir: PathLike, hidden: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """One-off `Head(model_dir, **kwargs)(hidden)`; build a `Head` once to call it repeatedly."""
    return Head(model_dir, **kwargs)(hidden)
