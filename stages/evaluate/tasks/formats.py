"""Zero-shot task files to scoring items, with lm-evaluation-harness's prompt templates.

`read_items(name, path)` reads the standard evaluation file of one task and returns
its `Item`s: the (context, continuation) requests to score, the gold index and the
choice texts whose length `acc_norm` divides by. `hub_items(name)` does the same from
the standard Hugging Face hub dataset (needs internet). Task SPECs are parsed and
checked in `stages.data.tasks`. Templates are those of lm-eval's task YAMLs (v0.4): e.g.
PIQA `Question: {goal}\\nAnswer:` + " " + sol,
WinoGrande's partial scoring, HellaSwag's `preprocess`. Pure text: no torch here.
"""

import csv
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.data.tasks import FILE_HINTS, TASK_NAMES, TaskSpec, parse_task_spec, parse_task_specs  # noqa: F401

Row = dict[str, Any]


@dataclass(frozen=True)
class Item:
    """One evaluation document as lm-eval scores it."""

    requests: tuple[tuple[str, str], ...]
    """(context, continuation) pairs, one per choice; a single pair for LAMBADA."""
    gold: int
    """Index of the correct request (0 for LAMBADA, whose target is the only request)."""
    choices: tuple[str, ...]
    """Choice texts (without the target delimiter) whose length `acc_norm` divides by."""


def preprocess(text: str) -> str:
    """lm-eval's HellaSwag text cleaning: strip, ' [title]' -> '. ', drop '[...]', '  ' -> ' '."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _choice_item(context: str, choices: list[str], gold: int) -> Item:
    """A multiple-choice item whose choices follow one context after a ' ' delimiter."""
    if not 0 <= gold < len(choices):
        raise ValueError(f"gold index {gold} out of range for {len(choices)} choices: {choices!r}")
    return Item(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def lambada_item(row: Row) -> Item:
    """Context: text up to the last space; target: ' ' + last word (greedy acc and perplexity)."""
    words = row["text"].split(" ")
    if len(words) < 2:
        raise ValueError(f"LAMBADA text needs at least two words, got {row['text']!r}")
    target = words[-1]
    return Item(((" ".join(words[:-1]), " " + target),), 0, (target,))


def piqa_item(row: Row) -> Item:
    """`Question: {goal}\\nAnswer:` + ' ' + sol1 / sol2; gold from the label."""
    return _choice_item(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def arc_item(row: Row) -> Item:
    """`Question: {stem}\\nAnswer:` + ' ' + choice text; gold = position of answerKey among labels."""
    question = row["question"]
    labels = [c["label"] for c in question["choices"]]
    if row["answerKey"] not in labels:
        raise ValueError(f"ARC answerKey {row['answerKey']!r} is not one of the labels {labels} (id {row.get('id')})")
    texts = [c["text"] for c in question["choices"]]
    return _choice_item(f"Question: {question['stem']}\nAnswer:", texts, labels.index(row["answerKey"]))


def hellaswag_item(row: Row) -> Item:
    """preprocess(`activity_label: ctx_a ctx_b.capitalize()`) + ' ' + preprocess(ending).

    Rows of the 6-line text form carry the joined `query` line instead of ctx_a/ctx_b,
    so ctx_b keeps the case the file gives it (lower case in llama.cpp's file).
    """
    if "query" in row:
        query = row["query"]
    else:
        query = row["activity_label"] + ": " + row["ctx_a"] + " " + row["ctx_b"].capitalize()
    return _choice_item(preprocess(query), [preprocess(e) for e in row["endings"]], int(row["label"]))


def winogrande_item(row: Row) -> Item:
    """Partial scoring: context = sentence up to '_' with the option, continuation = ' ' + the rest."""
    sentence = row["sentence"]
    if "_" not in sentence:
        raise ValueError(f"WinoGrande sentence has no '_' blank: {sentence!r}")
    blank = sentence.index("_")
    options = [row["option1"], row["option2"]]
    target = " " + sentence[blank + 1 :].strip()
    gold = {"1": 0, "2": 1}.get(str(row["answer"]).strip())
    if gold is None:
        raise ValueError(f"WinoGrande answer must be '1' or '2', got {row['answer']!r}")
    contexts = [sentence[:blank] + opt for opt in options]
    return Item(tuple((c, target) for c in contexts), gold, tuple(contexts))


def boolq_item(row: Row) -> Item:
    """`{passage}\nQuestion: {question}?\nAnswer:` + ' no' / ' yes', lm-eval's `boolq` on SuperGLUE's copy,
    whose passage is `{title} -- {passage}`: Google's own files (separate `title`) are joined the same way."""
    answer = row["answer"] if "answer" in row else row["label"]
    if isinstance(answer, str):
        answer = {"true": 1, "false": 0}[answer.strip().lower()]
    passage, title = row["passage"], row.get("title")
    if title and not passage.startswith(f"{title} -- "):
        passage = f"{title} -- {passage}"
    return _choice_item(f"{passage}\nQuestion: {row['question']}?\nAnswer:", ["no", "yes"], int(answer))


def storycloze_item(row: Row) -> Item:
    """The four sentences joined with ' ' + ' ' + ending 1 / 2; gold = AnswerRightEnding - 1."""
    context = " ".join(row[f"InputSentence{i}"] for i in range(1, 5))
    endings = [row["RandomFifthSentenceQuiz1"], row["RandomFifthSentenceQuiz2"]]
    return _choice_item(context, endings, int(row["AnswerRightEnding"]) - 1)


BUILDERS: dict[str, Callable[[Row], Item]] = {
    "lambada": lambada_item,
    "piqa": piqa_item,
    "arc_easy": arc_item,
    "arc_challenge": arc_item,
    "hellaswag": hellaswag_item,
    "winogrande": winogrande_item,
    "boolq": boolq_item,
    "storycloze": storycloze_item,
}
"""Task name -> builder of one `Item` from one row of the standard file."""

assert tuple(BUILDERS) == TASK_NAMES


def labels_path(path: Path) -> Path:
    """The labels file beside a JSON-lines file: `valid.jsonl` -> `valid-labels.lst`."""
    return path.with_name(path.name.removesuffix(".jsonl") + "-labels.lst")


def _jsonl(path: Path) -> list[Row]:
    """Records of a JSON-lines file, blank lines skipped."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno} is not valid JSON ({e.msg}); expected one object a line") from e
    return rows


def _attach_labels(rows: list[Row], path: Path, key: str, required: bool) -> list[Row]:
    """Fill `key` of every row from the `-labels.lst` file beside `path` when rows lack it."""
    if all(str(r.get(key, "")).strip() for r in rows):
        return rows
    lst = labels_path(path)
    if not lst.is_file():
        if not required:
            return rows
        raise ValueError(
            f"{path} has no {key!r} in its rows and the labels file {lst} is missing; put it beside the data file"
        )
    labels = [line.strip() for line in lst.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) < len(rows):
        raise ValueError(f"{lst} has {len(labels)} labels for {len(rows)} rows of {path}")
    return [{**r, key: lab} for r, lab in zip(rows, labels, strict=True)]


def _hellaswag_text(path: Path) -> list[Row]:
    """llama.cpp's form: 6 lines an item (`activity_label: ctx`, gold index, 4 endings)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path} has {len(lines)} lines, not a multiple of 6: expected 6 lines an item")
    return [
        {"query": lines[i], "label": int(lines[i + 1]), "endings": lines[i + 2 : i + 6]}
        for i in range(0, len(lines), 6)
    ]


def read_rows(name: str, path: Path) -> list[Row]:
    """Raw rows of task `name`'s file at `path`, with labels attached where they live apart."""
    if name == "storycloze":
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f))
    if name == "hellaswag" and path.suffix != ".jsonl":
        return _hellaswag_text(path)
    rows = _jsonl(path)
    if name == "piqa":
        return _attach_labels(rows, path, "label", required=True)
    if name == "winogrande":
        return _attach_labels(rows, path, "answer", required=True)
    return rows


