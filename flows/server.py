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
signal, set by the CLI), so a killed run leaves no server behind.
"""

from __future__ import annotations

import os
import socket
import sys

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


if __name__ == "__main__":
    sys.exit(main())
