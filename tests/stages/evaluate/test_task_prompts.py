"""Every task file format builds lm-evaluation-harness's exact requests.

The expected strings are written out by hand from lm-eval's task definitions (its YAMLs and their
`utils.py`, checked at lm-evaluation-harness 4e7e0d47f, 2026-08-21): a multiple-choice request is
`(doc_to_text, " " + choice)` (the default `target_delimiter`), a loglikelihood request
`(doc_to_text, doc_to_target)`, WinoGrande's `(choice, " " + target)` (multiple input). Each format is
read from a file the way users pass it (`NAME=PATH`), so parsing and prompt building are both covered.
"""

import json
from pathlib import Path

from stages.evaluate.tasks.formats import _hub_arc_row, arc_item, read_items


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_lambada_openai(tmp_path: Path) -> None:
    # doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}", doc_to_target: "{{' '+text.split(' ')[-1]}}"
    path = _jsonl(tmp_path / "lambada_test.jsonl", [{"text": "he opened the  door and saw his dog"}])
    (item,) = read_items("lambada", path)
    assert item.requests == (("he opened the  door and saw his", " dog"),) and item.gold == 0


def test_piqa_with_its_labels_file(tmp_path: Path) -> None:
    # doc_to_text: "Question: {{goal}}\nAnswer:", doc_to_choice: "{{[sol1, sol2]}}", doc_to_target: label
    row = {"goal": "Keep bread fresh", "sol1": "Freeze it.", "sol2": "Wet it."}
    path = _jsonl(tmp_path / "valid.jsonl", [row])
    (tmp_path / "valid-labels.lst").write_text("0\n")
    (item,) = read_items("piqa", path)
    q = "Question: Keep bread fresh\nAnswer:"
    assert item.requests == ((q, " Freeze it."), (q, " Wet it.")) and item.gold == 0
    assert item.choices == ("Freeze it.", "Wet it.")


def test_arc_from_the_file_and_from_the_hub_row(tmp_path: Path) -> None:
    # doc_to_text: "Question: {{question}}\nAnswer:", doc_to_choice: "{{choices.text}}",
    # doc_to_target: "{{choices.label.index(answerKey)}}"
    choices = [{"text": "gravity", "label": "A"}, {"text": "magnetism", "label": "B"}, {"text": "heat", "label": "C"}]
    row = {"id": "x1", "question": {"stem": "What pulls apples down?", "choices": choices}, "answerKey": "A"}
    path = _jsonl(tmp_path / "ARC-Easy-Test.jsonl", [row])
    (item,) = read_items("arc_easy", path)
    q = "Question: What pulls apples down?\nAnswer:"
    assert item.requests == ((q, " gravity"), (q, " magnetism"), (q, " heat")) and item.gold == 0
    hub = {
        "id": "x1",
        "question": "What pulls apples down?",
        "choices": {"text": ["gravity", "magnetism", "heat"], "label": ["A", "B", "C"]},
        "answerKey": "A",
    }
    assert arc_item(_hub_arc_row(hub)) == item


def test_hellaswag_jsonl_and_llama_cpp_text(tmp_path: Path) -> None:
    # process_docs: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()),
    # choices = [preprocess(e) for e in endings]; preprocess: strip, " [title]" -> ". ", drop "[...]", "  " -> " "
    row = {
        "activity_label": "Baking cookies",
        "ctx_a": "A woman mixes dough [header] in a bowl.",
        "ctx_b": "she",
        "endings": ["puts it in the oven [title] Bake it.", " eats  the bowl.", "sings.", "leaves."],
        "label": "0",
    }
    (item,) = read_items("hellaswag", _jsonl(tmp_path / "hellaswag_val.jsonl", [row]))
    q = "Baking cookies: A woman mixes dough in a bowl. She"
    endings = ["puts it in the oven. Bake it.", "eats the bowl.", "sings.", "leaves."]
    assert item.requests == tuple((q, " " + e) for e in endings) and item.gold == 0
    # llama.cpp's 6-line form carries the joined query line (ctx_b's case as the file gives it)
    lines = ["Baking cookies: A woman mixes dough in a bowl. She", "2", *row["endings"]]
    text = tmp_path / "hellaswag_val_full.txt"
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    (item,) = read_items("hellaswag", text)
    assert item.requests == tuple((q, " " + e) for e in endings) and item.gold == 2


def test_winogrande_partial_scoring_with_its_labels_file(tmp_path: Path) -> None:
    # doc_to_choice: [sentence[:idx] + option for option in (option1, option2)],
    # doc_to_target: sentence[idx + 1:].strip(), doc_to_text: {"1": 0, "2": 1}[answer]
    row = {"sentence": "Sarah lent Maria a pen because _ had two.", "option1": "Sarah", "option2": "Maria"}
    path = _jsonl(tmp_path / "dev.jsonl", [row])
    (tmp_path / "dev-labels.lst").write_text("1\n")
    (item,) = read_items("winogrande", path)
    target = " had two."
    assert item.requests == (
        ("Sarah lent Maria a pen because Sarah", target),
        ("Sarah lent Maria a pen because Maria", target),
    )
    assert item.gold == 0


def test_storycloze_2016_csv(tmp_path: Path) -> None:
    # doc_to_text: "{{[input_sentence_1, ..., input_sentence_4]|join(' ')}}",
    # doc_to_choice: "{{[sentence_quiz1, sentence_quiz2]}}", doc_to_target: "{{answer_right_ending-1}}"
    header = "InputStoryid,InputSentence1,InputSentence2,InputSentence3,InputSentence4,"
    header += "RandomFifthSentenceQuiz1,RandomFifthSentenceQuiz2,AnswerRightEnding"
    row = "id1,Tom woke up.,He was late.,He ran.,He made the bus.,He was happy.,He cried.,1"
    path = tmp_path / "cloze_test_val__spring2016.csv"
    path.write_text("\ufeff" + header + "\n" + row + "\n", encoding="utf-8")
    (item,) = read_items("storycloze", path)
    ctx = "Tom woke up. He was late. He ran. He made the bus."
    assert item.requests == ((ctx, " He was happy."), (ctx, " He cried.")) and item.gold == 0
