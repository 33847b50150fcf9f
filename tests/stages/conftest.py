"""A pruned and evaluated tiny run shared by the evaluation and report tests (built once per session)."""

from pathlib import Path

import pytest
import torch

from stages.evaluate.evaluate import evaluate_run
from stages.prune.oneshot import block_records, run_pipeline
from tests.configs import tiny_prune
from tests.samples import TASK_SAMPLES, task_spec


@pytest.fixture(scope="session")
def evaluated_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """(cfg, run, metrics, progress calls): tiny Llama, SparseGPT 50% with OWL, pydoc perplexity, two tasks."""
    if not TASK_SAMPLES.is_dir():
        pytest.skip(f"task samples not found at {TASK_SAMPLES}")
    run_dir = tmp_path_factory.mktemp("evaluated") / "run"
    tasks = (task_spec("boolq"), task_spec("arc_easy"))
    cfg = tiny_prune(
        tiny_llama_dir,
        run_dir,
        batch_size=4,
        owl=True,
        owl_lambda=0.1,
        eval=("pydoc",),
        eval_windows=2,
        tasks=tasks,
        task_limit=3,
        eval_batch_size=3,
    )
    run = run_pipeline(cfg)
    calls: list[tuple[int, int, str]] = []
    metrics = evaluate_run(
        cfg, run, torch.float32, block_records(run), {"prune": 1.0}, progress=lambda *a: calls.append(a)
    )
    return cfg, run, metrics, calls
