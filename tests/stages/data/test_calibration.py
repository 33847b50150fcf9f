"""Tests for stages.data.calibration: windows equal the reference loop; Arrow round trip."""

import json
import logging
import os
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from stages.config import CalibConfig
from stages.data.calibration import (
    read_tokens,
    sample_calibration,
    tokenize,
    write_tokens,
)
from stages.data.specs import pydoc_text

DATA = Path(os.environ.get("SPARSEGPT_DATA_DIR", Path(__file__).parents[3].parent / "shared" / "data"))
WIKI_VALID = DATA / "wikitext2" / "wiki.valid.raw"
C4_JSONL = DATA / "c4" / "c4_validation_2k.jsonl"


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    """Word-level tokenizer over the 2,000 commonest pydoc words (no download)."""
    pre = pre_tokenizers.Whitespace()
    words = Counter(w for w, _ in pre.pre_tokenize_str(pydoc_text()))
    vocab = {"[UNK]": 0} | {w: i + 1 for i, (w, _) in enumerate(words.most_common(2000))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def reference_stream(
    tokenizer: PreTrainedTokenizerBase, text: str, nsamples: int, seqlen: int, seed: int
) -> np.ndarray:
    """The SparseGPT datautils loop for wikitext2/ptb, verbatim in spirit."""
    trainenc = tokenizer(text, return_tensors="pt")
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        out.append(trainenc.input_ids[:, i : i + seqlen])
    return torch.cat(out).numpy()


def reference_c4(
    tokenizer: PreTrainedTokenizerBase, docs: list[str], nsamples: int, seqlen: int, seed: int
) -> np.ndarray:
    """The SparseGPT datautils loop for c4 (document first, then a window inside it)."""
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            trainenc = tokenizer(docs[i], return_tensors="pt")
            if trainenc.input_ids.shape[1] > seqlen:
                break
        i = random.randint(0, trainenc.input_ids.shape[1] - seqlen - 1)
        out.append(trainenc.input_ids[:, i : i + seqlen])
    return torch.cat(out).numpy()


def test_pydoc_windows_match_reference(tokenizer: PreTrainedTokenizerBase) -> None:
    cfg = CalibConfig(spec="pydoc", nsamples=16, seqlen=64, seed=3)
    ids = sample_calibration(tokenizer, cfg)
    assert ids.shape == (16, 64) and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, reference_stream(tokenizer, pydoc_text(), 16, 64, 3))
    other = sample_calibration(tokenizer, CalibConfig(spec="pydoc", nsamples=16, seqlen=64, seed=4))
    assert not np.array_equal(ids, other)


@pytest.mark.skipif(not WIKI_VALID.is_file(), reason=f"no {WIKI_VALID}")
def test_wikitext_local_windows_match_reference(tokenizer: PreTrainedTokenizerBase) -> None:
    with open(WIKI_VALID, encoding="utf-8", newline="") as f:
        lines = f.read().split("\n")[:-1]
    text = " ".join(line + "\n" if line.strip() else "" for line in lines)
    cfg = CalibConfig(spec=f"wikitext2={WIKI_VALID}", nsamples=8, seqlen=128, seed=0)
    np.testing.assert_array_equal(sample_calibration(tokenizer, cfg), reference_stream(tokenizer, text, 8, 128, 0))


@pytest.mark.skipif(not C4_JSONL.is_file(), reason=f"no {C4_JSONL}")
def test_c4_local_windows_match_reference(tokenizer: PreTrainedTokenizerBase) -> None:
    docs = [json.loads(line)["text"] for line in C4_JSONL.read_text(encoding="utf-8").splitlines()]
    for seed in (0, 1):
        cfg = CalibConfig(spec=f"c4={C4_JSONL.with_suffix('.parquet')}", nsamples=8, seqlen=256, seed=seed)
        np.testing.assert_array_equal(sample_calibration(tokenizer, cfg), reference_c4(tokenizer, docs, 8, 256, seed))


def test_arrow_round_trip(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 50_000, size=(5, 17), dtype=np.int64)
    path = write_tokens(tmp_path / "calib" / "tokens.arrow", ids, metadata={"dataset": "pydoc"})
    back = read_tokens(path)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, ids)
    assert [p.name for p in path.parent.iterdir()] == ["tokens.arrow"]  # no tmp left behind

    import pyarrow as pa

    with pa.memory_map(str(path)) as src:
        schema = pa.ipc.open_file(src).schema
    assert schema.field("sample").type == pa.int32()
    assert schema.field("input_ids").type == pa.list_(pa.int32(), 17)
    assert schema.metadata[b"dataset"] == b"pydoc" and schema.metadata[b"seqlen"] == b"17"


def test_too_short_corpus(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "tiny.txt"
    path.write_text("def class return " * 10, encoding="utf-8")
    with pytest.raises(ValueError, match=r"tiny\.txt' has 30 tokens.*seqlen=64.*smaller seqlen"):
        sample_calibration(tokenizer, CalibConfig(spec=f"text={path}", nsamples=2, seqlen=64))


def test_c4_without_long_documents(tokenizer: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    path = tmp_path / "short.jsonl"
    path.write_text("\n".join(json.dumps({"text": "a b c"}) for _ in range(3)), encoding="utf-8")
    with pytest.raises(ValueError, match="no document .* more than seqlen=8"):
        sample_calibration(tokenizer, CalibConfig(spec=f"c4={path}", nsamples=1, seqlen=8))


@pytest.mark.parametrize("kwargs", [{"nsamples": 0}, {"seqlen": 1}, {"spec": "nope"}])
def test_bad_config(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        CalibConfig(**kwargs)


def test_long_sequence_warning_silenced(tokenizer: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture) -> None:
    before, tokenizer.model_max_length = tokenizer.model_max_length, 8
    try:
        with caplog.at_level(logging.WARNING):
            ids = tokenize(tokenizer, "def class return " * 10)
    finally:
        tokenizer.model_max_length = before
    assert ids.shape == (30,) and "longer than the specified maximum" not in caplog.text
