"""Prefect fixtures for the flow tests: one temporary Prefect server for the whole session.

`prefect_test_harness` starts a subprocess API server on a throw-away SQLite database
(about 10 s here), so it is entered once per session and only for tests/flows; tests
never nest harnesses. The environment keeps Prefect quiet and patient on a slow machine.
"""

import os

import pytest

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """A temporary Prefect API and database shared by every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield
