"""The one-shot flow end to end on a tiny Llama, against the session's Prefect server.

One uninterrupted run (module fixture) is the reference: its model, metrics (with a
zero-shot task), progress artifacts (blocks, evaluation), table and report artifacts,
report files and logs are checked, then the same run directory is run again (nothing
redone, tasks "Cached"), one block is deleted and redone, and a run that fails at
block 1 is retried with `prefect flow-run retry` and must finish with the same weights.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import pytest
import torch
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId, LogFilter
from prefect.settings import PREFECT_API_URL
from transformers import AutoModelForCausalLM

import flows.oneshot as flow_mod
from flows import artifacts
from flows.artifacts import artifact_key
from flows.oneshot import done_key, oneshot
from stages.config import PruneConfig
from stages.prune import oneshot as st
from tests.configs import run_weights as weights
from tests.configs import tiny_prune
from tests.samples import TASK_SAMPLES, task_spec

REPO = Path(__file__).resolve().parents[2]
CACHED_TASKS = ["calibrate", "prune-block-000", "prune-block-001", "prune-block-002", "assemble"]
N_TASKS = 10  # check, calibrate, capture, allocate, 3 blocks, assemble, evaluate, report
TASKS = (task_spec("boolq"),) if TASK_SAMPLES.is_dir() else ()


def tiny_cfg(model: Path, run_dir: Path, **kw) -> PruneConfig:
    base = dict(progress=True, eval=("pydoc",), eval_windows=2, tasks=TASKS, task_limit=2)
    return tiny_prune(model, run_dir, **{**base, **kw})


def read_artifacts(key: str) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def mtimes(run_dir: Path) -> dict[str, int]:
    files = [
        *run_dir.glob("blocks/*"),
        run_dir / "calib" / "tokens.json",
        run_dir / "model.json",
        *run_dir.glob("model/*"),
    ]
    return {p.relative_to(run_dir).as_posix(): p.stat().st_mtime_ns for p in files if p.exists()}


def task_states(flow_run_id: UUID, expected: int, attempt: int | None = None) -> dict[str, str]:
    """Task-run name (random suffix dropped) -> final state name, once the server has all of them."""
    flt = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    deadline = time.monotonic() + 20
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(flow_run_filter=flt)
        runs = [r for r in runs if attempt is None or r.flow_run_run_count == attempt]
        done = [r for r in runs if r.state is not None and r.state.is_final()]
        if len(done) >= expected or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    name = lambda r: r.name if r.name.startswith("prune-block") else re.sub(r"-[0-9a-f]{3}$", "", r.name)  # noqa: E731
    return {name(r): r.state.name for r in done}


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One uninterrupted flow run with progress on: (cfg, final state, progress values sent per artifact id)."""
    root = tmp_path_factory.mktemp("flow")
    cfg = tiny_cfg(tiny_llama_dir, root / "ref", progress=True, out=str(root / "results" / "ref.json"))
    sent: dict[UUID, list[float]] = {}
    real_update = artifacts.update_progress_artifact

    def spy(artifact_id, progress, description=None):
        sent.setdefault(artifact_id, []).append(progress)
        return real_update(artifact_id, progress=progress, description=description)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifacts, "update_progress_artifact", spy)
        state = oneshot(cfg, return_state=True)
    assert state.is_completed(), state.message
    return cfg, state, sent


