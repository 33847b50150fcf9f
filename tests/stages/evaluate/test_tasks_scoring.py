"""Token tries of `stages.evaluate.tasks.scoring`: the trie and its packing into batch rows; tries
score like one request at a time on Llama, GPT-2 and OPT, with SDPA and eager attention,
several items sharing a batch row; a model that ignores position ids or custom masks
fails the probe, and one with sliding-window attention is not tried: both run full rows."""

import weakref
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.evaluate.tasks.scoring
from stages.evaluate.tasks.formats import Item
from stages.evaluate.tasks.scoring import _full_attention_only, _Row, _Tree, tree_batches
from stages.evaluate.tasks.zeroshot import encode_pair, score_items
from tests.numerics import assert_sums_close
from tests.stages.evaluate.test_tasks import argmax, cont_tokens, reference_loglik

# Requests of one item each: a long shared context, a shared prefix reaching into the
# continuations (" the mat" / " the man"), a prefix equal to a whole input row (" d" is the
# start of " d e"), one-token continuations sharing an input row, no shared prefix at all
# (WinoGrande-like contexts that differ from the first token), a lone request, and a
# duplicate item; "long" contexts are cut to max_length from the left.
DESIGNED = [
    [
        ("The cat sat on", " the mat"),
        ("The cat sat on", " the man"),
        ("The cat sat on", " a hat"),
        ("The cat sat on", " it"),
    ],
    [("abc", " d"), ("abc", " d e"), ("abc", " d e f g")],
    [("Is it? Answer:", " no"), ("Is it? Answer:", " yes"), ("Is it? Answer:", " y")],
    [("Xavier lent Bob", " a pen."), ("Bob lent Xavier", " a pen.")],
    [("q", " r")],
    [
        ("The cat sat on", " the mat"),
        ("The cat sat on", " the man"),
        ("The cat sat on", " a hat"),
        ("The cat sat on", " it"),
    ],
    [("long " * 20 + "story", " ends"), ("long " * 20 + "story", " ends well")],
    [("long " * 19 + "tale, " + "x" * 30, " and"), ("long " * 19 + "tale, " + "x" * 30, " or not")],
]


def counted(model) -> tuple[dict, list]:
    """{"tokens", "rows", "logits"}: input tokens and batch rows of every forward of `model`, rows its head projects."""
    stats = {"tokens": 0, "rows": 0, "logits": 0}

    def count_tokens(module, args, kwargs):
        stats["tokens"] += kwargs["input_ids"].numel()
        stats["rows"] += kwargs["input_ids"].shape[0]

    def count_logits(module, args):
        stats["logits"] += args[0].numel() // args[0].shape[-1]

    return stats, [
        model.register_forward_pre_hook(count_tokens, with_kwargs=True),
        model.get_output_embeddings().register_forward_pre_hook(count_logits),
    ]


def designed_items() -> list[Item]:
    return [Item(tuple(reqs), 0, tuple(c for _, c in reqs)) for reqs in DESIGNED]


def reference(model, tok, items: list[Item], max_length: int) -> list[tuple[float, bool]]:
    """(loglik, greedy) of every request, one at a time (`reference_loglik`)."""
    return [reference_loglik(model, tok, c, x, max_length) for item in items for c, x in item.requests]


def check_scores(scores: list, ref: list[tuple[float, bool]], items: list[Item], tok) -> None:
    """Item scores == the reference: log-likelihoods (within a tolerance per token), greedy flags, predictions."""
    n = cont_tokens(tok, [r for item in items for r in item.requests])
    assert_sums_close([ll for s in scores for ll in s.lls], [ll for ll, _ in ref], n, atol=1e-4)
    assert [g for s in scores for g in s.greedy] == [g for _, g in ref]
    k = 0
    for s, item in zip(scores, items, strict=True):
        lls = [ll for ll, _ in ref[k : k + len(item.requests)]]
        k += len(item.requests)
        assert (s.pred, s.pred_norm) == (
            argmax(lls),
            argmax([ll / len(c) for ll, c in zip(lls, item.choices, strict=True)]),
        )


def check_against_reference(model, tok, max_length: int, batch_size: int) -> None:
    items = designed_items()
    check_scores(
        score_items(model, tok, items, batch_size, max_length), reference(model, tok, items, max_length), items, tok
    )


def test_trie_holds_each_prefix_once() -> None:
    rows = [_Row((1, 2, 3, 4), 0), _Row((1, 2, 5), 0), _Row((1, 2, 3), 0), _Row((7,), 0)]
    tree = _Tree.of(rows)
    assert tree.ids == [1, 2, 3, 4, 5, 7]  # parents before children
    assert tree.paths == [[0, 1, 2, 3], [0, 1, 4], [0, 1, 2], [5]]
    assert not tree.chain and not _Tree.of(rows[:2]).chain
    assert _Tree.of(rows[:1]).chain and _Tree.of([rows[0], rows[2]]).chain  # a row and its prefix


