"""Running loglikelihood requests through a model: token tries, batching, and the probe.

`stages.evaluate.tasks.zeroshot.loglikelihood` turns requests into input rows (`_Row`) and hands them here.
The rows of one item (one group label) are packed into one token trie (`_Tree`): every
distinct token path appears once, each token at its position in its own row, and a 4D
attention mask lets a token see only its ancestors, so one pass of one sequence scores
all of an item's requests with no KV cache, no copies and no padding between them.
Several tries share a batch row where they fit, passes are cut by `length_batches`
(`tree_batches`), and the output head runs only at nodes that predict a continuation
token. A model runs trees only if a probe on a few token ids
scores them like plain full-row forwards (`_ModelRunner`); otherwise, and for a plain
`Forward` callable, every row is its own causal sequence. Scores equal one request at a
time up to float rounding, as no position sees a token its own row would not hold there.
"""

import inspect
import math
import weakref
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field

import torch

from stages.evaluate.perplexity import Forward

PASS_TOKENS = 24
"""The fixed cost of a forward pass in padded tokens' worth (SmolLM2-135M on one CPU thread:
a matmul over a few rows reads every weight for little work, about 40 ms, against 2.7 ms a token)."""


def length_batches(rows: list, batch_size: int, pass_tokens: int = PASS_TOKENS) -> list[list]:
    """Rows (sorted longest first) cut into consecutive batches of at most `batch_size` at the least cost.

    lm-eval batches the sorted rows `batch_size` at a time; but a forward costs about the
    same per padded token on a CPU, so a short row in a batch of long ones wastes most of
    its compute, while every pass also has a fixed cost (`pass_tokens`). The cut here
    minimises padded tokens (rows x width of each batch) plus `pass_tokens` per batch, by
    dynamic programming over the sorted rows; among equal costs earlier batches are fuller.
    Scores are unchanged (padding is never read). A row is a tuple whose first element is
    the token sequence.
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

    @property
    def first(self) -> int:
        """The first position whose logits some request of the row needs."""
        return len(self.ids) - max(len(cont) for _, cont in self.reqs)


@dataclass(eq=False)
class _Tree:
    """Rows packed as a token trie: nodes in creation order (a parent before its children)."""

    rows: list[_Row]
    ids: list[int] = field(default_factory=list)
    """The token of each node."""
    paths: list[list[int]] = field(default_factory=list)
    """Per row, the node at each of its positions (a node's position is its depth)."""

    @classmethod
    def of(cls, rows: list[_Row]) -> "_Tree":
        """The trie of `rows`: each token goes to its predecessor's child of that token, new or not."""
        tree, children = cls(rows), {}  # (parent node or -1, token) -> node
        for row in rows:
            node, path = -1, []
            for token in row.ids:
                node = children.setdefault((node, token), len(tree.ids))
                if node == len(tree.ids):
                    tree.ids.append(token)
                path.append(node)
            tree.paths.append(path)
        return tree

    @property
    def chain(self) -> bool:
        """Whether the tree is one row and its prefixes: node k at position k, a plain causal sequence."""
        return len(self.ids) == max(len(p) for p in self.paths)


def _prefix_trees(rows: Iterable[_Row], shares_prefixes: bool) -> list[_Tree]:
    """One trie per group label if `shares_prefixes`, else one per row; longest first."""
    if not shares_prefixes:
        return sorted((_Tree.of([r]) for r in rows), key=lambda t: -len(t.ids))
    labelled: dict[Hashable, list[_Row]] = {}
    for row in rows:
        labelled.setdefault(row.group, []).append(row)
    return sorted((_Tree.of(members) for members in labelled.values()), key=lambda t: -len(t.ids))


def tree_batches(rows: Iterable[_Row], shares_prefixes: bool, batch_size: int) -> list[list[list[_Tree]]]:
    """Passes of at most `batch_size` lines, a line being the trees that share one batch row.

    If `shares_prefixes`, the rows of a group label form one trie and the tries are packed
    first-fit, longest first, into lines as long as the longest trie (`_pack`): little
    padding is left, and passes are few and large (a CPU's matmuls are most efficient on
    hundreds of rows). Otherwise every row is a line of its own. The lines, longest first,
    are cut into passes by `length_batches`."""
    trees = _prefix_trees(rows, shares_prefixes)
    lines = _pack(trees) if shares_prefixes else [[t] for t in trees]
    lines.sort(key=lambda line: -sum(len(t.ids) for t in line))
    cuts = length_batches([([i for t in line for i in t.ids], line) for line in lines], batch_size)
    return [[line for _, line in batch] for batch in cuts]


def _pack(trees: list[_Tree]) -> list[list[_Tree]]:
    """Trees (longest first) packed first-fit into lines of at most the first tree's nodes."""
    lines: list[list[_Tree]] = []
    free: list[int] = []  # nodes left in each line
    for t in trees:
        k = next((k for k, f in enumerate(free) if f >= len(t.ids)), len(lines))
        if k == len(lines):
            lines.append([])
            free.append(len(trees[0].ids))
        lines[k].append(t)
        free[k] -= len(t.ids)
    return lines


@dataclass
class Pass:
    """One right-padded forward pass over lines of trees: its inputs, and where each request's logits land."""

    ids: torch.Tensor
    """(b, W) token ids; padding is id 0 (as lm-eval), never read."""
    keep: torch.Tensor
    """(b, W) bool: the nodes whose logits some request needs."""
    tree_kw: dict[str, torch.Tensor]
    """`positions` (b, W) and `sees` (b, W, W), unless every line is one chain."""
    nodes_of: list[tuple[int, _Row, torch.Tensor]]
    """(batch row, row, nodes of the row in the batch row)."""


def _score_trees(runner: "_Runner", lines: list[list[_Tree]]) -> Iterator[tuple[int, tuple[float, bool]]]:
    """Score lines of trees in one right-padded pass; yields (request index, (loglik, greedy))."""
    p = prepare_pass(lines)
    return finish_pass(p, runner(p.ids, p.keep, **p.tree_kw))


def prepare_pass(lines: list[list[_Tree]]) -> Pass:
    """The inputs of one pass over lines of trees.

    Kept are the nodes at positions `first..` of some row. Unless every line is one chain,
    the pass gets each node's position in its row and a mask (b, W, W) letting a node see
    its ancestors and itself (a padding node only itself)."""
    width = max(sum(len(t.ids) for t in line) for line in lines)
    ids = torch.zeros(len(lines), width, dtype=torch.long)  # (b, W); pad id 0 as lm-eval, never read
    keep = torch.zeros(len(lines), width, dtype=torch.bool)  # nodes whose logits are needed
    tree_kw = {}
    if not all(len(line) == 1 and line[0].chain for line in lines):
        tree_kw["positions"] = torch.zeros(len(lines), width, dtype=torch.long)  # (b, W)
        tree_kw["sees"] = torch.eye(width, dtype=torch.bool).repeat(len(lines), 1, 1)  # (b, W, W) query -> key node
    nodes_of = []  # (batch row, row, nodes of the row in the batch row)
    for b, line in enumerate(lines):
        start = 0
        for t in line:
            ids[b, start : start + len(t.ids)] = torch.tensor(t.ids)
            for row, path in zip(t.rows, t.paths, strict=True):
                nodes = torch.tensor(path) + start
                keep[b, nodes[row.first :]] = True
                nodes_of.append((b, row, nodes))
                if tree_kw:
                    tree_kw["positions"][b, nodes] = torch.arange(len(path))
                    tree_kw["sees"][b, nodes[:, None], nodes[None, :]] |= torch.ones(
                        len(path), len(path), dtype=torch.bool
                    ).tril()
            start += len(t.ids)
    return Pass(ids, keep, tree_kw, nodes_of)


def finish_pass(p: Pass, logits: torch.Tensor) -> Iterator[tuple[int, tuple[float, bool]]]:
    """(request index, (loglik, greedy)) of every request of a pass, from its logits at the kept nodes
    (n_keep, vocab), in (b, node) order."""
    kept_at = p.keep.flatten().cumsum(0).view_as(p.keep) - 1  # (b, W) row of a kept node in logits
    reqs = [(j, cont) for _, row, _ in p.nodes_of for j, cont in row.reqs]
    at = torch.cat(
        [kept_at[b, nodes[len(nodes) - len(cont) :]] for b, row, nodes in p.nodes_of for _, cont in row.reqs]
    )
    picked, greedy = _log_probs(
        logits, at, torch.tensor([t for _, cont in reqs for t in cont])
    )  # per continuation token
    sizes = [len(cont) for _, cont in reqs]
    for (j, _), lp, hit in zip(reqs, picked.split(sizes), greedy.split(sizes), strict=True):
        yield j, (float(lp.sum()), bool(hit.all()))


def _log_probs(
    logits: torch.Tensor, at: torch.Tensor, target: torch.Tensor, chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(target[i]) at logits row at[i], whether target[i] is that row's argmax), on the CPU:
    a float32 log-softmax once per logits row, however many continuations it predicts, in chunks."""
    at, target = at.to(logits.device), target.to(logits.device)
    picked = torch.empty(len(at), device=logits.device)
    greedy = torch.empty(len(at), dtype=torch.bool, device=logits.device)
    for lo in range(0, len(logits), chunk):
        logprobs = torch.log_softmax(logits[lo : lo + chunk].float(), dim=-1)  # (chunk, vocab)
        sel = (at >= lo) & (at < lo + chunk)
        picked[sel] = logprobs[at[sel] - lo, target[sel]]
        greedy[sel] = logprobs.argmax(dim=-1)[at[sel] - lo] == target[sel]
    return picked.cpu(), greedy.cpu()


class _Runner:
    """Runs a right-padded batch and returns the logits at its `keep` positions, flattened (n_keep, vocab).

    `positions` (b, W) and `sees` (b, W, W: may query node q attend to key node k) come
    only for trees that are not chains, and only to a runner that `shares_prefixes`."""

    shares_prefixes = False

    def __call__(
        self,
        ids: torch.Tensor,
        keep: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        sees: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise NotImplementedError


class _ForwardRunner(_Runner):
    """A `Forward` callable: full logits of every row, plain causal rows only."""

    def __init__(self, forward: Forward):
        self.forward = forward

    def __call__(self, ids, keep, *, positions=None, sees=None):
        if sees is not None:
            raise ValueError("a Forward runs plain causal rows only")
        logits = self.forward(ids)
        if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != ids.shape:
            got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ValueError(f"forward must return logits (b, L, vocab) for ids {tuple(ids.shape)}, got {got}")
        return logits[keep.to(logits.device)]


class _ModelRunner(_Runner):
    """A Hugging Face causal LM, given position ids and a 4D mask for trees, and `logits_to_keep`.

    A tree's mask goes in as an additive float mask (0 where a node may attend, the
    dtype's minimum elsewhere), which transformers passes through to the attention as it
    is (eager and SDPA). `logits_to_keep` takes the boolean `(b, W)` mask, so the output
    head runs only at the kept nodes; a model without it returns full logits, indexed
    here. Both features are used only if a probe on a few token ids scores the same with
    them as with plain full-row forwards: a model that ignores position ids or custom
    masks, or has sliding-window or chunked attention layers (a custom mask would lift
    their window), runs full rows. The probe's answer is kept per model, device and dtype.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        params = inspect.signature(model.forward).parameters
        probed = _PROBED.setdefault(model, {})
        if (self.device, self.dtype) not in probed:
            self.keep_kw = "logits_to_keep" in params
            self.keep_kw = self.keep_kw and self._agrees(shares_prefixes=False)
            can_tree = {"position_ids", "attention_mask"} <= params.keys() and _full_attention_only(model.config)
            self.shares_prefixes = can_tree and self._agrees(shares_prefixes=True)
            probed[self.device, self.dtype] = self.keep_kw, self.shares_prefixes
        self.keep_kw, self.shares_prefixes = probed[self.device, self.dtype]

    def __call__(self, ids, keep, *, positions=None, sees=None):
        keep = keep.to(self.device)
        kwargs: dict = {"input_ids": ids.to(self.device), "use_cache": False}
        if sees is not None:
            mask = torch.zeros(sees.shape, dtype=self.dtype, device=self.device)  # (b, W, W)
            mask.masked_fill_(~sees.to(self.device), torch.finfo(self.dtype).min)
            kwargs["attention_mask"] = mask[:, None]  # (b, 1, W, W)
            kwargs["position_ids"] = positions.to(self.device)
        if self.keep_kw:
            kwargs["logits_to_keep"] = keep
        logits = self.model(**kwargs).logits
        if not self.keep_kw:
            logits = logits[keep]
        if logits.ndim != 2 or logits.shape[0] != int(keep.sum()):
            raise ValueError(
                f"expected logits ({int(keep.sum())}, vocab) at the kept positions, got {tuple(logits.shape)}"
            )
        return logits

    def _agrees(self, shares_prefixes: bool) -> bool:
        """Whether scoring a few made-up rows with this setting matches full-row forwards with full logits."""
        rows = probe_rows(self.model.config)
        plain = _ForwardRunner(lambda ids: self.model(input_ids=ids.to(self.device), use_cache=False).logits)
        try:
            with torch.inference_mode():
                want = {j: res for batch in tree_batches(rows, False, 1) for j, res in _score_trees(plain, batch)}
                got = {
                    j: res for batch in tree_batches(rows, shares_prefixes, 8) for j, res in _score_trees(self, batch)
                }
        except Exception:  # noqa: BLE001  an unsupported feature falls back, whatever it raises
            return False
        return probe_agrees(want, got, self.dtype)


def probe_rows(config: object) -> list[_Row]:
    """Made-up rows whose scores as tries must equal their scores as plain rows: a trie of 9 nodes
    (branches at 4 and 5, a continuation into the shared prefix) in a line of its own, a trie of 5 and a
    chain of 3 packed in one line, a chain of 3 in another."""
    vocab = int(getattr(config, "vocab_size", 0) or 0) or 32
    wholes = [
        [5, 6, 7, 8, 9, 10, 11],
        [5, 6, 7, 8, 12, 13, 14, 15],
        [5, 6, 7, 8, 12, 16],
        [5, 6, 16, 17, 18],
        [5, 6, 19, 20],
        [7, 8, 9, 10],
        [9, 8, 7, 6],
    ]
    labels = [0, 0, 0, 1, 1, 2, 3]
    return [
        _Row(tuple(t % vocab for t in w[:-1]), g, [(k, [t % vocab for t in w[-3:]])])
        for k, (w, g) in enumerate(zip(wholes, labels, strict=True))
    ]


def probe_agrees(want: dict, got: dict, dtype: torch.dtype) -> bool:
    """Whether the probe's scores as tries (`got`) equal its scores as plain rows (`want`)."""
    tol = 1e-4 if dtype in (torch.float32, torch.float64) else 3e-2
    return all(abs(got[k][0] - want[k][0]) <= tol * (1 + abs(want[k][0])) for k in want)


def _full_attention_only(config) -> bool:
    """Whether every attention layer sees the whole sequence (no sliding window or chunks a custom mask would lift)."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return all(t == "full_attention" for t in types)
    if getattr(config, "attention_chunk_size", None):
        return False
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False


_PROBED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()
"""model -> {(device, dtype): (keep_kw, shares_prefixes)}: each model is probed once per device and dtype."""


def _runner(model: "torch.nn.Module | Forward") -> _Runner:
    """The runner of an HF causal LM (any `nn.Module` with `.config`) or of a `Forward` callable."""
    if isinstance(model, torch.nn.Module) and hasattr(model, "config"):
        return _ModelRunner(model)
    return _ForwardRunner(model)
