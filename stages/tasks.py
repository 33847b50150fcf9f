"""Zero-shot task accuracy (LAMBADA, PIQA, ARC, HellaSwag, WinoGrande, BoolQ, StoryCloze).

A task SPEC is `NAME=PATH` (the standard evaluation file, see `task_formats.FILE_HINTS`)
or a bare `NAME` (the hub copy lm-eval uses; needs internet). `evaluate_tasks(forward,
tokenizer, specs)` scores every item the way lm-evaluation-harness does: the summed
log-probability of each continuation given its context (`loglikelihood`), `acc` the
argmax, `acc_norm` the argmax after dividing by the choice's character length, and
for LAMBADA the greedy last-word accuracy and `ppl = exp(-mean target loglik)`.
`forward` maps a `(b, L)` LongTensor to logits `(b, L, vocab)`, e.g.
`stages.perplexity.causal_lm_forward(model)`; batches are right-padded, which no score
sees because a causal model's earlier positions never attend to later ones.
"""

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stages.perplexity import Forward
from stages.task_formats import Item, TaskSpec, hub_items, parse_task_spec, parse_task_specs, read_items

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
    forward: Forward,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[tuple[float, bool]]:
    """(sum log p(continuation | context), continuation is the greedy argmax) per request.

    Inputs are `(context + continuation)[-(max_length + 1):][:-1]` as in lm-eval, scored
    longest first in right-padded batches of `batch_size` rows; requests with the same
    input (e.g. BoolQ's " no"/" yes") share one row. Results come back in request order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    max_length = max_length or _tokenizer_max_length(tokenizer)
    targets: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}  # input ids -> [(request, whole[-contlen:])]
    for j, (context, continuation) in enumerate(requests):
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-60:]!r}")
        if len(cont) > max_length:
            raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={max_length}: {continuation[:60]!r}")
        whole = (ctx + cont)[-(max_length + 1) :]
        targets.setdefault(tuple(whole[:-1]), []).append((j, cont))
    rows = sorted(targets.items(), key=lambda kv: -len(kv[0]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    with torch.inference_mode():
        for batch in tqdm(length_batches(rows, batch_size), desc="loglikelihood", disable=not progress):
            for j, res in _score_rows(forward, batch):
                results[j] = res
    return results


PAD_SLACK = 0.75
"""A row shorter than this fraction of its batch's width starts a new batch."""


def length_batches(rows: list, batch_size: int, slack: float = PAD_SLACK) -> list[list]:
    """Rows (sorted longest first) in batches of at most `batch_size`, cut early where padding would dominate.

    lm-eval batches the sorted rows `batch_size` at a time; a forward costs about the
    same per padded token on a CPU, so a short row in a batch of long ones wastes most
    of its compute. Here a batch also ends before a row shorter than `slack` times the
    batch's width, so padding stays under 1/slack - 1 of the real tokens (33% at 0.75).
    Scores are unchanged (right padding is never read).
    """
    batches: list[list] = []
    for row in rows:
        if not batches or len(batches[-1]) == batch_size or len(row[0]) < slack * len(batches[-1][0][0]):
            batches.append([])
        batches[-1].append(row)
    return batches


def _score_rows(
    forward: Forward, rows: list[tuple[tuple[int, ...], list[tuple[int, list[int]]]]]
) -> list[tuple[int, tuple[float, bool]]]:
    """Score (input ids, [(request, continuation ids)]) rows in one right-padded batch."""
    width = max(len(ids) for ids, _ in rows)
    batch = torch.zeros(len(rows), width, dtype=torch.long)  # (b, L); pad id 0 as lm-eval, never read
    for i, (ids, _) in enumerate(rows):
        batch[i, : len(ids)] = torch.tensor(ids)
    logits = forward(batch)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != batch.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
        raise ValueError(f"forward must return logits (b, L, vocab) for ids {tuple(batch.shape)}, got {got}")
    out = []
    for i, (ids, reqs) in enumerate(rows):
        for j, cont in reqs:
            # logits at input position t predict token t+1: the last len(cont) positions predict cont
            logprobs = torch.log_softmax(logits[i, len(ids) - len(cont) : len(ids)].float(), dim=-1)  # (contlen, vocab)
            target = torch.tensor(cont, device=logprobs.device)
            ll = float(logprobs.gather(1, target[:, None]).sum())
            out.append((j, (ll, bool((logprobs.argmax(dim=-1) == target).all()))))
    return out


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
    forward: Forward,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[Item],
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> list[ItemScore]:
    """Score every request of every item in one batched pass; per-item predictions."""
    flat = [req for item in items for req in item.requests]
    res = loglikelihood(forward, tokenizer, flat, batch_size, max_length, progress)
    scores, k = [], 0
    for item in items:
        part = res[k : k + len(item.requests)]
        k += len(item.requests)
        lls = tuple(ll for ll, _ in part)
        normed = [ll / max(choice_length(c), 1) for ll, c in zip(lls, item.choices)]
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
    out: dict[str, float | int] = {"acc": sum(s.pred == it.gold for s, it in zip(scores, items)) / n}
    if "acc_norm" in METRICS[name]:
        out["acc_norm"] = sum(s.pred_norm == it.gold for s, it in zip(scores, items)) / n
    out["n"] = n
    return out


def evaluate_tasks(
    forward: Forward,
    tokenizer: PreTrainedTokenizerBase,
    specs: Iterable[str | TaskSpec],
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float | int]]:
    """{task name: {"acc", ["acc_norm" | "ppl"], "n"}} for every SPEC, on its first `limit` items.

    `max_length` is the model's context (e.g. `stages.models.max_positions(model.config)`);
    None uses the tokenizer's, else 2048. Specs are all parsed before any scoring starts.
    """
    parsed = parse_task_specs(specs)
    results = {}
    for spec in parsed:
        items = load_task(spec, limit)
        scores = score_items(forward, tokenizer, items, batch_size, max_length, progress)
        results[spec.name] = task_metrics(spec.name, items, scores)
    return results
