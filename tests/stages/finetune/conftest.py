"""Shared by the fine-tuning tests: a small repetitive text corpus."""

import pytest

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen jugs.\n" * 60


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A `text=PATH` SPEC of a small repetitive corpus (~4.8k characters)."""
    path = tmp_path_factory.mktemp("corpus") / "train.txt"
    path.write_text(TEXT, encoding="utf-8")
    return f"text={path}"
