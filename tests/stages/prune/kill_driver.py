"""Run the one-shot pipeline in a subprocess and SIGKILL it at a precise point.

    python tests/stages/prune/kill_driver.py CONFIG_JSON KILLPOINT [EVENTS_FILE]

CONFIG_JSON is a `PruneConfig` as JSON. KILLPOINT is one of

- `none`: run to the end;
- `after:REL`: SIGKILL right after the atomic write of `RUN_DIR/REL` is renamed into place;
- `before:REL`: SIGKILL after `RUN_DIR/REL` is written to its temporary name, before the rename;
- `assemble`: SIGKILL inside `stages.model.assemble` while its first weight file is half written;
- `hold:I`: when block I starts pruning, create `RUN_DIR/.holding` and sleep (for lock tests);
- `train:I:S`: SIGKILL inside block I's reconstruction (`--reconstruct`), after its S-th optimizer step.

The kill is a real `os.kill(os.getpid(), SIGKILL)`: no cleanup handler, `finally` or
flush runs. Activation shards hold `SAMPLES_PER_SHARD = 2` samples in every mode, so a
block boundary spans several shards. When EVENTS_FILE is given, each piece of work
that actually runs (calibrate, capture, prune I, forward block_J, assemble, kill) is
appended to it as a line, unbuffered, so the test can tell what a resumed run redid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import stages.data.calibration  # noqa: E402
import stages.model.assemble  # noqa: E402
import stages.model.blocks  # noqa: E402
import stages.prune.oneshot as oneshot  # noqa: E402
import stages.prune.streams as streams  # noqa: E402
import stages.run.rundir  # noqa: E402
import stages.run.shards  # noqa: E402
from stages.config import PruneConfig  # noqa: E402

SAMPLES_PER_SHARD = 2
_events: Path | None = None


def event(line: str) -> None:
    if _events is not None:
        fd = os.open(_events, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def die(where: str) -> None:
    event(f"kill {where}")
    os.kill(os.getpid(), signal.SIGKILL)


def traced(name: str, fn, label):
    """Wrap `fn` so that each call appends `label(*args)` to the events file."""

    def wrapper(*args, **kwargs):
        event(label(*args, **kwargs))
        return fn(*args, **kwargs)

    wrapper.__name__ = name
    return wrapper


def install_tracing() -> None:
    oneshot.sample_calibration = traced("sample_calibration", oneshot.sample_calibration, lambda *a, **k: "calibrate")
    streams.capture_inputs = traced("capture_inputs", streams.capture_inputs, lambda *a, **k: "capture")
    oneshot.prune_block = traced("prune_block", oneshot.prune_block, lambda *a, **k: f"prune {block_index(a, k)}")
    oneshot.prune_block_sequential = traced(
        "prune_block_sequential", oneshot.prune_block_sequential, lambda *a, **k: f"prune {block_index(a, k)}"
    )
    forward = traced("forward_to_shards", streams.forward_to_shards, lambda *a, **k: f"forward {Path(a[3]).name}")
    streams.forward_to_shards = forward
    oneshot.assemble = traced("assemble", oneshot.assemble, lambda *a, **k: "assemble")


def install_atomic_kill(run_dir: Path, when: str, rel: str) -> None:
    """Kill around the rename of `run_dir/rel` in every module that writes atomically."""
    real = stages.run.rundir.atomic_path
    target = (run_dir / rel).resolve()

    @contextlib.contextmanager
    def atomic_path(path):
        hit = Path(path).resolve() == target
        if hit and when == "before":
            with real(path) as tmp:
                yield tmp
                die(f"before {rel}")  # tmp written, rename not done
            return
        with real(path) as tmp:
            yield tmp
        if hit:
            die(f"after {rel}")

    for module in (stages.run.rundir, stages.run.shards, stages.model.blocks, stages.data.calibration):
        module.atomic_path = atomic_path


def install_assemble_kill() -> None:
    """Kill in the middle of the first weight file: its header and first unit are written, the rest is not."""
    real = stages.model.assemble._stream_safetensors

    def stream(path, units):
        def dying_load(unit=units[-1]):
            die(f"assemble {Path(path).parent.name}/{Path(path).name}")

        if len(units) > 1:
            units = [*units[:-1], stages.model.assemble.Unit(units[-1].layout, dying_load)]
        real(path, units)
        die(f"assemble {Path(path).parent.name}/{Path(path).name}")

    stages.model.assemble._stream_safetensors = stream


def block_index(args: tuple, kwargs: dict) -> int:
    """The block `prune_block(block, batches, kwargs, cfg, sparsity, prefix)` prunes, from `model.layers.3.`."""
    prefix = kwargs["prefix"] if "prefix" in kwargs else args[5]
    return int(prefix.rstrip(".").rsplit(".", 1)[-1])


def install_hold(run_dir: Path, block: int) -> None:
    real = oneshot.prune_block

    def prune_block(*args, **kwargs):
        if block_index(args, kwargs) == block:
            stages.run.rundir.atomic_write_text(run_dir / ".holding", str(os.getpid()))
            time.sleep(120)
        return real(*args, **kwargs)

    oneshot.prune_block = prune_block


def install_train_kill(block: int, steps: int) -> None:
    """Kill after the `steps`-th optimizer step of block `block`'s reconstruction (Adam is used nowhere else)."""
    import torch

    real_step = torch.optim.Adam.step
    state = {"current": -1, "steps": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        state["steps"] += 1
        if state["current"] == block and state["steps"] == steps:
            die(f"train {block}:{steps}")
        return out

    real_prune = oneshot.prune_block

    def prune_block(*args, **kwargs):
        state["current"], state["steps"] = block_index(args, kwargs), 0
        return real_prune(*args, **kwargs)

    oneshot.prune_block = prune_block
    torch.optim.Adam.step = step


def main(argv: list[str]) -> int:
    global _events
    cfg = PruneConfig.from_dict(json.loads(argv[1]))
    killpoint = argv[2]
    _events = Path(argv[3]) if len(argv) > 3 else None
    run_dir = Path(cfg.run_dir)
    streams.SAMPLES_PER_SHARD = SAMPLES_PER_SHARD
    install_tracing()
    if killpoint.startswith(("after:", "before:")):
        when, rel = killpoint.split(":", 1)
        install_atomic_kill(run_dir, when, rel)
    elif killpoint == "assemble":
        install_assemble_kill()
    elif killpoint.startswith("hold:"):
        install_hold(run_dir, int(killpoint.split(":", 1)[1]))
    elif killpoint.startswith("train:"):
        _, block, steps = killpoint.split(":")
        install_train_kill(int(block), int(steps))
    elif killpoint != "none":
        raise SystemExit(f"unknown kill point {killpoint!r}")
    oneshot.run_pipeline(cfg)
    event("done")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