def test_flow_writes_a_loadable_pruned_model_and_metrics(reference):
    cfg, state, _ = reference
    run_dir = Path(cfg.run_dir)
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert json.loads(json.dumps(state.result())) == metrics
    pydoc = metrics["pydoc"]
    assert {"ppl", "windows", "seqlen", "dense_ppl"} <= pydoc.keys()
    assert (pydoc["windows"], pydoc["seqlen"]) == (2, 32)
    assert pydoc["ppl"] > 1 and pydoc["dense_ppl"] > 1
    assert metrics["sparsity"]["overall"] == pytest.approx(0.5, abs=0.01)
    assert {"prepare", "calibrate", "capture", "prune", "assemble"} <= metrics["timings"].keys()

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 * 7
    for lin in linears:
        assert (lin.weight == 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    tasks = task_states(state.state_details.flow_run_id, expected=N_TASKS)
    assert set(tasks.values()) == {"Completed"}, tasks
    if TASKS:
        boolq = metrics["tasks"]["boolq"]
        assert boolq["dense"]["n"] == boolq["pruned"]["n"] == 2 and 0 <= boolq["pruned"]["acc"] <= 1
    assert (run_dir / "eval" / "report.html").is_file() and (run_dir / "eval" / "sparsity-heatmap.png").is_file()


def test_progress_artifacts_move_with_the_blocks_and_the_evaluation_and_logs_reach_the_api(reference):
    cfg, state, sent = reference
    blocks, evaluation = sent.values()  # in the order they first moved
    assert blocks == pytest.approx([100 / 3, 200 / 3, 100.0])
    steps = 2 * (1 + len(TASKS))  # dense and pruned: pydoc perplexity, then each task
    assert evaluation == pytest.approx([100 * k / steps for k in range(1, steps + 1)])
    for key in (artifact_key(cfg.run_dir), artifact_key(cfg.run_dir, "eval-progress")):
        arts = read_artifacts(key)
        assert [(a.type, a.data) for a in arts] == [("progress", 100.0)]
        assert arts[0].flow_run_id == state.state_details.flow_run_id

    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # the tqdm bar redirected console logging only; API logs still arrive
    deadline = time.monotonic() + 20
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id={"any_": [state.state_details.flow_run_id]}))
        if any("block 2:" in log.message for log in logs) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert any("block 2:" in log.message for log in logs)


def test_metrics_table_and_report_artifacts(reference):
    cfg, state, _ = reference
    metrics = state.result()
    (table,) = [
        a for a in read_artifacts("sparsegpt-metrics-table") if a.flow_run_id == state.state_details.flow_run_id
    ]
    rows = json.loads(table.data)
    assert rows[0] == {
        "kind": "perplexity",
        "name": "pydoc",
        "metric": "ppl",
        "n": 2,
        "dense": metrics["pydoc"]["dense_ppl"],
        "pruned": metrics["pydoc"]["ppl"],
    }
    assert rows[-1]["kind"] == "sparsity" and rows[-1]["pruned"] == metrics["sparsity"]["overall"]
    if TASKS:
        assert {
            "kind": "task",
            "name": "boolq",
            "metric": "acc",
            "n": 2,
            "dense": metrics["tasks"]["boolq"]["dense"]["acc"],
            "pruned": metrics["tasks"]["boolq"]["pruned"]["acc"],
        } in rows
        (md,) = [a for a in read_artifacts("sparsegpt-metrics") if a.flow_run_id == state.state_details.flow_run_id]
        assert "| boolq | 2 | acc |" in md.data
    (report,) = [a for a in read_artifacts("sparsegpt-report") if a.flow_run_id == state.state_details.flow_run_id]
    assert report.type == "markdown" and "| 2 | self_attn.v_proj |" in report.data
    assert f"`{Path(cfg.run_dir) / 'eval' / 'error-heatmap.png'}`" in report.data and "](" not in report.data


def test_artifact_key_is_valid_for_prefect():
    assert artifact_key("runs/My_Run.v2") == "sparsegpt-progress-my-run-v2"
    assert artifact_key("runs/My_Run.v2", "eval-progress") == "sparsegpt-eval-progress-my-run-v2"
    assert re.fullmatch(r"[a-z0-9-]+", artifact_key("/tmp/ÄÖ"))


def test_second_run_skips_finished_work_from_the_cache(reference):
    cfg, _, _ = reference
    run_dir = Path(cfg.run_dir)
    before, w_before = mtimes(run_dir), weights(run_dir)
    state = oneshot(cfg.updated(progress=False), return_state=True)
    assert state.is_completed()
    assert mtimes(run_dir) == before
    w_after = weights(run_dir)
    assert all(torch.equal(w_before[k], w_after[k]) for k in w_before)
    tasks = task_states(state.state_details.flow_run_id, expected=N_TASKS)
    assert {t: tasks[t] for t in CACHED_TASKS} == dict.fromkeys(CACHED_TASKS, "Cached")


