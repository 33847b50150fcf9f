"""Prefect's temporary API server for one CLI process: `python flows/server.py`, started by the CLI at once.

Without a configured server (`PREFECT_API_URL`), Prefect starts a temporary one at a process's first
flow (a uvicorn subprocess serving its API app on a SQLite database) and waits for it there, after the
process has imported Prefect's server package to do so (about 2 s and 55 MiB here). The CLI instead
starts this script before it imports torch: the script reads Prefect's settings, and when a server is
configured, or temporary servers are off (`PREFECT_SERVER_EPHEMERAL_ENABLED=false`), it prints
`configured` and exits; otherwise it binds a free local port, prints `port N`, and serves Prefect's API
app there as Prefect's own temporary server does (the same app and database, the UI off). The CLI sets
`PREFECT_API_URL` to it before it imports Prefect, so its flows use it as a configured server, and its
checks and imports run while the server boots on the other core.

The CLI stops it at exit; the kernel sends it SIGTERM if the CLI dies first (Linux's parent-death
signal, set by the CLI), so a killed run leaves no server behind. `EarlyServer` is the CLI's side
(start, point Prefect at it, wait, stop); `main` is the script's.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
"""What Prefect's own temporary server runs with (prefect.server.api.server.SubprocessASGIServer)."""


def main() -> int:
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # run as a script: this folder's modules (evaluate, options, ...) must not shadow others'
    os.environ.update(SERVER_ENV)  # before Prefect reads its settings
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        print("configured", flush=True)
        return 0
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race with another process
    print(f"port {sock.getsockname()[1]}", flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the CLI read its line; the rest goes where errors go
    import uvicorn

    app = "prefect.server.api.server:create_app"
    config = uvicorn.Config(app, factory=True, log_level="error", lifespan="on", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


class EarlyServer:
    """The CLI's side: this script started as a process before the CLI imports torch.

    Prefect starts that server at the first flow call and waits for it there (about 6 s here), after
    importing its server package in this process to do so. Started at once instead, it boots on another
    core while this process imports torch and checks its input. `configure` points this process's
    Prefect at it (`PREFECT_API_URL`, before Prefect is imported: it reads its settings once), so the
    flows use it as a configured server; `ready` waits until it answers. Nothing is served when a server
    is configured or temporary servers are off: the script says so and exits, and Prefect runs as it
    would. The server stops at this process's exit, and with it if it is killed.
    """

    SCRIPT = Path(__file__)

    def __init__(self, start: bool = True) -> None:
        self._proc: subprocess.Popen | None = None
        self._address: str | None = None
        if start:
            self._proc = subprocess.Popen(
                [sys.executable, str(self.SCRIPT)],
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,  # Ctrl-C reaches this process only, which still reports to the server
                preexec_fn=functools.partial(_die_with_parent, os.getpid()),
            )
            atexit.register(self.stop)  # registered first, so it runs after Prefect's exit handlers (log flushes)

    def configure(self) -> None:
        """Point this process's Prefect at the server (call before Prefect is imported); without one (a
        configured server, temporary servers off, or a script that could not start), Prefect decides."""
        if self._proc is None or self._address is not None:
            return
        line = self._proc.stdout.readline().split()  # "port N" or "configured"; nothing if it failed
        self._proc.stdout.close()
        if line[:1] != ["port"] or "prefect" in sys.modules:  # too late to point it elsewhere: Prefect's own start
            self.stop()
            return
        self._address = f"http://127.0.0.1:{int(line[1])}"
        os.environ["PREFECT_API_URL"] = f"{self._address}/api"  # child processes (ranks) use it too
        os.environ.setdefault("PREFECT_UI_URL", "")  # it serves no UI (nor does Prefect's own): no "View at" links

    def ready(self) -> None:
        """Wait until the server answers; raise if it exits or does not answer in time."""
        self.configure()
        if self._address is None:
            return
        import urllib.error
        import urllib.request

        timeout = float(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180"))
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self._address}/api/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            code = self._proc.poll()
            if code is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered (see above)")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Prefect's temporary server did not answer within {timeout:.0f} s "
                    "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); or set PREFECT_API_URL to a running server"
                )
            time.sleep(0.05)
        logging.getLogger("prefect").info(
            "Starting temporary server on %s\nSee https://www.prefect.io/docs/v3/concepts/server#how-to-guides "
            "for more information on running a dedicated Prefect server.",
            self._address,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s); a no-op once stopped."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        if self._address is not None:
            logging.getLogger("prefect").info("Stopping temporary server on %s", self._address)
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _die_with_parent(parent: int) -> None:
    """In the server's process, before it runs: Linux sends it SIGTERM when the CLI's process ends."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the CLI's exit handler still stops it
        return
    if os.getppid() != parent:  # the CLI ended before the signal was set
        os.kill(os.getpid(), signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
