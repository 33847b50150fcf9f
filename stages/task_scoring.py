"""Running loglikelihood requests through a model: shared prefixes, batching, and the probe.

`stages.tasks.loglikelihood` turns requests into input rows (`_Row`) and hands them here.
The rows of one item (one group label) run their longest common token prefix once with
the KV cache and only their remainders on top of it (`_score_groups`); passes are cut by
`length_batches`, and the output head runs only at positions that predict a continuation
token. A model shares prefixes only if a probe on a few token ids scores the same as
plain full-row forwards (`_ModelRunner`); otherwise, and for a plain `Forward` callable,
every row runs whole.
"""

import inspect
import math
import weakref
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from stages.perplexity import Forward

PASS_TOKENS = 24
"""The fixed cost of a forward pass in padded tokens' worth (SmolLM2-135M on one CPU thread:
about 80 ms, reading every weight once, against 3.5 ms a token)."""


def length_batches(rows: list, batch_size: int, pass_tokens: int = PASS_TOKENS) -> list[list]:
    """Rows (sorted longest first) cut into consecutive batches of at most `batch_size` at the least cost.

    lm-eval batches the sorted rows `batch_size` at a time; but a forward costs about the
    same per padded token on a CPU, so a short row in a batch of long ones wastes most of
    its compute, while every pass also has a fixed cost (`pass_tokens`). The cut here
    minimises padded tokens (rows x width of each batch) plus `pass_tokens` per batch, by
    dynamic programming over the sorted rows; among equal costs earlier batches are fuller.
    Scores are unchanged (right padding is never read). A row is a tuple whose first
    element is the token sequence.
    """
    n = len(rows)
    best = [0.0] + [math.inf] * n  # best[i]: least cost of the first i rows
    start = [0] * (n + 1)  # start[i]: first row of the last batch in that best cut
    for i in range(1, n + 1):
        for j in range(max(0, i - batch_size), i):
            cost = best[j] + pass_tokens + len(rows[j][0]) * (i - j)  # rows j..i-1 padded to row j's length
            if cost <= best[i]:
                best[i], start[i] = cost, j
    batches, i = [], n
    while i:
        batches.append(rows[start[i] : i])
        i = start[i]
    return batches[::-1]


@dataclass(eq=False)
class _Row:
    """One input row (`whole[:-1]`) and the requests scored on it."""

    ids: tuple[int, ...]
    group: Hashable
    reqs: list[tuple[int, list[int]]] = field(default_factory=list)
    """(request index, continuation ids): the continuation is predicted by the row's last len(cont) positions."""
    head: torch.Tensor | None = None
    """Kept logits from the prefix pass, waiting for the remainder's."""

    @property
    def first(self) -> int:
        """The first position whose logits some request of the row needs."""
        return len(self.ids) - max(len(cont) for _, cont in self.reqs)


@dataclass(eq=False)
class _Group:
    """Rows that share their first `width` tokens; a group of one row is the whole row."""

    rows: list[_Row]
    width: int


def _prefix_groups(rows: Iterable[_Row]) -> list[_Group]:
    """Rows grouped by label with their longest common token prefix; rows with none stay alone."""
    labelled: dict[Hashable, list[_Row]] = {}
    for row in rows:
        labelled.setdefault(row.group, []).append(row)
    out = []
    for members in labelled.values():
        width = min(len(r.ids) for r in members)
        for r in members[1:]:
            width = next((k for k in range(width) if r.ids[k] != members[0].ids[k]), width)
        if width:
            out.append(_Group(members, width))
        else:
            out.extend(_Group([r], len(r.ids)) for r in members)
    return out


