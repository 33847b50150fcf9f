"""`prune --nproc 2` as a Prefect flow: one launcher task spawns the ranks, the progress artifact reaches the
last block, and the run evaluates like any other."""

from __future__ import annotations

import json

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.artifacts import artifact_key
from flows.oneshot import oneshot
from tests.configs import tiny_prune


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
