"""`prune --nproc 2` as a Prefect flow: one launcher task spawns the ranks, the progress artifact reaches the
last block, and the run evaluates like any other; and ranks started by torchrun around the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.settings import PREFECT_API_URL

from flows.artifacts import artifact_key
from flows.oneshot import oneshot
from stages.prune.oneshot import run_pipeline
from tests.configs import tiny_prune
from tests.stages.prune.test_parallel import assert_close_runs

REPO = Path(__file__).resolve().parents[2]


def test_the_flow_prunes_on_two_ranks_in_one_launcher_task(tiny_llama_dir, tmp_path):
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "run", nsamples=32, nproc=2, eval=("pydoc",), eval_windows=2)
    state = oneshot(cfg, return_state=True)
    assert state.is_completed(), state.message
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        names = {
            r.name.rsplit("-", 1)[0]
            for r in client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        }
        progress = client.read_latest_artifacts()
    assert "prune-blocks-ranks" in names and not any(n.startswith("prune-block-0") for n in names)
    key = artifact_key(cfg.run_dir)
    assert any(a.key == key and a.data == 100.0 for a in progress)
    metrics = json.loads((tmp_path / "run" / "eval" / "metrics.json").read_text())
    assert abs(metrics["sparsity"]["overall"] - 0.5) < 0.01 and metrics["pydoc"]["ppl"] > 0
    assert all('"ranks": 2' in (tmp_path / "run" / "blocks" / f"block_{i:03d}.json").read_text() for i in range(3))


def test_torchrun_ranks_prune_through_the_cli(tiny_llama_dir, tmp_path):
    """`torchrun -m flows.cli prune ...`: rank 0 runs the flow (checks, calibration, capture, evaluation), the
    other rank joins it for the blocks only; the weights match one process's."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "flows.cli"]
    cmd += ["prune", str(tiny_llama_dir), "--run-dir", str(run_dir), "--calib", "pydoc", "--nsamples", "32"]
    cmd += ["--seqlen", "32", "--blocksize", "16", "--no-progress", "--no-cache"]
    cmd += ["--eval", "pydoc", "--eval-windows", "2"]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert all('"ranks": 2' in (run_dir / "blocks" / f"block_{i:03d}.json").read_text() for i in range(3))
    assert (run_dir / "eval" / "metrics.json").is_file()
    ref = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "ref", nsamples=32, cache=False))
    assert_close_runs(ref.root, run_dir)


def test_progressive_under_torchrun_is_refused_with_the_fix(tiny_llama_dir, tmp_path):
    """Every torchrun process would run every round: the CLI refuses it in one line, exit 2, nothing written."""
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "PYTHONPATH": str(REPO)}
    run_dir = tmp_path / "p"
    cmd = [sys.executable, "-m", "flows.cli", "progressive", str(tiny_llama_dir), "--run-dir", str(run_dir)]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "give --nproc N for N local ranks" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not run_dir.exists()
