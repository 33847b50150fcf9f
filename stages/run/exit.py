"""`exit_now(code)`: end this process at once, without the interpreter's teardown (torch-free).

After a program's work is done and written, Python's finalization frees every object of torch,
transformers and Prefect one by one (1.4 s after a SmolLM2 prune) and runs C++ static destructors, in
which torch's gloo teardown aborts a spawned rank now and then (SIGABRT, "terminate called without an
active exception", no Python frame left). Used where nothing is left to save: the CLI after its exit
handlers (`flows.cli`), a spawned rank after its work (`stages.run.ranks.end_rank`). Under coverage, whose
data an exit handler saves, it returns and the process exits normally.
"""

from __future__ import annotations

import logging
import os
import sys


def exit_now(code: int) -> None:
    """Shut logging down, flush the standard streams and end the process with ``code`` (returns only under
    coverage)."""
    if "coverage" in sys.modules:
        return
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # closed or replaced streams: nothing to flush
            pass
    os._exit(code)
