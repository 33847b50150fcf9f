"""Resume after a real SIGKILL, at several points, gives the weights of an uninterrupted run.

Each run is a subprocess (`kill_driver.py`) that prunes a tiny Llama and kills itself
with SIGKILL at a precise point. One run directory goes through a chain of killed runs,
each the same command as the last (only the kill point differs, and it acts only at the
moment of the kill):

    A  killed during capture (first shard of acts/block_000 written, no manifest)
    B  killed mid-block (block 1 solved, acts/block_002 half written, no block_001.json)
    C  killed between blocks (right after blocks/block_001.json)
       -> a shard of the latest activations, acts/block_002, is then truncated
    D  killed during assembly (a weight file written in the temporary model folder)
    E  runs to the end

After each kill the next run must redo exactly the unfinished work (checked through
the events the driver logs and the mtimes of the done-records), and E's model must be
bit-identical to an uninterrupted run's. A last test checks the run-directory lock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.config import PruneConfig
from stages.prune.oneshot import run_pipeline
from stages.run.rundir import RunError, RunLock
from tests.configs import tiny_prune

DRIVER = Path(__file__).with_name("kill_driver.py")
REPO = DRIVER.parents[3]


def config(model_dir: Path, run_dir: Path) -> PruneConfig:
    return tiny_prune(model_dir, run_dir, batch_size=2)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}


def start(cfg: PruneConfig, killpoint: str, events: Path | None = None) -> subprocess.Popen:
    args = [sys.executable, str(DRIVER), json.dumps(cfg.to_dict()), killpoint]
    args += [str(events)] if events is not None else []
    return subprocess.Popen(args, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 180) -> tuple[int, str]:
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def leftovers(root: Path) -> list[str]:
    """Temporary files and folders a killed writer may leave (`.x.tmp-PID`, `.trash-...`)."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if ".tmp-" in p.name or p.name.startswith(".trash-")
    )


@dataclass
class Step:
    """What one driver run did and left behind."""

    killpoint: str
    returncode: int
    output: str
    events: list[str]
    files: set[str]
    """Every path under the run directory after the run, relative."""
    records: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    """Done-records after the run: relative path -> (mtime_ns, content)."""


def snapshot_records(root: Path) -> dict[str, tuple[int, bytes]]:
    paths = [root / "calib" / "tokens.json", root / "acts" / "layer_kwargs.json", root / "model.json"]
    paths += sorted((root / "blocks").glob("*.json"))
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) for p in paths if p.exists()}


CHAIN = [
    ("A", "after:acts/block_000/shard-00000.arrow"),
    ("B", "before:acts/block_002/shard-00001.arrow"),
    ("C", "after:blocks/block_001.json"),
    ("D", "assemble"),
    ("E", "none"),
]
TRUNCATED = "acts/block_002/shard-00001.arrow"


