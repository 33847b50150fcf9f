"""Data-parallel pruning (`--nproc`): 2 gloo ranks on the CPU against one process on the tiny Llama, OPT and
GPT-2 models (weights within float tolerance, masks agreeing), resuming with another rank count, and a rank
killed by SIGKILL: the others stop, the command fails in one line, and the same command finishes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.prune.check import check as check_prune
from stages.prune.oneshot import run_pipeline
from stages.prune.parallel import assign, partition
from stages.run.rundir import remove_tree
from tests.configs import run_weights as weights
from tests.configs import tiny_prune

REPO = Path(__file__).resolve().parents[3]


def assert_close_runs(one: Path, two: Path) -> None:
    """Same tensors within float tolerance (Hessians summed in another order), masks agreeing >= 99.9%."""
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    agree = total = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
        agree += int(((a[k] == 0) == (b[k] == 0)).sum())
        total += a[k].numel()
    assert agree / total >= 0.999


def test_partition_gives_each_rank_whole_shards():
    assert partition(128, 2) == [(0, 64), (64, 128)]
    assert partition(40, 2) == [(0, 16), (16, 40)]  # 3 shards: 1 and 2
    assert partition(48, 3) == [(0, 16), (16, 32), (32, 48)]
    assert partition(32, 1) == [(0, 32)]
    with pytest.raises(ValueError, match="3 ranks need 3 shards of 16 windows, there are 2"):
        partition(32, 3)


def test_assign_puts_the_largest_solves_on_the_least_loaded_rank():
    costs = {"down": 9, "gate": 4, "up": 4, "q": 1, "k": 1, "v": 1, "o": 1}
    owner = assign(costs, 2)
    load = [sum(c for n, c in costs.items() if owner[n] == r) for r in range(2)]
    assert owner["down"] == 0 and owner["gate"] == 1 and owner["up"] == 1 and max(load) - min(load) <= 1
    assert assign(costs, 1) == dict.fromkeys(costs, 0)


@pytest.mark.parametrize(
    ("arch", "flat"),
    [("llama", {}), ("opt", {}), ("gpt2", {}), ("llama", {"nm": "2:4", "wbits": 4})],
    ids=["llama", "opt", "gpt2", "llama-2:4-4bit"],
)
def test_two_ranks_prune_as_one_process_does(tiny_model_factory, tmp_path, arch, flat):
    model = tiny_model_factory(arch)
    one = run_pipeline(tiny_prune(model, tmp_path / "one", nsamples=40, cache=False, **flat))
    two = run_pipeline(tiny_prune(model, tmp_path / "two", nsamples=40, cache=False, nproc=2, **flat))
    assert_close_runs(one.root, two.root)
    rec = (two.root / "blocks" / "block_002.json").read_text()
    assert '"ranks": 2' in rec
    # the last boundary: rank 0 wrote shard 0, rank 1 shards 1-2, one manifest over the three
    assert sorted(p.name for p in (two.root / "acts" / "block_003").iterdir()) == [
        "manifest.json",
        "shard-00000.arrow",
        "shard-00001.arrow",
        "shard-00002.arrow",
    ]
    if "wbits" in flat:
        ga, gb = (load_file(str(r / "blocks" / "block_001.grid.safetensors")) for r in (one.root, two.root))
        assert ga.keys() == gb.keys() and all(torch.allclose(ga[k].float(), gb[k].float()) for k in ga)


def test_a_run_resumes_with_another_rank_count(tiny_llama_dir, tmp_path):
    ref = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "ref", nsamples=32, cache=False))
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "run", nsamples=32, cache=False)
    run_pipeline(cfg)
    for i in (1, 2):  # as if the run had stopped after block 0
        (tmp_path / "run" / "blocks" / f"block_{i:03d}.json").unlink()
    remove_tree(tmp_path / "run" / "model")
    (tmp_path / "run" / "model.json").unlink()
    run_pipeline(cfg.updated(nproc=2))
    assert_close_runs(ref.root, tmp_path / "run")
    assert '"ranks": 2' in (tmp_path / "run" / "blocks" / "block_002.json").read_text()
    assert '"ranks"' not in (tmp_path / "run" / "blocks" / "block_000.json").read_text()


def test_bad_rank_counts_are_refused_before_any_work(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--nproc 3 needs 3 shards of 16 calibration windows, the run has 2; give"):
        check_prune(tiny_prune(tiny_llama_dir, tmp_path / "a", nsamples=32, nproc=3))
    with pytest.raises(ValueError, match="--nproc 2 does not run --sequential yet"):
        check_prune(tiny_prune(tiny_llama_dir, tmp_path / "b", nsamples=32, nproc=2, sequential=True))
    with pytest.raises(ValueError, match="nproc must be a positive integer, got 0"):
        tiny_prune(tiny_llama_dir, tmp_path / "c", nproc=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda was asked for but torch sees no GPU"):
            check_prune(tiny_prune(tiny_llama_dir, tmp_path / "d", nsamples=32, nproc=2, device="cuda"))
    assert not any((tmp_path / d).exists() for d in "abcd")


DRIVER = """
import sys
from stages.prune.oneshot import run_pipeline
from tests.configs import run_weights as weights
from tests.configs import tiny_prune
if __name__ == "__main__":
    run_pipeline(tiny_prune(sys.argv[1], sys.argv[2], nsamples=32, cache=False, nproc=2))
"""


def _ranks_of(pid: int) -> list[int]:
    """The spawned rank processes of ``pid`` (not multiprocessing's resource tracker)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and b"spawn_main" in cmd:
            out.append(int(stat.parent.name))
    return sorted(out)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the ranks through /proc")
def test_a_rank_killed_stops_the_others_and_the_same_command_resumes(tiny_llama_dir, tmp_path):
    run_dir = tmp_path / "run"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(driver), str(tiny_llama_dir), str(run_dir)]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while len(ranks := _ranks_of(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
        time.sleep(0.05)
    os.kill(ranks[1], signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)  # the other rank is stopped, the driver fails
    assert proc.returncode != 0
    assert "a pruning rank failed (process 1 terminated with signal SIGKILL)" in out, out[-3000:]
    assert all(not Path(f"/proc/{r}").exists() or "Z" in Path(f"/proc/{r}/stat").read_text() for r in ranks)
    assert not (run_dir / "model.json").exists()
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, timeout=300)
    ref = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "ref", nsamples=32, cache=False))
    assert_close_runs(ref.root, run_dir)
