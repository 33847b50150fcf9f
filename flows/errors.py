"""User errors in flows: one ERROR line with the message, no traceback.

Bad input is refused before a flow starts where the arguments and files show it (the
CLI calls the stages' `check` functions; a deployment's first task is the same check).
What only shows later (a corpus too short for the asked windows, a singular Hessian, a
full disk) raises one of `USER_ERRORS` with a one-line message that names the fix.
`reports_user_errors` makes a flow log such an error as one `error: ...` line and end
Failed with that message; Prefect's task and flow engines would log a traceback for each.
Tracebacks stay for anything else, and for everything when `SPARSEGPT_DEBUG=1` (the CLI's
`--debug`).
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar, get_type_hints

from stages.run.rundir import RunError

USER_ERRORS = (ValueError, RunError, FileNotFoundError)
"""What the stages raise for bad input or a fixable condition, with a one-line message naming the fix."""
DEBUG_ENV = "SPARSEGPT_DEBUG"
PREFECT_LOGGERS = ("prefect.task_runs", "prefect.flow_runs")
F = TypeVar("F", bound=Callable[..., Any])


def one_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


class UserErrorLines(logging.Filter):
    """Turn the engines' "failed with exception" record of a user error into `error: <message>`, and drop
    the "Finished in state Failed(...)" record that repeats that message."""

    def __init__(self) -> None:
        super().__init__()
        self.reported: list[str] = []

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, USER_ERRORS):
            message = one_line(exc)
            record.msg, record.args, record.exc_info, record.exc_text = f"error: {message}", (), None, None
            self.reported = [*self.reported[-15:], message]
            return True
        text = record.getMessage()
        return not (text.startswith("Finished in state Failed") and any(m in text for m in self.reported))


_FILTER = UserErrorLines()


def quiet_user_errors() -> UserErrorLines:
    """Install the filter on Prefect's run loggers (once per process) unless debugging; return it."""
    if not debug():
        for name in PREFECT_LOGGERS:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
    return _FILTER


def reports_user_errors(fn: F) -> F:
    """Wrap a flow function: a user error ends the flow run Failed with its one-line message, logged once
    (a task that raised it has logged it already); the caller of the flow still gets the exception."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from prefect import get_run_logger
        from prefect.states import Failed

        seen = quiet_user_errors()
        try:
            return fn(*args, **kwargs)
        except USER_ERRORS as exc:
            if debug():
                raise
            message = one_line(exc)
            if message not in seen.reported:
                get_run_logger().error("error: %s", message)
            return Failed(message=message, data=exc)

    # Prefect validates a flow's parameters from its signature; give it resolved types, since the string
    # annotations of `fn` would be resolved in this module's namespace.
    wrapper.__signature__ = inspect.signature(fn, eval_str=True)  # type: ignore[attr-defined]
    wrapper.__annotations__ = get_type_hints(fn)
    return wrapper  # type: ignore[return-value]
