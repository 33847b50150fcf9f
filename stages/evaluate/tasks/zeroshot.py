"""Zero-shot task accuracy (LAMBADA, PIQA, ARC, HellaSwag, WinoGrande, BoolQ, StoryCloze).

A task SPEC is `NAME=PATH` (the standard evaluation file, see `task_formats.FILE_HINTS`)
or a bare `NAME` (the hub copy lm-eval uses; needs internet). `evaluate_tasks(model,
tokenizer, specs)` scores every item the way lm-evaluation-harness does: the summed
log-probability of each continuation given its context (`loglikelihood`), `acc` the
argmax, `acc_norm` the argmax after dividing by the choice's character length, and
for LAMBADA the greedy last-word accuracy and `ppl = exp(-mean target loglik)`.
`model` is a Hugging Face causal LM: the requests of an item run as one token trie, each
distinct token once, with a mask that lets a token see only its own row, and the output
head runs only at positions that predict a continuation token (`stages.evaluate.tasks.scoring`).
A `Blockwise` checkpoint (`stages.evaluate.tasks.blockwise`) runs the same tries one block
in memory at a time, for models larger than memory. Any `Forward` (a `(b, L)` LongTensor to
logits `(b, L, vocab)`, e.g.
`stages.evaluate.perplexity.causal_lm_forward(model)`) also works, one full row per request
input. Batches are right-padded, which no score sees because no position attends to
padding."""

import math
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stages.evaluate.perplexity import Forward
from stages.evaluate.tasks.blockwise import Blockwise, blockwise_scores
from stages.evaluate.tasks.formats import (
    Item,
    TaskSpec,
    hub_items,
    parse_task_spec,
    parse_task_specs,
    read_items,
)
from stages.evaluate.tasks.scoring import (  # noqa: F401 (PASS_TOKENS, length_batches re-exported)
    PASS_TOKENS,
    _Row,
    _runner,
    _score_trees,
    length_batches,
    tree_batches,
)

DEFAULT_MAX_LENGTH = 2048
"""lm-eval's fallback context length when neither the caller nor the tokenizer gives one."""

METRICS = {
    "lambada": ("acc", "ppl"),
    "piqa": ("acc", "acc_norm"),
    "arc_easy": ("acc", "acc_norm"),
    "arc_challenge": ("acc", "acc_norm"),
    "hellaswag": ("acc", "acc_norm"),
    "winogrande": ("acc",),
    "boolq": ("acc",),
    "storycloze": ("acc",),
}
"""Task name -> the metrics lm-eval reports for it (its YAML's metric_list)."""


def load_task(spec: str | TaskSpec, limit: int | None = None) -> list[Item]:
    """The first `limit` items (all if None) of a task SPEC."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None, got {limit}")
    spec = parse_task_spec(spec)
    if spec.path is None:
        return hub_items(spec.name, limit)
    return read_items(spec.name, spec.path, limit)


def encode_pair(tokenizer: PreTrainedTokenizerBase, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's `_encode_pair`: trailing spaces move to the continuation, which is
    `encode(context + continuation)[len(encode(context)):]`; no special tokens, except
    an empty context becomes the BOS (else EOS) token."""
    if not continuation:
        raise ValueError(f"empty continuation for context {context[-60:]!r}")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("an empty context needs a BOS or EOS token, and the tokenizer has neither")
        return [prefix], tokenizer.encode(continuation, add_special_tokens=False)
    whole = tokenizer.encode(context + continuation, add_special_tokens=False)
    context_enc = tokenizer.encode(context, add_special_tokens=False)
    return context_enc, whole[len(context_enc) :]


def loglikelihood(
    model: "torch.nn.Module | Forward | Blockwise",
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
    groups: Sequence[Hashable] | None = None,
) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy argmax) per request.

    Inputs are `(context + continuation)[-(max_length + 1):][:-1]` as in lm-eval; requests
    with the same input (e.g. BoolQ's " no"/" yes") share one row. `model` is a Hugging
    Face causal LM or a `Forward` (ids -> logits, every row a full pass). For an HF model
    the rows of one group (`groups[j]` labels request j, e.g. its item; by default its
    context) run as one token trie, each shared token once, several tries packed in one
    batch row (`stages.evaluate.tasks.scoring`, where a probe decides if the model can); logits are
    projected only at the positions that predict a continuation token. Passes hold at
    most `batch_size` batch rows (`tree_batches`). Results come back in request order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if groups is not None and len(groups) != len(requests):
        raise ValueError(f"groups has {len(groups)} labels for {len(requests)} requests")
    max_length = max_length or _tokenizer_max_length(tokenizer)
    rows: dict[tuple[int, ...], _Row] = {}  # input ids -> row
    for j, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-60:]!r}")
        if len(cont) > max_length:
            raise ValueError(
                f"continuation of {len(cont)} tokens exceeds max_length={max_length}: {continuation[:60]!r}"
            )
        whole = (ctx + cont)[-(max_length + 1) :]
        ids = tuple(whole[:-1])
        if ids not in rows:
            rows[ids] = _Row(ids, groups[j] if groups is not None else context)
        rows[ids].reqs.append((j, cont))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    if isinstance(model, Blockwise):
        for j, res in blockwise_scores(model, rows.values(), batch_size, progress).items():
            results[j] = res
        return results
    runner = _runner(model)
    with torch.inference_mode():
        for batch in tqdm(
            tree_batches(rows.values(), runner.shares_prefixes, batch_size), desc="loglikelihood", disable=not progress
        ):
            for j, res in _score_trees(runner, batch):
                results[j] = res
    return results