def _score_groups(runner: "_Runner", groups: list[_Group], batch_size: int) -> Iterator[tuple[int, tuple[float, bool]]]:
    """Score groups: their prefixes in one right-padded pass (with the KV cache if some row goes
    on), then the remainders of their rows, longest first, in passes of at most `batch_size` rows
    on the cache rows of their prefixes. Yields (request index, (loglik, greedy))."""
    width = max(g.width for g in groups)
    ids = torch.zeros(len(groups), width, dtype=torch.long)  # (b, P); pad id 0 as lm-eval, never read
    keep = torch.zeros(len(groups), width, dtype=torch.bool)  # positions whose logits are needed
    lows = []
    for i, g in enumerate(groups):
        ids[i, : g.width] = torch.tensor(g.rows[0].ids[: g.width])
        lows.append(min(r.first for r in g.rows))
        keep[i, lows[i] : g.width] = True
    rest = [(i, r) for i, g in enumerate(groups) for r in g.rows if len(r.ids) > g.width]
    logits, cache = runner(ids, keep, use_cache=bool(rest))
    for i, (g, kept) in enumerate(zip(groups, logits.split(keep.sum(dim=1).tolist()))):
        for r in g.rows:
            r.head = kept[max(r.first - lows[i], 0) :] if r.first < g.width else kept[:0]  # positions first..P-1
            if len(r.ids) == g.width:
                yield from _score_row(r)
    rest.sort(key=lambda ir: -(len(ir[1].ids) - groups[ir[0]].width))
    for chunk in length_batches([(r.ids[groups[i].width :], i, r) for i, r in rest], batch_size):
        starts = torch.tensor([groups[i].width for _, i, _ in chunk])  # (n,) prefix length of each row
        past = int(starts.max())
        tail = max(len(rem) for rem, _, _ in chunk)
        ids = torch.zeros(len(chunk), tail, dtype=torch.long)  # (n, R) right-padded remainders
        keep = torch.zeros(len(chunk), tail, dtype=torch.bool)
        for k, (rem, _, r) in enumerate(chunk):
            ids[k, : len(rem)] = torch.tensor(rem)
            keep[k, max(r.first - int(starts[k]), 0) : len(rem)] = True
        mask = None
        if int(starts.min()) < past:  # cache positions past a row's own prefix are another item's padding
            mask = (torch.arange(past + tail)[None, :] < starts[:, None]) | (torch.arange(past + tail)[None, :] >= past)
            mask = mask.long()  # (n, past + R)
        index = torch.tensor([i for _, i, _ in chunk])
        positions = starts[:, None] + torch.arange(tail)[None, :]  # (n, R)
        tails, _ = runner(ids, keep, cache=runner.select(cache, index, past), positions=positions, mask=mask)
        for (_, _, r), kept in zip(chunk, tails.split(keep.sum(dim=1).tolist())):
            r.head = torch.cat([r.head, kept])
            yield from _score_row(r)


def _score_row(row: _Row) -> Iterator[tuple[int, tuple[float, bool]]]:
    """(request, (loglik, greedy)) of a row whose logits at positions first..L-1 are in `row.head`."""
    logprobs = torch.log_softmax(row.head.float(), dim=-1)  # (L - first, vocab)
    row.head = None
    for j, cont in row.reqs:
        lp = logprobs[len(logprobs) - len(cont) :]  # the last len(cont) positions predict cont
        target = torch.tensor(cont, device=lp.device)
        yield j, (float(lp.gather(1, target[:, None]).sum()), bool((lp.argmax(dim=-1) == target).all()))


class _Runner:
    """Runs a right-padded batch and returns the logits at its `keep` positions, flattened (n_keep, vocab)."""

    shares_prefixes = False

    def __call__(self, ids: torch.Tensor, keep: torch.Tensor, *, use_cache: bool = False, cache=None,
                 positions: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, object]:
        raise NotImplementedError

    def select(self, cache, index: torch.Tensor, length: int):
        """A new cache of the first `length` positions of batch rows `index` of `cache`."""
        raise NotImplementedError


class _ForwardRunner(_Runner):
    """A `Forward` callable: full logits of every row, no cache."""

    def __init__(self, forward: Forward):
        self.forward = forward

    def __call__(self, ids, keep, *, use_cache=False, cache=None, positions=None, mask=None):
        logits = self.forward(ids)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != ids.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"forward must return logits (b, L, vocab) for ids {tuple(ids.shape)}, got {got}")
        return logits[keep.to(logits.device)], None


