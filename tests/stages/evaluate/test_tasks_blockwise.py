"""Zero-shot scoring block by block (`stages.evaluate.tasks.blockwise`): the same scores as the whole
model scored one request at a time, on Llama, GPT-2 and OPT, in one group of passes or many; a model
whose probe fails is scored on plain rows; no whole model is ever built."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import stages.evaluate.tasks.blockwise as blockwise
from stages.evaluate.tasks.blockwise import Blockwise
from stages.evaluate.tasks.zeroshot import score_items
from tests.stages.evaluate.test_tasks_scoring import check_scores, designed_items, reference


@pytest.mark.device
@pytest.mark.parametrize("kind", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("max_bytes", [1 << 30, 1], ids=["one-group", "a-group-per-pass"])
def test_blockwise_scores_equal_one_request_at_a_time(tiny_model_factory, monkeypatch, kind, max_bytes, device) -> None:
    folder = tiny_model_factory(kind)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    items = designed_items()
    walks = []
    real_walk = blockwise._walk
    monkeypatch.setattr(blockwise, "_walk", lambda m, t, ps, *a: (walks.append(len(ps)), real_walk(m, t, ps, *a))[1])
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # never the whole model
    scores = score_items(Blockwise(folder, device=device, max_bytes=max_bytes), tok, items, batch_size=1, max_length=24)
    monkeypatch.undo()
    check_scores(scores, reference(model, tok, items, 24), items, tok)
    if max_bytes == 1:  # every pass walks the blocks alone (the first with the probe's passes)
        assert len(walks) > 3 and all(n == 1 for n in walks[1:])
    else:
        assert len(walks) == 1


def test_a_failed_probe_scores_plain_rows(tiny_llama_dir, monkeypatch) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    items = designed_items()
    monkeypatch.setattr(blockwise, "probe_agrees", lambda want, got, dtype: False)
    plain = []
    real_plain = blockwise._plain
    monkeypatch.setattr(blockwise, "_plain", lambda *a: (plain.append(len(a[2])), real_plain(*a))[1])
    scores = score_items(Blockwise(tiny_llama_dir), tok, items, batch_size=4, max_length=60)
    assert plain and plain[0] >= 1
    check_scores(scores, reference(model, tok, items, 60), items, tok)
