"""The sweep flow: a grid of one-shot runs, here as subflows or fanned out over a Prefect work pool.

`sparsegpt-sweep` expands the grid (`stages.sweep.config.points`), checks every point
before anything runs, skips the points already finished (`stages.sweep.summary.finished`),
and runs the others: without `pool`, one after another as `sparsegpt-oneshot` subflows in
this process; with `pool`, each as a run of the `sparsegpt-oneshot` deployment
(`run_deployment`, linked to this flow run), so every worker of the pool, on any machine,
takes points in parallel; this flow only waits for their final states. A failed point does
not stop the others. At the end `RUN_ROOT/sweep.json` and `RUN_ROOT/report/` (every point,
the comparison of the finished ones) are written and published as an artifact; the flow
ends Failed, naming the failed points, if any failed (a rerun retries just those).

Work shared by the points (the dense model's evaluation) is done once through the cache
under `$SPARSEGPT_CACHE`, whose entries are locked while computed. `RUN_ROOT/.lock`
keeps a second sweep off the same run root.
"""

from __future__ import annotations

import time
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment
from prefect.exceptions import ObjectNotFound

from flows.errors import reports_user_errors
from flows.oneshot import oneshot
from stages.run.rundir import RunError, RunLock
from stages.sweep.check import check as check_sweep
from stages.sweep.config import Point, SweepConfig
from stages.sweep.summary import DONE, FAILED, Outcome, finished, write_summary


@task(name="check-sweep")
def check(cfg: SweepConfig) -> list[Point]:
    """Every point's config and input checked (and with --pool, the pool and the deployment) before any runs."""
    todo = check_sweep(cfg)
    if cfg.pool is not None:
        check_pool(cfg.pool, cfg.deployment)
    return todo


def check_pool(pool: str, deployment: str) -> None:
    """The work pool exists and the deployment runs on it; ValueError naming the fix otherwise."""
    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            raise ValueError(
                f"work pool {pool!r} does not exist; create it (prefect work-pool create --type process {pool}) "
                "or name another --pool"
            ) from None
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ValueError(
                f"deployment {deployment!r} does not exist; run `prefect deploy --name {deployment.split('/')[-1]} "
                f"--pool {pool}` in the project folder, or name another --deployment"
            ) from None
    if dep.work_pool_name != pool:
        raise ValueError(
            f"deployment {deployment!r} runs on work pool {dep.work_pool_name!r}, not {pool!r}; "
            f"give --pool {dep.work_pool_name} or deploy it to {pool}"
        )


def run_here(todo: list[Point]) -> list[Outcome]:
    """Each point as a `sparsegpt-oneshot` subflow, one after another; a failure is recorded, not raised."""
    out = []
    for p in todo:
        state = oneshot(p.cfg, return_state=True)
        ok = state.is_completed()
        out.append(Outcome(p.name, str(p.run_dir), DONE if ok else FAILED, "" if ok else _reason(state)))
    return out


def run_on_pool(cfg: SweepConfig, todo: list[Point]) -> list[Outcome]:
    """Submit each point as a run of the one-shot deployment, then wait until every run is final."""
    log = get_run_logger()
    submitted: dict[str, UUID] = {}
    for p in todo:
        point_cfg = p.cfg.updated(progress=False)  # a worker's log, not a terminal: no progress bars
        run = run_deployment(
            cfg.deployment,
            parameters={"cfg": point_cfg.to_dict()},
            timeout=0,
            flow_run_name=f"{Path(cfg.run_root).name}-{p.name}",
            tags=["sparsegpt-sweep"],
        )
        submitted[p.name] = run.id
        log.info("submitted %s as flow run %s", p.name, run.id)
    states: dict[str, object] = {}
    with get_client(sync_client=True) as client:
        while len(states) < len(submitted):
            for name, run_id in submitted.items():
                if name not in states:
                    state = client.read_flow_run(run_id).state
                    if state is not None and state.is_final():
                        states[name] = state
                        log.info("%s: %s", name, state.name)
            if len(states) < len(submitted):
                time.sleep(cfg.poll_seconds)
    out = []
    for p in todo:
        state = states[p.name]
        ok = state.is_completed()  # type: ignore[attr-defined]
        reason = "" if ok else _reason(state)
        out.append(Outcome(p.name, str(p.run_dir), DONE if ok else FAILED, reason, str(submitted[p.name])))
    return out


def _reason(state: object) -> str:
    """One line on why a point's run failed (its state's message, else its state's name)."""
    message = (getattr(state, "message", None) or "").strip()
    return message.splitlines()[0] if message else str(getattr(state, "name", "failed"))


@task(name="summary")
def summary(cfg: SweepConfig, outcomes: list[Outcome]) -> str:
    """RUN_ROOT/sweep.json and RUN_ROOT/report/; returns the sweep's Markdown."""
    return write_summary(cfg, outcomes).read_text(encoding="utf-8")


@flow(name="sparsegpt-sweep", log_prints=True)
@reports_user_errors
def sweep(cfg: SweepConfig) -> dict:
    """Run every point of ``cfg``'s grid not finished yet; write and publish the sweep's report."""
    all_points = check(cfg)
    root = Path(cfg.run_root).expanduser().resolve()
    with RunLock(root):
        before = {p.name for p in all_points if finished(p)}
        todo = [p for p in all_points if p.name not in before]
        get_run_logger().info("%d points, %d finished before, %d to run", len(all_points), len(before), len(todo))
        ran = {o.name: o for o in (run_on_pool(cfg, todo) if cfg.pool and todo else run_here(todo))}
        outcomes = [ran.get(p.name) or Outcome(p.name, str(p.run_dir), DONE, skipped=True) for p in all_points]
        markdown = summary(cfg, outcomes)
    create_markdown_artifact(markdown=markdown, key="sparsegpt-sweep", description=f"sweep {root}")
    failed = [o.name for o in outcomes if o.state == FAILED]
    if failed:
        raise RunError(
            f"{len(failed)} of {len(outcomes)} points failed ({', '.join(failed)}); see {root / 'report' / 'sweep.md'} "
            "and rerun the same sweep to retry them"
        )
    return {"points": [o.__dict__ for o in outcomes], "report": str(root / "report" / "sweep.md")}
