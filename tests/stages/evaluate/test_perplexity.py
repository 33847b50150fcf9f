"""Tests for stages.evaluate.perplexity: windows and ppl against a slow per-window reference."""

import json
import math
import os
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from stages.data.specs import pydoc_text
from stages.evaluate.perplexity import (
    causal_lm_forward,
    eval_windows,
    evaluate_perplexity,
    perplexity,
    window_losses,
)

DATA = Path(os.environ.get("SPARSEGPT_DATA_DIR", Path(__file__).parents[3].parent / "shared" / "data"))
C4_JSONL = DATA / "c4" / "c4_validation_2k.jsonl"
VOCAB = 300


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer over the commonest pydoc words, ids < VOCAB (no download)."""
    pre = pre_tokenizers.Whitespace()
    words = Counter(w for w, _ in pre.pre_tokenize_str(pydoc_text()))
    vocab = {"[UNK]": 0} | {w: i + 1 for i, (w, _) in enumerate(words.most_common(VOCAB - 1))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="session")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def slow_ppl(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """The reference eval loop: one window at a time, HF loss * seqlen, summed."""
    nwin, seqlen = windows.shape
    nlls = []
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits
            shift_logits = logits[:, :-1, :].float()
            loss = torch.nn.CrossEntropyLoss()(shift_logits.reshape(-1, VOCAB), w[None, 1:].reshape(-1))
            nlls.append(loss * seqlen)
    return math.exp(float(torch.stack(nlls).sum()) / (nwin * seqlen))


def test_ppl_matches_slow_loop_and_batching(model: LlamaForCausalLM) -> None:
    windows = torch.randint(0, VOCAB, (7, 24), generator=torch.Generator().manual_seed(1))
    expected = slow_ppl(model, windows)
    forward = causal_lm_forward(model)
    results = [perplexity(forward, windows, batch_size=b, progress=(b == 3)) for b in (1, 3, 7)]
    for result in results:
        assert result.windows == 7 and result.seqlen == 24
        assert result.ppl == pytest.approx(expected, rel=1e-5)
    assert results[0].to_dict() == {"ppl": results[0].ppl, "windows": 7, "seqlen": 24}
    # HF's own loss agrees, and ppl is exp(mean window loss)
    with torch.no_grad():
        hf = torch.stack([model(w[None], labels=w[None]).loss for w in windows])
    assert results[0].ppl == pytest.approx(math.exp(float(hf.mean())), rel=1e-5)


def test_window_losses_fp32_for_half_logits() -> None:
    logits = torch.randn(2, 5, 11).to(torch.bfloat16)
    ids = torch.randint(0, 11, (2, 5))
    losses = window_losses(logits, ids)
    assert losses.dtype == torch.float32 and losses.shape == (2,)


def test_eval_windows_pydoc(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = tokenizer(pydoc_text(), return_tensors="pt").input_ids[0]
    windows = eval_windows(tokenizer, "pydoc", seqlen=50)
    nwin = ids.shape[0] // 50
    assert windows.shape == (nwin, 50) and windows.dtype == torch.int64
    assert torch.equal(windows.reshape(-1), ids[: nwin * 50])
    assert torch.equal(eval_windows(tokenizer, "pydoc", seqlen=50, max_windows=3), windows[:3])


@pytest.mark.skipif(not C4_JSONL.is_file(), reason=f"no {C4_JSONL}")
def test_eval_windows_c4_cut(tokenizer: PreTrainedTokenizerBase) -> None:
    docs = [json.loads(line)["text"] for line in C4_JSONL.read_text(encoding="utf-8").splitlines()]
    ids = tokenizer(" ".join(docs[:1100]), return_tensors="pt").input_ids[0][: 256 * 16]
    windows = eval_windows(tokenizer, f"c4={C4_JSONL}", seqlen=16)
    assert windows.shape == (256, 16) and torch.equal(windows.reshape(-1), ids)


def test_evaluate_perplexity_end_to_end(tokenizer: PreTrainedTokenizerBase, model: LlamaForCausalLM) -> None:
    result = evaluate_perplexity(causal_lm_forward(model), tokenizer, "pydoc", seqlen=32, batch_size=4, max_windows=6)
    windows = eval_windows(tokenizer, "pydoc", seqlen=32, max_windows=6)
    assert result.windows == 6 and result.ppl == pytest.approx(slow_ppl(model, windows), rel=1e-5)


def test_errors(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("def class", encoding="utf-8")
    with pytest.raises(ValueError, match=r"has 2 tokens, fewer than one window of seqlen=8.*smaller seqlen"):
        eval_windows(tokenizer, f"text={path}", seqlen=8)
    with pytest.raises(ValueError, match=r"logits of shape .*causal_lm_forward"):
        perplexity(lambda ids: ids.float(), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="non-empty"):
        perplexity(lambda ids: ids, torch.zeros(0, 4, dtype=torch.int64))
