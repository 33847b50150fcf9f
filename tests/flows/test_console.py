"""The console of a CLI run: progress bars and the final table, Prefect's task-run lines only in its API."""

from __future__ import annotations

import logging

import flows.cli as cli
import flows.oneshot  # noqa: F401  (Prefect's logging is configured on import)


def test_task_run_info_stays_off_the_console_and_still_reaches_the_api_handler():
    from prefect.logging.handlers import APILogHandler, PrefectConsoleHandler

    (console,) = [h for h in logging.getLogger().handlers if isinstance(h, PrefectConsoleHandler)]

    def shown(name: str, level: int) -> bool:
        return bool(console.filter(logging.LogRecord(name, level, __file__, 1, "message", None, None)))

    def drop_filters() -> None:  # an earlier CLI call in this process may have installed one
        for f in [f for f in console.filters if isinstance(f, cli._TaskInfoOffConsole)]:
            console.removeFilter(f)

    drop_filters()
    assert shown("prefect.task_runs", logging.INFO)
    try:
        cli._task_lines_off_console(progress=False)
        assert shown("prefect.task_runs", logging.INFO)  # --no-progress: the lines are the progress
        cli._task_lines_off_console(progress=True)
        cli._task_lines_off_console(progress=True)
        assert sum(isinstance(f, cli._TaskInfoOffConsole) for f in console.filters) == 1
        assert not shown("prefect.task_runs", logging.INFO)
        assert shown("prefect.task_runs", logging.WARNING)
        assert shown("prefect.flow_runs", logging.INFO) and shown("sparsegpt.pipeline", logging.INFO)
        assert any(isinstance(h, APILogHandler) for h in logging.getLogger("prefect.task_runs").handlers)
    finally:
        drop_filters()
