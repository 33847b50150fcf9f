"""A sweep fanned out over a real Prefect work pool: the session's Prefect server, a process pool, the one-shot
flow deployed from this checkout, and two workers (separate processes, as on two machines) that take the
points. Both workers run points, the report has every point, and the dense evaluation runs once."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect import Flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import PREFECT_API_URL

from flows.sweep import sweep
from stages.sweep.config import SweepConfig, points

REPO = Path(__file__).resolve().parents[2]
POOL = "sweep-test-pool"


def sweep_cfg(model: Path, root: Path, **flat: object) -> SweepConfig:
    base = dict(calib="pydoc", nsamples=6, seqlen=32, blocksize=16, progress=False, eval=("pydoc",), eval_windows=2)
    grid = ("method=sparsegpt,magnitude", "sparsity=0.5,0.6")
    return SweepConfig.of(model=str(model), run_root=str(root), grid=grid, **{**base, **flat})


@pytest.fixture(scope="module")
def pool() -> str:
    """A process work pool with the one-shot flow of this checkout deployed on it."""
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=POOL, type="process"))
    Flow.from_source(source=str(REPO), entrypoint="flows/oneshot.py:oneshot").deploy(
        name="sparsegpt-oneshot", work_pool_name=POOL, build=False, push=False, print_next_steps=False
    )
    return POOL


def start_worker(name: str, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """`prefect worker start` for the pool, one flow run at a time; returns once it says it started."""
    cmd = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--limit", "1", "--name", name]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO)
    deadline = time.monotonic() + 120
    while f"Worker '{name}' started" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.5)
    return proc


def test_two_workers_share_the_grid_and_the_dense_evaluation_runs_once(pool, tiny_llama_dir, tmp_path):
    cache = tmp_path / "cache"
    env = {
        **os.environ,
        "PREFECT_API_URL": PREFECT_API_URL.value(),
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "SPARSEGPT_EVAL_CACHE": str(cache),  # shared caches, as on shared storage
        "SPARSEGPT_CALIB_CACHE": str(tmp_path / "calib"),
    }
    logs = {name: tmp_path / f"{name}.log" for name in ("w1", "w2")}
    workers = []
    try:
        for name, log in logs.items():  # one after the other: their start-up writes to the same pool row
            workers.append(start_worker(name, log, env))
        cfg = sweep_cfg(tiny_llama_dir, tmp_path / "sweep", pool=pool, poll_seconds=1)
        out = sweep(cfg)
    finally:
        for proc in workers:
            proc.terminate()
        for proc in workers:
            proc.wait(60)
    assert all(p["state"] == "finished" and p["flow_run_id"] for p in out["points"])
    ran = {
        name: set(re.findall(rf"Worker '{name}' submitting flow run '([0-9a-f-]+)'", log.read_text()))
        for name, log in logs.items()
    }
    assert ran["w1"] and ran["w2"], ran  # both workers took points
    assert ran["w1"] | ran["w2"] == {p["flow_run_id"] for p in out["points"]}
    names = [p.name for p in points(cfg)]
    comparison = (tmp_path / "sweep" / "report" / "comparison.md").read_text()
    assert all(n in comparison for n in names)
    assert len(list(cache.glob("ppl-*.json"))) == 1
    dense = []
    for p in points(cfg):
        (path,) = (p.run_dir / "eval").glob("dense-*.json")
        dense.append({k: v for k, v in json.loads(path.read_text()).items() if k != "files"})
    assert all(d == dense[0] for d in dense), "two workers computed the dense evaluation"
    tokens = {(p.run_dir / "calib" / "tokens.arrow").stat().st_ino for p in points(cfg)}
    assert len(tokens) == 1, "the calibration windows were sampled more than once"


def test_a_missing_pool_or_a_deployment_on_another_pool_is_refused_before_submitting(pool, tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="work pool 'no-such-pool' does not exist; create it"):
        sweep(sweep_cfg(tiny_llama_dir, tmp_path / "a", pool="no-such-pool"))
    with get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name="other-pool", type="process"))
    with pytest.raises(ValueError, match=f"runs on work pool '{pool}', not 'other-pool'"):
        sweep(sweep_cfg(tiny_llama_dir, tmp_path / "b", pool="other-pool"))
    with pytest.raises(ValueError, match="deployment 'sparsegpt-oneshot/elsewhere' does not exist"):
        sweep(sweep_cfg(tiny_llama_dir, tmp_path / "c", pool=pool, deployment="sparsegpt-oneshot/elsewhere"))
    assert not any((tmp_path / d).exists() for d in "abc")
