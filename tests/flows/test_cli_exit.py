"""As a program the CLI ends its process once the exit handlers have run, skipping the interpreter's
teardown (`flows.cli._QuickExit`): the exit status, the standard streams written to files, and the exit
handlers registered after it are as a normal exit's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

DRIVER = """
import atexit, sys
from flows import cli
mark = sys.argv.pop(1)
as_program = sys.argv.pop(1) == "program"

class Probe:  # the interpreter's teardown deletes it and so writes the file
    def __init__(self):
        self.path, self.open = mark + ".teardown", open  # builtins may be gone by then

    def __del__(self):
        self.open(self.path, "w").close()

probe = Probe()
try:
    sys.exit(cli.main() if as_program else cli.main(sys.argv[1:]))
finally:  # registered after the quick exit's, so it runs before it (last in, first out)
    atexit.register(lambda: open(mark + ".handler", "w").close())
"""


def _run(tmp_path: Path, mode: str, *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    mark = tmp_path / mode
    env = {k: v for k, v in os.environ.items() if not k.startswith("COV")} | {"PYTHONPATH": str(REPO)}
    with open(tmp_path / f"{mode}.out", "w") as out, open(tmp_path / f"{mode}.err", "w") as err:
        proc = subprocess.run(
            [sys.executable, "-c", DRIVER, str(mark), mode, *args], cwd=REPO, env=env, stdout=out, stderr=err
        )
    return proc, mark


@pytest.mark.parametrize(
    ("args", "code", "stream", "text"),
    [
        (["--help"], 0, "out", "usage: sparsegpt"),  # argparse's SystemExit(0), stdout to a file: flushed
        (["status", "/nonexistent"], 2, "err", "error: /nonexistent is not a run directory"),
        (["status", "/nonexistent", "--debug"], 1, "err", "ValueError: /nonexistent is not a run directory"),
        (["prune"], 2, "err", "the following arguments are required"),  # argparse's SystemExit(2)
    ],
)
def test_quick_exit_keeps_status_streams_and_handlers(tmp_path, args, code, stream, text):
    if "coverage" in sys.modules:
        pytest.skip("under coverage the CLI leaves the teardown in place (coverage saves its data there)")
    for mode in ("call", "program"):  # main(argv): a normal exit, the control; main(): the quick exit
        proc, mark = _run(tmp_path, mode, *args)
        assert proc.returncode == code, (tmp_path / f"{mode}.err").read_text()[-2000:]
        assert text in (tmp_path / f"{mode}.{stream}").read_text()
        assert mark.with_suffix(".handler").exists()
        assert mark.with_suffix(".teardown").exists() == (mode == "call")
