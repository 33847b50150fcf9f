"""The CLI's early start of Prefect's temporary server (`flows.cli._EarlyServer`, `flows/server.py`).

Each case runs in a fresh Python process (as the CLI does, Prefect not yet imported there) with its own
`PREFECT_HOME`: without `PREFECT_API_URL` the server is started, the process's Prefect points at it and
it answers Prefect's client; with a configured server nothing is started and nothing is changed; it
stops at the process's exit and when the process is killed. The whole CLI with it runs in
tests/flows/test_cli_signals.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the server's process in /proc")

USE = """
import json, os, sys
from flows.cli import _EarlyServer
server = _EarlyServer()
assert "prefect" not in sys.modules
server.configure()
server.ready()
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    healthy = client.api_healthcheck() is None
print(json.dumps({"url": os.environ.get("PREFECT_API_URL"), "healthy": healthy, "pid": os.getpid()}), flush=True)
if "--wait" in sys.argv:
    sys.stdin.readline()
"""


def servers(home: str) -> list[int]:
    """PIDs of live processes that serve Prefect's API (its temporary server) with ``PREFECT_HOME=home``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmd = (proc / "cmdline").read_bytes()
            state = (proc / "stat").read_text().split(") ")[1][0]
        except (OSError, IndexError):
            continue
        if f"PREFECT_HOME={home}".encode() in env and (b"flows/server.py" in cmd or b"uvicorn" in cmd) and state != "Z":
            found.append(int(proc.name))
    return found


def environ(tmp_path: Path, api_url: str | None = None) -> tuple[dict, str]:
    home = str(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_HOME": home}
    env["PYTHONPATH"] = str(REPO)
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env, home


def gone(home: str, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while servers(home) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not servers(home)


def test_starts_a_server_the_process_uses_and_stops_it_at_exit(tmp_path):
    env, home = environ(tmp_path)
    out = subprocess.run([sys.executable, "-c", USE], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["healthy"] and got["url"].startswith("http://127.0.0.1:") and got["url"].endswith("/api")
    assert gone(home), "the temporary server outlived the process"


def test_a_configured_server_is_used_and_nothing_is_started(tmp_path):
    env, home = environ(tmp_path, api_url="http://127.0.0.1:9/api")  # nothing listens there
    code = "from flows.cli import _EarlyServer\nimport os\ns = _EarlyServer()\ns.configure()\ns.ready()\n"
    code += "print(os.environ['PREFECT_API_URL'], s._address)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["http://127.0.0.1:9/api", "None"]  # the script said "configured" and exited
    assert not servers(home)


def test_prefect_imported_too_early_leaves_the_start_to_prefect(tmp_path):
    env, home = environ(tmp_path)
    code = "from flows.cli import _EarlyServer\nimport os, prefect\ns = _EarlyServer()\ns.configure()\n"
    code += "print(os.environ.get('PREFECT_API_URL'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "None"  # Prefect read its settings already: its own start at the first flow
    assert gone(home)


def test_a_killed_process_takes_its_server_with_it(tmp_path):
    env, home = environ(tmp_path)
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "text": True}
    proc = subprocess.Popen([sys.executable, "-c", USE, "--wait"], cwd=REPO, env=env, **pipes)
    try:
        line = proc.stdout.readline()
        assert json.loads(line)["healthy"], line
        assert servers(home)
        proc.send_signal(signal.SIGKILL)  # no exit handler runs
        proc.wait(timeout=30)
        assert gone(home), "the temporary server outlived a killed process"
    finally:
        proc.kill()
