"""Errors inside the one-shot flow: a user error is one `error: ...` line and a Failed run with its message
(no traceback); a defect keeps its traceback. Both are read back from the Prefect API's logs."""

from __future__ import annotations

import time
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter

from flows.oneshot import oneshot
from stages.prune import oneshot as st
from tests.configs import tiny_prune


def flow_logs(flow_run_id: UUID, until: str) -> list:
    """The flow run's logs on the API, once one contains `until` (or after 20 s)."""
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    deadline = time.monotonic() + 20
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(LogFilter(flow_run_id={"any_": [flow_run_id]}))
        if any(until in log.message for log in logs) or time.monotonic() > deadline:
            return logs
        time.sleep(0.2)


def test_user_error_inside_a_flow_is_one_error_line_without_traceback(tiny_llama_dir, tmp_path):
    """A corpus too short for the windows shows only when calibration tokenizes it: the task's failure is
    logged as one `error: ...` line, the flow run ends Failed with that message, and the caller gets the
    exception (the CLI prints it and exits 2)."""
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "run", calib=f"text={short}", progress=False)
    state = oneshot(cfg, return_state=True)
    assert state.is_failed() and state.message.startswith("calibration corpus"), state.message
    logs = flow_logs(state.state_details.flow_run_id, "error: calibration corpus")
    errors = [log.message for log in logs if log.level >= 40]
    assert len(errors) == 1 and errors[0].startswith("error: calibration corpus"), errors
    assert not any("Traceback" in log.message for log in logs)
    with pytest.raises(ValueError, match="calibration corpus"):
        state.result()


def test_defect_inside_a_flow_keeps_its_traceback(tiny_llama_dir, tmp_path, monkeypatch):
    def broken(cfg, run):
        raise RuntimeError("a defect, not bad input")

    monkeypatch.setattr(st, "calibrate", broken)
    state = oneshot(tiny_prune(tiny_llama_dir, tmp_path / "run", progress=False), return_state=True)
    assert state.is_failed()
    logs = flow_logs(state.state_details.flow_run_id, "Traceback")
    assert any("Traceback" in log.message and "a defect, not bad input" in log.message for log in logs)
