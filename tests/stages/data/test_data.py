"""Tests for stages.data.specs: SPEC parsing, corpus recipes and their errors."""

import json
import os
from pathlib import Path

import pytest

from stages.data.specs import DatasetSpec, load_corpus, parse_spec, pydoc_text, wikitext_rows

DATA = Path(os.environ.get("SPARSEGPT_DATA_DIR", Path(__file__).parents[3].parent / "shared" / "data"))
WIKI = DATA / "wikitext2"
C4 = DATA / "c4"
needs_wiki = pytest.mark.skipif(not (WIKI / "wiki.test.raw").is_file(), reason=f"no WikiText-2 under {WIKI}")
needs_c4 = pytest.mark.skipif(not (C4 / "c4_validation_2k.jsonl").is_file(), reason=f"no C4 sample under {C4}")


@needs_wiki
@pytest.mark.parametrize(("name", "chars"), [("wiki.test.raw", 1_294_336), ("wiki.valid.raw", 1_149_668)])
def test_wikitext_local_recovers_hf_rows(name: str, chars: int) -> None:
    corpus = load_corpus(f"wikitext2={WIKI / name}", "evaluation")
    assert corpus.join == "\n\n" and corpus.label == "wikitext2"
    assert len(corpus.text) == chars
    calib = load_corpus(f"wikitext2={WIKI / name}", "calibration")
    assert calib.text == " ".join(wikitext_rows(WIKI / name))


@needs_c4
def test_c4_local_jsonl_and_parquet_agree() -> None:
    jsonl = load_corpus(f"c4={C4 / 'c4_validation_2k.jsonl'}", "calibration")
    parquet = load_corpus(f"c4={C4 / 'c4_validation_2k.parquet'}", "calibration")
    assert jsonl.rows == parquet.rows and len(jsonl.rows) == 2000 and jsonl.documents
    evaluation = load_corpus(f"c4={C4 / 'c4_validation_2k.parquet'}", "evaluation")
    assert evaluation.rows == jsonl.rows[:1100] and evaluation.max_tokens_per_seqlen == 256
    assert evaluation.text == " ".join(jsonl.rows[:1100])


def test_pydoc_embedded() -> None:
    from pydoc_data.topics import topics

    corpus = load_corpus("pydoc", "calibration")
    assert corpus.text == "\n\n".join(topics[k] for k in sorted(topics)) == pydoc_text()
    assert len(corpus.text) > 100_000 and parse_spec("pydoc").label == "pydoc"


def test_generic_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello world\n", encoding="utf-8")
    (tmp_path / "docs.jsonl").write_text(
        "\n".join(json.dumps({"body": f"doc {i}", "text": "x"}) for i in range(3)) + "\n",
        encoding="utf-8",
    )
    text = load_corpus(f"text={tmp_path / 'notes.txt'}", "evaluation")
    assert text.text == "hello world\n" and text.label == "notes"
    spec = parse_spec(f"jsonl={tmp_path / 'docs.jsonl'}:body")
    assert spec == DatasetSpec(name="jsonl", path=tmp_path / "docs.jsonl", field="body")
    assert str(spec) == f"jsonl={tmp_path / 'docs.jsonl'}:body"
    assert load_corpus(spec, "calibration").text == "doc 0\n\ndoc 1\n\ndoc 2"
    assert parse_spec(f"jsonl={tmp_path / 'docs.jsonl'}").field == "text"


def test_ptb_local_text(tmp_path: Path) -> None:
    path = tmp_path / "ptb.valid.txt"
    path.write_text(" a b c \n d e \n", encoding="utf-8")
    assert load_corpus(f"ptb={path}", "evaluation").text == "a b c d e"


def test_hub_spec_parses_without_loading() -> None:
    spec = parse_spec(" WikiText2 ")
    assert spec == DatasetSpec(name="wikitext2") and spec.format == "hub" and str(spec) == "wikitext2"


@pytest.mark.parametrize(
    ("spec", "needles"),
    [
        ("wikitext3", ["unknown dataset 'wikitext3'", "wikitext2, ptb, c4", "pydoc"]),
        ("text", ["needs a file", "text=PATH"]),
        ("pydoc=/x", ["takes no path"]),
        (
            "wikitext2=/nonexistent/wiki.test.raw",
            ["not found", "/nonexistent/wiki.test.raw", "wikitext2=/path"],
        ),
    ],
)
def test_bad_specs(spec: str, needles: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        parse_spec(spec)
    for needle in needles:
        assert needle in str(err.value)


def test_bad_field(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a", "url": "u"}) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"field 'body' not found .*\['text', 'url'\].*:FIELD"):
        parse_spec(f"jsonl={path}:body")


def test_c4_needs_json_or_parquet(tmp_path: Path) -> None:
    path = tmp_path / "c4.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match="JSON lines"):
        parse_spec(f"c4={path}")


def test_hub_failure_suggests_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("no internet")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match=r"could not load 'ptb'.*no internet.*ptb=PATH"):
        load_corpus("ptb", "evaluation")


def test_field_on_text_file(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_text("x\n", encoding="utf-8")
    with pytest.raises(ValueError, match="field applies only to JSON lines / Parquet.*drop the :body"):
        parse_spec(f"wikitext2={path}:body")