def read_items(name: str, path: Path, limit: int | None = None) -> list[Item]:
    """The first `limit` (all if None) items of task `name` from its standard file at `path`."""
    rows = read_rows(name, path)[:limit]
    items = []
    for i, row in enumerate(rows):
        try:
            items.append(BUILDERS[name](row))
        except (KeyError, TypeError, ValueError) as e:
            why = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(
                f"row {i} of {path} does not look like {name}'s format ({why}); expected {FILE_HINTS[name]}"
            ) from e
    return items


HUB = {
    "lambada": ("EleutherAI/lambada_openai", "default", "test"),
    "piqa": ("baber/piqa", None, "validation"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy", "test"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", "test"),
    "hellaswag": ("Rowan/hellaswag", None, "validation"),
    "winogrande": ("allenai/winogrande", "winogrande_xl", "validation"),
    "boolq": ("aps/super_glue", "boolq", "validation"),
}
"""Task name -> (hub dataset, config, split) lm-eval uses; StoryCloze is not on the hub."""


def _hub_arc_row(row: Row) -> Row:
    """The hub's flat ARC row in the file's nested form."""
    choices = [
        {"text": t, "label": lab} for t, lab in zip(row["choices"]["text"], row["choices"]["label"], strict=True)
    ]
    return {"id": row["id"], "question": {"stem": row["question"], "choices": choices}, "answerKey": row["answerKey"]}


def hub_items(name: str, limit: int | None = None) -> list[Item]:
    """Items of task `name` from the Hugging Face hub (needs internet)."""
    if name not in HUB:
        raise ValueError(f"{name} has no hub copy; download it and pass {name}=PATH ({FILE_HINTS[name]})")
    from datasets import load_dataset

    repo, config, split = HUB[name]
    ds = load_dataset(repo, config, split=split)
    rows = ds.select(range(min(limit, len(ds)))) if limit is not None else ds
    convert = _hub_arc_row if name.startswith("arc_") else dict
    return [BUILDERS[name](convert(row)) for row in rows]
