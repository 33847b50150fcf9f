"""The progressive flow on a tiny Llama, called directly and as a scheduled deployment run by a real worker.

The deployment test uses the session's temporary Prefect server (a real API server in
a subprocess) through the `prefect` CLI: `prefect deploy` reads prefect.yaml, then each
`prefect deployment run` is picked up by `prefect worker start --run-once`, which runs
the flow in a fresh process like any deployment run. Two runs advance one round each;
the third finds the schedule complete and says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, LogFilter
from prefect.settings import PREFECT_API_URL

from flows import artifacts
from flows.artifacts import artifact_key
from flows.progressive import progressive
from stages.progressive.rounds import ProgressiveConfig, RoundPaths
from stages.run.rundir import verify_record

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(model_dir: Path, run_dir: Path, **kw) -> ProgressiveConfig:
    base = dict(
        model=str(model_dir),
        run_dir=str(run_dir),
        schedule=(0.4, 0.6),
        calib="pydoc",
        nsamples=4,
        seqlen=32,
        blocksize=16,
        batch_size=4,
        finetune_data="pydoc",
        tokens_per_round=2 * 2 * 32,
        micro_batch_size=2,
        checkpoint_every=1,
        rounds_per_run=1,
        eval=("pydoc",),
        eval_windows=2,
        progress=False,
    )
    return ProgressiveConfig.of(**{**base, **kw})


def test_flow_advances_one_round_per_run_and_publishes_the_curve(tiny_llama_dir, tmp_path, monkeypatch):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "p", export="hf")
    out = tmp_path / "p" / "export-hf"
    sent: list[float] = []
    real_update = artifacts.update_progress_artifact
    monkeypatch.setattr(
        artifacts,
        "update_progress_artifact",
        lambda aid, progress, description=None: (
            (description or "").startswith("round ") and sent.append(progress),  # the rounds' artifact only
            real_update(aid, progress=progress, description=description),
        )[1],
    )

    first = progressive(cfg)
    assert first["done_now"] == [1] and first["remaining"] == 1 and "run again" in first["message"]
    assert sent and sent[-1] == pytest.approx(100.0) and sent == sorted(sent)
    assert not out.exists()  # the schedule is not finished: nothing to export yet
    second = progressive(cfg)
    assert second["done_now"] == [2] and second["remaining"] == 0
    final = cfg.round_model(2)
    assert final.parent.name == "finetune"
    for f in final.iterdir():
        assert os.path.samefile(f, out / f.name)  # the final (fine-tuned) model, linked
    stamp = (out / "export.json").read_text()
    state = progressive(cfg, return_state=True)
    third, third_run = state.result(), state.state_details.flow_run_id
    assert third["done_now"] == [] and "nothing to do" in third["message"]
    assert (out / "export.json").read_text() == stamp  # found done, not written again

    rows = third["summary"]["rounds"]
    assert [r["target"] for r in rows] == [0.4, 0.6] and all(r["steps"] == 2 for r in rows)
    assert rows == json.loads((tmp_path / "p" / "summary.json").read_text())["rounds"]
    card = (out / "README.md").read_text()
    assert "- Method: progressive SparseGPT, 2 rounds (0.4, 0.6), recovery distill, pattern unstructured" in card
    dense = third["summary"]["dense"]["pydoc"]
    assert f"| perplexity pydoc (2 x 32) | {dense['ppl']:.3f} | {rows[1]['ppl_after']['pydoc']:.3f} |" in card
    assert json.loads((out / "sparsity.json").read_text())["overall"] == pytest.approx(rows[1]["sparsity"])
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sparsegpt-progressive"]))
        )
        newest = next(a.data for a in arts if a.flow_run_id == third_run)  # the last run shows the whole curve
        assert "2 of 2 rounds done (schedule complete)" in newest
        assert f"{rows[1]['ppl_before']['pydoc']:.2f} -> {rows[1]['ppl_after']['pydoc']:.2f}" in newest
        report = (tmp_path / "p" / "eval" / "report.md").read_text()
        assert "round" in report.lower() and "0.6" in report
        assert client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["sparsegpt-report"])))
        prog = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[artifact_key(cfg.run_dir) + "-rounds"]))
        )
        assert prog and max(prog, key=lambda a: a.created).data == pytest.approx(100.0)


def _prefect(args: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_scheduled_deployment_runs_advance_rounds_then_find_nothing_to_do(tiny_llama_dir, tmp_path):
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(REPO),
    }
    _prefect(["work-pool", "create", "--type", "process", "--overwrite", "local-process"], env)
    _prefect(["--no-prompt", "deploy", "--name", "sparsegpt-progressive"], env)

    with get_client(sync_client=True) as client:
        dep = client.read_deployment_by_name("sparsegpt-progressive/sparsegpt-progressive")
        assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
        assert dep.concurrency_options.collision_strategy == "ENQUEUE"
        assert [s.schedule.cron for s in dep.schedules] == ["0 */2 * * *"] and dep.schedules[0].active
        assert dep.parameters["cfg"]["runtime"]["rounds_per_run"] == 1

    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "deployed")
    param = json.dumps(cfg.to_dict())
    messages = []
    for expected_done in (1, 2, 2):
        out = _prefect(
            ["deployment", "run", "sparsegpt-progressive/sparsegpt-progressive", "--param", f"cfg={param}"], env
        )
        run_id = next(line.split()[-1] for line in out.stdout.splitlines() if "UUID" in line)
        _prefect(["worker", "start", "--pool", "local-process", "--run-once", "--limit", "1"], env, timeout=600)
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            assert state.is_completed(), f"deployment run ended {state.type}: {state.message}"
            logs = " ".join(log.message for log in client.read_logs(LogFilter(flow_run_id={"any_": [run_id]})))
        done = [k for k in (1, 2) if verify_record(RoundPaths(cfg.round_dir(k)).record) is not None]
        assert len(done) == expected_done
        messages.append(logs)
    assert "finished round 1 of 2" in messages[0] and "finished round 2 of 2" in messages[1]
    assert "schedule complete: all 2 rounds" in messages[2] and "nothing to do" in messages[2]