def test_deleted_block_is_redone_alone_and_never_served_stale(reference):
    cfg, _, _ = reference
    run_dir = Path(cfg.run_dir)
    w_before = weights(run_dir)
    run = st.Run(root=run_dir, model_dir=Path(cfg.model), num_blocks=3)
    key = done_key(flow_mod._block_record, cfg, run, 1)
    assert key is not None and (run_dir / ".prefect" / key).is_file()  # a persisted result waits under the key

    (run_dir / "blocks" / "block_001.json").unlink()
    (run_dir / "model.json").unlink()
    assert done_key(flow_mod._block_record, cfg, run, 1) is None  # so that result can't be served
    assert done_key(flow_mod._model_record, cfg, run) is None
    before = mtimes(run_dir)
    state = oneshot(cfg.updated(progress=False), return_state=True)
    assert state.is_completed()
    after = mtimes(run_dir)
    changed = {k for k in after if after[k] != before.get(k)}
    assert {"blocks/block_001.json", "blocks/block_001.safetensors", "model.json"} <= changed
    assert not {"blocks/block_000.json", "blocks/block_002.json", "calib/tokens.json"} & changed
    tasks = task_states(state.state_details.flow_run_id, expected=N_TASKS)
    assert (tasks["prune-block-000"], tasks["prune-block-001"], tasks["prune-block-002"]) == (
        "Cached",
        "Completed",
        "Cached",
    )
    assert tasks["assemble"] == "Completed"
    w_after = weights(run_dir)
    assert all(torch.equal(w_before[k], w_after[k]) for k in w_before)


def test_failed_run_resumes_with_prefect_flow_run_retry(reference, tmp_path, monkeypatch):
    ref_cfg, _, _ = reference
    cfg = ref_cfg.updated(run_dir=str(tmp_path / "crashy"), progress=False, out=None)
    real = st.prune_one

    def fail_at_block_1(cfg, run, i, sparsity):
        if i == 1:
            raise RuntimeError("simulated crash at block 1")
        return real(cfg, run, i, sparsity)

    monkeypatch.setattr(st, "prune_one", fail_at_block_1)
    failed = oneshot(cfg, return_state=True)
    monkeypatch.undo()
    assert failed.is_failed()
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "blocks" / "block_000.json").is_file() and not (run_dir / "blocks" / "block_001.json").exists()
    block0 = (run_dir / "blocks" / "block_000.json").stat().st_mtime_ns
    flow_run_id = failed.state_details.flow_run_id

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    cmd = [
        str(Path(sys.executable).parent / "prefect"),
        "flow-run",
        "retry",
        str(flow_run_id),
        "--entrypoint",
        "flows/oneshot.py:oneshot",
    ]
    if not Path(cmd[0]).exists():
        cmd[0] = shutil.which("prefect") or pytest.skip("the prefect command is not installed")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
    assert flow_run.state.is_completed() and flow_run.run_count == 2
    assert (run_dir / "blocks" / "block_000.json").stat().st_mtime_ns == block0
    tasks = task_states(flow_run_id, expected=N_TASKS, attempt=2)
    assert (tasks["calibrate"], tasks["prune-block-000"], tasks["prune-block-001"]) == ("Cached", "Cached", "Completed")
    assert_same_weights(run_dir, Path(ref_cfg.run_dir))