class _ModelRunner(_Runner):
    """A Hugging Face causal LM, with its own KV cache (`DynamicCache`) and `logits_to_keep`.

    The prefix pass returns the model's cache; a remainder pass gets a new cache of the
    prefix rows it continues (`select`), explicit position ids (prefix length + offset)
    and, where prefixes of different lengths share the pass, an attention mask that hides
    the cache positions past a row's own prefix. `logits_to_keep` takes the boolean
    `(b, L)` mask, so the output head runs only at the kept positions; a model without it
    returns full logits, indexed here. Both features are used only if a probe on a few
    token ids scores the same with them as with plain full-row forwards (a model without
    a cache, with sliding-window or other cache layers, or that ignores position ids or
    masks, falls back to full rows). The probe's answer is kept per model, device and dtype.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        params = inspect.signature(model.forward).parameters
        self.cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None)
        probed = _PROBED.setdefault(model, {})
        if (self.device, self.dtype) not in probed:
            self.keep_kw = "logits_to_keep" in params
            self.keep_kw = self.keep_kw and self._agrees(shares_prefixes=False)
            can_cache = self.cache_kw is not None and {"position_ids", "attention_mask", "use_cache"} <= params.keys()
            self.shares_prefixes = can_cache and self._agrees(shares_prefixes=True)
            probed[self.device, self.dtype] = self.keep_kw, self.shares_prefixes
        self.keep_kw, self.shares_prefixes = probed[self.device, self.dtype]

    def __call__(self, ids, keep, *, use_cache=False, cache=None, positions=None, mask=None):
        keep = keep.to(self.device)
        kwargs: dict = {"input_ids": ids.to(self.device), "use_cache": use_cache or cache is not None}
        if cache is not None:
            kwargs[self.cache_kw] = cache
        if positions is not None:
            kwargs["position_ids"] = positions.to(self.device)
        if mask is not None:
            kwargs["attention_mask"] = mask.to(self.device)
        if self.keep_kw:
            kwargs["logits_to_keep"] = keep
        out = self.model(**kwargs)
        logits = out.logits
        if not self.keep_kw:
            logits = logits[keep]
        if logits.ndim != 2 or logits.shape[0] != int(keep.sum()):
            raise ValueError(f"expected logits ({int(keep.sum())}, vocab) at the kept positions, got {tuple(logits.shape)}")
        if not use_cache:
            return logits, None
        new_cache = getattr(out, "cache", None)
        return logits, new_cache if new_cache is not None else getattr(out, "past_key_values", None)

    def select(self, cache, index: torch.Tensor, length: int):
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            raise TypeError(f"prefix sharing needs a DynamicCache of plain DynamicLayers, got {type(cache).__name__}")
        index = index.to(self.device)
        return DynamicCache(ddp_cache_data=[(layer.keys.index_select(0, index)[:, :, :length],
                                             layer.values.index_select(0, index)[:, :, :length]) for layer in layers])

    def _agrees(self, shares_prefixes: bool) -> bool:
        """Whether scoring a few made-up rows with this setting matches full-row forwards with full logits."""
        vocab = int(getattr(self.model.config, "vocab_size", 0) or 0) or 32
        wholes = [[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, 12, 13, 14, 15], [5, 6, 16, 17, 18], [5, 6, 19, 20], [7, 8, 9, 10]]
        labels = [0, 0, 1, 1, 2]  # prefixes 4 and 2 in one pass (masked gap), a continuation into the prefix, a row alone
        rows = [_Row(tuple(t % vocab for t in w[:-1]), g, [(k, [t % vocab for t in w[-3:]])])
                for k, (w, g) in enumerate(zip(wholes, labels))]
        plain = _ForwardRunner(lambda ids: self.model(input_ids=ids.to(self.device), use_cache=False).logits)
        saved = self.shares_prefixes
        self.shares_prefixes = shares_prefixes
        try:
            with torch.inference_mode():
                want = dict(_score_groups(plain, [_Group([r], len(r.ids)) for r in rows], 8))
                groups = _prefix_groups(rows) if shares_prefixes else [_Group([r], len(r.ids)) for r in rows]
                got = dict(_score_groups(self, sorted(groups, key=lambda g: -g.width), 8))
        except Exception:  # noqa: BLE001  an unsupported feature falls back, whatever it raises
            return False
        finally:
            self.shares_prefixes = saved
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2
        return all(abs(got[k][0] - want[k][0]) <= tol * (1 + abs(want[k][0])) for k in want)


_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
"""model -> {(device, dtype): (keep_kw, shares_prefixes)}: each model is probed once per device and dtype."""


def _runner(model: "torch.nn.Module | Forward") -> _Runner:
    """The runner of an HF causal LM (any `nn.Module` with `.config`) or of a `Forward` callable."""
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return _ModelRunner(model)
    return _ForwardRunner(model)