def test_tries_pack_first_fit_into_lines_of_the_longest() -> None:
    sizes = {"a": 10, "b": 6, "c": 4, "d": 3, "e": 3}
    rows = [_Row(tuple(range(100 * k, 100 * k + n)), g) for k, (g, n) in enumerate(sizes.items())]
    rows.append(_Row((0, 1, 2, 3, 50), "a"))  # branches off a's trie: one more node

    def lines(batches):
        return [[[len(t.ids) for t in line] for line in batch] for batch in batches]

    assert lines(tree_batches(rows, True, 8)) == [[[11], [6, 4], [3, 3]]]  # 24 + 3 x 11 tokens
    assert lines(tree_batches(rows, True, 2)) == [[[11], [6, 4]], [[3, 3]]]
    assert lines(tree_batches(rows, False, 8)) == [[[10], [6], [5], [4], [3], [3]]]  # every row alone: 24 + 6 x 10
    assert tree_batches([], True, 8) == []


@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("max_length", [60, 24])
def test_tries_equal_one_request_at_a_time(tiny_model_factory, kind: str, max_length: int) -> None:
    folder = tiny_model_factory(kind)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    runner = stages.evaluate.tasks.scoring._ModelRunner(model)
    assert runner.shares_prefixes and runner.keep_kw  # token tries and logits_to_keep pass the probe
    items = designed_items()
    reqs = [r for item in items for r in item.requests]
    ref = reference(model, tok, items, max_length)
    stats, hooks = counted(model)
    for batch_size in (1, 3, 16):
        stats.update(tokens=0, rows=0, logits=0)
        check_scores(score_items(model, tok, items, batch_size, max_length), ref, items, tok)
        # less than one full row per request runs, and the head projects only continuation positions
        full = sum(min(len(c + x), max_length + 1) - 1 for c, x in reqs)  # one char per token
        assert stats["tokens"] < 0.7 * full  # the probe ran above, once per model
        assert stats["logits"] <= sum(len(x) for _, x in reqs)
        assert stats["rows"] < len(items)  # some batch rows hold several items' tries
    for h in hooks:
        h.remove()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_eager_attention_takes_the_tree_mask(tiny_model_factory, kind: str) -> None:
    folder = tiny_model_factory(kind)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    assert stages.evaluate.tasks.scoring._ModelRunner(model).shares_prefixes
    check_against_reference(model, AutoTokenizer.from_pretrained(folder), 60, 16)


class Ignoring(torch.nn.Module):
    """A causal LM that drops one keyword (`position_ids` or `attention_mask`) on its way to the real model."""

    def __init__(self, model: torch.nn.Module, dropped: str):
        super().__init__()
        self.model, self.config, self.dropped = model, model.config, dropped

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False, logits_to_keep=0):
        kwargs = {"attention_mask": attention_mask, "position_ids": position_ids}
        kwargs.pop(self.dropped)
        return self.model(input_ids=input_ids, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)

    def get_output_embeddings(self):
        return self.model.get_output_embeddings()


@pytest.mark.parametrize("dropped", ["position_ids", "attention_mask"])
def test_a_model_ignoring_positions_or_masks_runs_full_rows(tiny_llama_dir, dropped: str) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with (
        torch.no_grad()
    ):  # a random tiny model barely depends on positions; larger weights make it, as a trained one does
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(3.0)
    assert stages.evaluate.tasks.scoring._ModelRunner(model).shares_prefixes
    ignoring = Ignoring(model, dropped)
    runner = stages.evaluate.tasks.scoring._ModelRunner(ignoring)
    assert not runner.shares_prefixes and runner.keep_kw  # the probe sees the tries score wrong
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = designed_items()
    ref = reference(model, tok, items, 60)
    stats, hooks = counted(model)
    check_scores(score_items(ignoring, tok, items, 4, 60), ref, items, tok)
    for h in hooks:
        h.remove()
    wholes = [ctx + cont for item in items for ctx, cont in (encode_pair(tok, c, x) for c, x in item.requests)]
    assert stats["rows"] == len({tuple(w[-61:-1]) for w in wholes})  # one full row per distinct input


def test_sliding_window_models_run_full_rows(tiny_llama_dir) -> None:
    """A custom mask would lift a sliding window or attention chunks, so such models are not tried."""
    assert _full_attention_only(SimpleNamespace(sliding_window=None))
    assert _full_attention_only(SimpleNamespace(sliding_window=4096, use_sliding_window=False))  # Qwen2's switch
    assert not _full_attention_only(SimpleNamespace(sliding_window=4096))
    assert not _full_attention_only(SimpleNamespace(layer_types=["full_attention", "sliding_attention"]))
    assert not _full_attention_only(SimpleNamespace(attention_chunk_size=8192))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    model.config.sliding_window = 8  # Llama itself ignores it
    runner = stages.evaluate.tasks.scoring._ModelRunner(model)
    assert not runner.shares_prefixes and runner.keep_kw
    check_against_reference(model, AutoTokenizer.from_pretrained(tiny_llama_dir), 60, 4)


def test_probe_failures_run_whole_rows_with_full_logits(tiny_llama_dir, monkeypatch) -> None:
    """A model failing the probe (here: forced) is scored one full row per input, with full logits."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    monkeypatch.setattr(stages.evaluate.tasks.scoring, "_PROBED", weakref.WeakKeyDictionary())
    monkeypatch.setattr(stages.evaluate.tasks.scoring._ModelRunner, "_agrees", lambda self, shares_prefixes: False)
    runner = stages.evaluate.tasks.scoring._ModelRunner(model)
    assert not runner.shares_prefixes and not runner.keep_kw
    check_against_reference(model, AutoTokenizer.from_pretrained(tiny_llama_dir), 60, 4)
