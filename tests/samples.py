"""Where tests find the zero-shot task sample files (../shared/data/task-samples beside the repository)."""

import os
from pathlib import Path

import pytest

TASK_SAMPLES = (
    Path(os.environ.get("SPARSEGPT_DATA_DIR", Path(__file__).parents[1].parent / "shared" / "data")) / "task-samples"
)
TASK_FILES = {"boolq": "boolq_dev.jsonl", "arc_easy": "ARC-Easy-Dev.jsonl", "lambada": "lambada_test.jsonl"}
needs_task_samples = pytest.mark.skipif(not TASK_SAMPLES.is_dir(), reason=f"task samples not found at {TASK_SAMPLES}")


def task_spec(name: str) -> str:
    """``NAME=PATH`` of a sample file (tasks whose continuations fit the tiny models' 64 positions)."""
    return f"{name}={TASK_SAMPLES / TASK_FILES[name]}"