@pytest.fixture(scope="module")
def chain(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The uninterrupted reference (run alongside) and the chain of killed runs A..E on one run dir."""
    base = tmp_path_factory.mktemp("resume")
    reference = start(config(tiny_llama_dir, base / "reference"), "none")
    cfg = config(tiny_llama_dir, base / "run")
    root = Path(cfg.run_dir)
    steps: dict[str, Step] = {}
    for name, killpoint in CHAIN:
        events = base / f"events-{name}.txt"
        code, out = finish(start(cfg, killpoint, events))
        lines = events.read_text().splitlines() if events.exists() else []
        files = {str(p.relative_to(root)) for p in root.rglob("*")}
        steps[name] = Step(killpoint, code, out, lines, files, snapshot_records(root))
        if name == "C":  # corrupt the latest activations while no run is active
            shard = root / TRUNCATED
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    code, out = finish(reference)
    assert code == 0, out
    return {"root": root, "steps": steps, "reference": model_tensors(base / "reference" / "model")}


def killed(step: Step) -> None:
    assert step.returncode == -signal.SIGKILL, step.output
    assert step.events[-1].startswith("kill "), step.events


def unchanged(before: Step, after: Step, names: list[str]) -> None:
    """Done-records of finished work keep their mtime and content through a later run."""
    for n in names:
        assert n in before.records, n
        assert after.records[n] == before.records[n], f"{n} was rewritten"


def test_kill_during_capture(chain: dict) -> None:
    a, b = chain["steps"]["A"], chain["steps"]["B"]
    killed(a)
    assert a.events == ["calibrate", "capture", "kill after acts/block_000/shard-00000.arrow"]
    assert "acts/block_000/shard-00000.arrow" in a.files and "acts/block_000/manifest.json" not in a.files
    assert "acts/layer_kwargs.json" not in a.files and not any(f.startswith("blocks/") for f in a.files)
    # B: calibration is not redone, the half-written capture is.
    assert b.events[:2] == ["capture", "prune 0"]
    unchanged(a, b, ["calib/tokens.json"])


def test_kill_mid_block(chain: dict) -> None:
    b, c = chain["steps"]["B"], chain["steps"]["C"]
    killed(b)
    assert b.events == [
        "capture",
        "prune 0",
        "forward block_001",
        "prune 1",
        "forward block_002",
        "kill before acts/block_002/shard-00001.arrow",
    ]
    assert {"blocks/block_000.json", "acts/block_002/shard-00000.arrow"} <= b.files
    assert "blocks/block_001.json" not in b.files and "acts/block_002/manifest.json" not in b.files
    assert any(".shard-00001.arrow.tmp-" in f for f in b.files)  # the kill left a temp file
    # C resumes at block 1: nothing before it is recomputed.
    assert c.events[:2] == ["prune 1", "forward block_002"]
    unchanged(b, c, ["calib/tokens.json", "acts/layer_kwargs.json", "blocks/block_000.json"])


def test_kill_between_blocks_then_truncated_shard_is_redone(chain: dict) -> None:
    c, d = chain["steps"]["C"], chain["steps"]["D"]
    killed(c)
    assert c.events == ["prune 1", "forward block_002", "kill after blocks/block_001.json"]
    assert "acts/block_002/manifest.json" in c.files
    assert not any(".tmp-" in f for f in c.files)  # B's temp shard was swept
    # D: block 1 is not pruned again; the truncated acts/block_002 is rebuilt from
    # acts/block_001 through the pruned block 1, never read as it was.
    assert d.events[:4] == ["forward block_002", "prune 2", "forward block_003", "assemble"]
    unchanged(c, d, ["calib/tokens.json", "acts/layer_kwargs.json", "blocks/block_000.json", "blocks/block_001.json"])


def test_kill_during_assembly(chain: dict) -> None:
    d, e = chain["steps"]["D"], chain["steps"]["E"]
    killed(d)
    assert d.events[-1].startswith("kill assemble .model.tmp-")
    assert "model.json" not in d.files and "model/config.json" not in d.files
    assert any(f.startswith(".model.tmp-") for f in d.files)
    # E only assembles: no block is pruned or forwarded again.
    assert e.events == ["assemble", "done"]
    unchanged(d, e, [f"blocks/block_00{i}.json" for i in range(3)])


def test_resumed_weights_are_identical_and_nothing_is_left_behind(chain: dict) -> None:
    e = chain["steps"]["E"]
    assert e.returncode == 0, e.output
    ours, ref = model_tensors(chain["root"] / "model"), chain["reference"]
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert leftovers(chain["root"]) == []


def test_second_process_is_locked_out(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """A run holding the run dir (inside block 1) keeps run_pipeline out; SIGKILL frees it."""
    cfg = config(tiny_llama_dir, tmp_path / "run")
    proc = start(cfg, "hold:1")
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / ".holding").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the driver never reached block 1"
            time.sleep(0.1)
        with pytest.raises(RunError, match=rf"run dir .* is in use by another process \(pid {proc.pid} "):
            run_pipeline(cfg)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with RunLock(cfg.run_dir):  # the kernel dropped the killed holder's lock
        pass


def ends_like_the_reference(reference: subprocess.Popen, root: Path, reference_dir: Path) -> None:
    """The uninterrupted run finishes; the resumed run's model equals its bit for bit, no temporary file left."""
    code, out = finish(reference)
    assert code == 0, out
    ours, ref = model_tensors(root / "model"), model_tensors(reference_dir / "model")
    assert ours.keys() == ref.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert leftovers(root) == []


@pytest.mark.parametrize("target", ["dense-stream", "dense-block"])
def test_kill_inside_reconstruction_resumes_that_block_identically(
    tiny_llama_dir: Path, tmp_path: Path, target: str
) -> None:
    """SIGKILL after block 1's third training step: its targets are on disk, its record is not. The next run
    redoes block 1 from its start (solve and training, reusing the complete targets) and ends with the
    weights of an uninterrupted run."""

    def cfg(run_dir: Path) -> PruneConfig:
        return tiny_prune(
            tiny_llama_dir,
            run_dir,
            batch_size=2,
            reconstruct=True,
            reconstruct_target=target,
            reconstruct_epochs=2,
            reconstruct_batch_size=2,
        )

    reference = start(cfg(tmp_path / "reference"), "none")
    root = tmp_path / "run"
    first = tmp_path / "events-1.txt"
    code, out = finish(start(cfg(root), "train:1:3", first))
    assert code == -signal.SIGKILL, out
    assert first.read_text().splitlines()[-1] == "kill train 1:3"
    assert (root / "blocks" / "block_000.json").is_file() and not (root / "blocks" / "block_001.json").exists()
    targets = root / ("dense/block_002" if target == "dense-stream" else "recon/target_001")
    assert (targets / "manifest.json").is_file()
    second = tmp_path / "events-2.txt"
    code, out = finish(start(cfg(root), "none", second))
    assert code == 0, out
    events = second.read_text().splitlines()
    # block 1's complete targets were reused: nothing is forwarded before its solve
    assert events[0] == "prune 1" and "prune 0" not in events
    ends_like_the_reference(reference, root, tmp_path / "reference")


def test_kill_inside_a_sequential_pass_resumes_identically(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """`--sequential` writes block 1's outputs from its one pass: SIGKILL after the second of its three shards,
    and the next run redoes block 1 (its pass and solves) and ends with an uninterrupted run's weights."""

    def cfg(run_dir: Path) -> PruneConfig:
        return tiny_prune(tiny_llama_dir, run_dir, batch_size=2, sequential=True)

    reference = start(cfg(tmp_path / "reference"), "none")
    root = tmp_path / "run"
    code, out = finish(start(cfg(root), "after:acts/block_002/shard-00001.arrow"))
    assert code == -signal.SIGKILL, out
    assert (root / "acts/block_002/shard-00001.arrow").is_file() and not (
        root / "acts/block_002/manifest.json"
    ).exists()
    assert not (root / "blocks" / "block_001.json").exists()
    events = tmp_path / "events.txt"
    code, out = finish(start(cfg(root), "none", events))
    assert code == 0, out
    assert [e for e in events.read_text().splitlines() if e.startswith("prune")] == ["prune 1", "prune 2"]
    ends_like_the_reference(reference, root, tmp_path / "reference")