def test_evaluate_flow_agrees_with_the_oneshot_metrics(reference):
    from flows.evaluate import evaluate
    from stages.config import EvaluateConfig

    cfg, _, _ = reference
    metrics = json.loads((Path(cfg.run_dir) / "eval" / "metrics.json").read_text())
    pruned = EvaluateConfig.of(model=str(Path(cfg.run_dir) / "model"), eval=("pydoc",), eval_seqlen=32, eval_windows=2)
    res = evaluate(pruned.updated(tasks=TASKS, task_limit=2))
    assert res["pydoc"]["ppl"] == pytest.approx(metrics["pydoc"]["ppl"], rel=1e-5)
    if TASKS:
        assert {k: res["tasks"]["boolq"][k] for k in ("acc", "n")} == {
            k: metrics["tasks"]["boolq"]["pruned"][k] for k in ("acc", "n")
        }
    (progress,) = read_artifacts("sparsegpt-eval-progress")[:1]
    assert (progress.type, progress.data) == ("progress", 100.0)
    dense = evaluate(pruned.updated(model=cfg.model), return_state=True)
    assert dense.is_completed()
    assert dense.result()["pydoc"]["ppl"] == pytest.approx(metrics["pydoc"]["dense_ppl"], rel=1e-5)


def test_out_writes_lm_eval_results_of_the_pruned_and_the_dense_model(reference):
    from stages.evaluate.lm_eval_layout import dense_path

    cfg, state, _ = reference
    metrics = state.result()
    pruned = json.loads(Path(cfg.eval.out).read_text())
    dense = json.loads(dense_path(cfg.eval.out).read_text())
    assert dense_path(cfg.eval.out).name == "ref.dense.json"
    assert pruned["results"]["pydoc"]["token_perplexity,none"] == metrics["pydoc"]["ppl"]
    assert dense["results"]["pydoc"]["token_perplexity,none"] == metrics["pydoc"]["dense_ppl"]
    assert pruned["config"]["model_args"] == f"pretrained={Path(cfg.run_dir) / 'model'}"
    if TASKS:
        for which, layout in (("pruned", pruned), ("dense", dense)):
            scores = metrics["tasks"]["boolq"][which]
            hits = round(scores["acc"] * scores["n"])
            zero_one = [1.0] * hits + [0.0] * (scores["n"] - hits)
            entry = layout["results"]["boolq"]
            assert entry["acc,none"] == scores["acc"]
            assert entry["acc_stderr,none"] == pytest.approx(statistics.stdev(zero_one) / math.sqrt(scores["n"]))
            assert layout["versions"] == {"boolq": 2.0} and layout["n-shot"] == {"boolq": 0}
            assert layout["n-samples"] == {"boolq": {"effective": 2}}


def test_cli_eval_prints_perplexity_and_task_tables(reference, capsys, tmp_path):
    from flows.cli import main

    cfg, state, _ = reference
    metrics = state.result()
    model = str(Path(cfg.run_dir) / "model")
    assert (
        main(
            [
                "eval",
                model,
                "--eval",
                "pydoc",
                "--seqlen",
                "32",
                "--eval-windows",
                "2",
                *(["--tasks", ",".join(TASKS), "--limit", "2"] if TASKS else []),
                "--out",
                str(tmp_path / "results.json"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert results["pydoc"]["token_perplexity,none"] == pytest.approx(metrics["pydoc"]["ppl"], rel=1e-5)
    assert f"| pydoc | 2 x 32 | {metrics['pydoc']['ppl']:.2f} |" in out
    if TASKS:
        assert f"| boolq | 2 | acc | {metrics['tasks']['boolq']['pruned']['acc']:.4f} |" in out


def test_export_task_runs_once_per_model(reference):
    """`--export hf` adds an export task after the report; a rerun of the finished run finds it done."""
    cfg, _, _ = reference
    run_dir = Path(cfg.run_dir)
    state = oneshot(cfg.updated(progress=False, export="hf"), return_state=True)
    assert state.is_completed()
    stamp = run_dir / "export-hf" / "export.json"
    assert json.loads(stamp.read_text())["format"] == "hf" and (run_dir / "export-hf" / "README.md").is_file()
    before = stamp.stat().st_mtime_ns
    assert oneshot(cfg.updated(progress=False, export="hf"), return_state=True).is_completed()
    assert stamp.stat().st_mtime_ns == before
    tasks = task_states(state.state_details.flow_run_id, expected=N_TASKS + 1)
    assert tasks["export"] == "Completed"
