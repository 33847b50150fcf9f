"""Run the progressive rounds in a subprocess and SIGKILL it right after one atomic write.

    python tests/stages/progressive/progressive_kill_driver.py CONFIG_JSON (none | after:REL)

CONFIG_JSON is a `ProgressiveConfig` as JSON; `after:REL` kills the process with a real
SIGKILL (no cleanup, no `finally`) right after `RUN_DIR/REL` is renamed into place, in
every module that writes atomically (pruning, fine-tuning checkpoints, evaluation records).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import stages.data.calibration  # noqa: E402
import stages.finetune.ckpt  # noqa: E402
import stages.model.blocks  # noqa: E402
import stages.progressive.rounds  # noqa: E402
import stages.run.rundir  # noqa: E402
import stages.run.shards  # noqa: E402


def install_kill(run_dir: Path, rel: str) -> None:
    real = stages.run.rundir.atomic_path
    target = (run_dir / rel).resolve()

    @contextlib.contextmanager
    def atomic_path(path):
        with real(path) as tmp:
            yield tmp
        if Path(path).resolve() == target:
            os.kill(os.getpid(), signal.SIGKILL)

    for module in (
        stages.run.rundir,
        stages.run.shards,
        stages.model.blocks,
        stages.data.calibration,
        stages.finetune.ckpt,
        stages.progressive.rounds,
    ):
        module.atomic_path = atomic_path


def main(argv: list[str]) -> int:
    cfg = stages.progressive.rounds.ProgressiveConfig.from_dict(json.loads(argv[1]))
    if argv[2].startswith("after:"):
        install_kill(Path(cfg.run_dir), argv[2].split(":", 1)[1])
    elif argv[2] != "none":
        raise SystemExit(f"unknown kill point {argv[2]!r}")
    print(stages.progressive.rounds.run_progressive(cfg).message)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
