"""Task SPECs: which zero-shot task, from which file (or the hub copy), checked early.

A task SPEC is `NAME=PATH` (the task's standard evaluation file) or a bare `NAME` (the
copy on the Hugging Face hub that lm-evaluation-harness uses). This module only parses
and checks them, so the config can validate a run before any work; reading the files
into items lives in `stages.evaluate.tasks.formats`.
"""

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TASK_NAMES = ("lambada", "piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "boolq", "storycloze")
"""Every supported task name."""

FILE_HINTS = {
    "lambada": "lambada_test.jsonl (OpenAI version)",
    "piqa": "valid.jsonl (with valid-labels.lst beside it)",
    "arc_easy": "ARC-Easy-Test.jsonl",
    "arc_challenge": "ARC-Challenge-Test.jsonl",
    "hellaswag": "hellaswag_val.jsonl or llama.cpp's 6-lines-per-item hellaswag_val_full.txt",
    "winogrande": "dev.jsonl (dev-labels.lst beside it if answers are absent)",
    "boolq": "dev.jsonl",
    "storycloze": "cloze_test_val__spring2016 - cloze_test_ALL_val.csv",
}
"""Task name -> the standard file a user points NAME=PATH at."""


@dataclass(frozen=True)
class TaskSpec:
    """A parsed task SPEC: which task, from which file."""

    name: str
    """Task name, one of `TASK_NAMES`."""
    path: Path | None = None
    """The task's standard evaluation file; None to load the hub copy."""

    def __post_init__(self) -> None:
        if self.name not in TASK_NAMES:
            raise ValueError(f"unknown task {self.name!r}; choose one of {', '.join(TASK_NAMES)}")
        if self.path is not None and not Path(self.path).is_file():
            raise ValueError(
                f"task file for {self.name} not found: {self.path}; pass {self.name}=PATH to {FILE_HINTS[self.name]}"
            )


def parse_task_spec(spec: str | TaskSpec) -> TaskSpec:
    """`NAME=PATH` or `NAME` -> `TaskSpec`, checking the name and that the file exists."""
    if isinstance(spec, TaskSpec):
        return spec
    name, sep, path = spec.partition("=")
    name = name.strip().lower()
    if sep and not path.strip():
        raise ValueError(f"task spec {spec!r} has an empty PATH; use NAME=PATH or NAME (hub)")
    return TaskSpec(name, Path(path.strip()).expanduser() if sep else None)


def parse_task_specs(specs: Iterable[str | TaskSpec]) -> list[TaskSpec]:
    """Every SPEC parsed, refusing a task named twice (results are keyed by task name)."""
    parsed = [parse_task_spec(s) for s in specs]
    names = [s.name for s in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"task names must be unique, got {names}")
    return parsed
