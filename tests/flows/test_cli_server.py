"""The CLI's early start of Prefect's temporary server (`flows.cli._EarlyServer`).

The real start runs in tests/flows/test_cli_signals.py (a CLI process without PREFECT_API_URL, which
must leave no server behind); here, with Prefect's start replaced, what the thread decides and hands
back to the main thread.
"""

import pytest
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings

from flows.cli import _EarlyServer


@pytest.fixture
def starts(monkeypatch):
    """Calls of Prefect's server start (recorded instead of made)."""
    calls = []
    monkeypatch.setattr(SubprocessASGIServer, "start", lambda self, timeout=None: calls.append(self))
    return calls


def test_no_start_when_a_server_is_configured(starts):
    assert PREFECT_API_URL.value()  # the session's harness server, set in this thread's context only
    server = _EarlyServer()
    server.imported()
    server.ready()
    assert starts == []  # the thread saw the caller's settings


def test_starts_prefects_own_server_when_none_is_configured(starts):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        server = _EarlyServer()
        server.imported()
        server.ready()
    assert len(starts) == 1 and isinstance(starts[0], SubprocessASGIServer)


def test_a_failed_start_is_raised_by_ready(monkeypatch):
    def fail(self, timeout=None):
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    monkeypatch.setattr(SubprocessASGIServer, "start", fail)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        server = _EarlyServer()
        server.imported()
        with pytest.raises(RuntimeError, match="ephemeral Prefect API server"):
            server.ready()


def test_off_starts_nothing(starts):
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        server = _EarlyServer(start=False)
        server.imported()
        server.ready()
    assert starts == []