def _tokenizer_max_length(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's model_max_length when it is a real limit, else lm-eval's 2048."""
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if isinstance(n, int) and 0 < n < 1_000_000 else DEFAULT_MAX_LENGTH


@dataclass(frozen=True)
class ItemScore:
    """Scores of one item."""

    lls: tuple[float, ...]
    """Summed continuation log-likelihood of each request."""
    greedy: tuple[bool, ...]
    """Whether each continuation is the model's greedy argmax."""
    pred: int
    """argmax of `lls`."""
    pred_norm: int
    """argmax of `lls` divided by the character length of each choice."""


def score_items(
    model: "torch.nn.Module | Forward | Blockwise",
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """Score every request of every item (`loglikelihood`, an item's requests share their prefix); item predictions."""
    flat = [req for item in items for req in item.requests]
    labels = [k for k, item in enumerate(items) for _ in item.requests]
    res = loglikelihood(model, tokenizer, flat, batch_size, max_length, progress, groups=labels)
    scores, k = [], 0
    for item in items:
        part = res[k : k + len(item.requests)]
        k += len(item.requests)
        lls = tuple(ll for ll, _ in part)
        normed = [ll / max(choice_length(c), 1) for ll, c in zip(lls, item.choices, strict=True)]
        scores.append(ItemScore(lls, tuple(g for _, g in part), _argmax(lls), _argmax(normed)))
    return scores


def choice_length(choice: str) -> int:
    """What `acc_norm` divides a choice's log-likelihood by: its length in characters.

    lm-evaluation-harness (v0.4 to its current main) computes
    `completion_len = np.array([float(len(i)) for i in choices])` in
    `ConfigurableTask.process_results` (lm_eval/api/task.py): Python's `len(str)`, i.e.
    Unicode code points of the choice text without the target delimiter. UTF-8 byte
    counts (`count_bytes`) appear there only in `byte_perplexity`/`bits_per_byte`. We
    follow lm-eval, so "naïve" counts 5, not 6; the two differ only for non-ASCII text.
    """
    return len(choice)


def _argmax(values: Iterable[float]) -> int:
    """Index of the first maximum (numpy's tie rule)."""
    values = list(values)
    return values.index(max(values))


def task_metrics(name: str, items: Sequence[Item], scores: Sequence[ItemScore]) -> dict[str, float | int]:
    """lm-eval's metrics of task `name` (see `METRICS`) plus `n`, from per-item scores."""
    n = len(items)
    if n == 0:
        raise ValueError(f"task {name} has no items to score")
    if name == "lambada":
        return {
            "acc": sum(s.greedy[0] for s in scores) / n,
            "ppl": math.exp(-sum(s.lls[0] for s in scores) / n),
            "n": n,
        }
    out: dict[str, float | int] = {"acc": sum(s.pred == it.gold for s, it in zip(scores, items, strict=True)) / n}
    if "acc_norm" in METRICS[name]:
        out["acc_norm"] = sum(s.pred_norm == it.gold for s, it in zip(scores, items, strict=True)) / n
    out["n"] = n
    return out


def evaluate_tasks(
    model: "torch.nn.Module | Forward | Blockwise",
    tokenizer: PreTrainedTokenizerBase,
    specs: Iterable[str | TaskSpec],
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float | int]]:
    """{task name: {"acc", ["acc_norm" | "ppl"], "n"}} for every SPEC, on its first `limit` items.

    `model` is a Hugging Face causal LM (prefix sharing, logits only where needed), a
    `Blockwise` checkpoint (the same, one block in memory) or a `Forward`. `max_length` is the
    model's context (e.g. `stages.model.models.max_positions(model.config)`); None uses the
    tokenizer's, else 2048. Specs are all parsed before any scoring starts.
    """
    parsed = parse_task_specs(specs)
    results = {}
    for spec in parsed:
        items = load_task(spec, limit)
        scores = score_items(model, tokenizer, items, batch_size, max_length, progress)
        results[spec.name] = task_metrics(spec.name, items, scores)
    return results
