"""`kill PID` (SIGTERM) ends a CLI run as Ctrl-C does: exit 143 with one line, Prefect's temporary server
stopped with it (it used to outlive the run), and the same command resumes the run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import tiny_config, tiny_tokenizer
from tests.flows.test_cli_server import gone, servers

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the server's process in /proc")
def test_sigterm_ends_a_run_like_ctrl_c_and_stops_the_temporary_server(tmp_path):
    model_dir = tmp_path / "deep-llama"  # 40 blocks, so the run is still inside its flow when the signal lands
    config = tiny_config("llama")
    config.num_hidden_layers = 40
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    home = str(tmp_path / "prefect-home")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}  # the CLI starts its own server
    env |= {"PREFECT_HOME": home, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "flows.cli", "prune", str(model_dir), "--run-dir", str(run_dir)]
    cmd += ["--calib", "pydoc", "--nsamples", "2", "--seqlen", "16", "--blocksize", "16", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while not (run_dir / "blocks" / "block_000.json").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run did not reach its first block"
        time.sleep(0.02)
    assert servers(home), "the CLI did not start a temporary Prefect server"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "terminated; rerun the same command to resume" in err.splitlines()  # then the server's stop line
    assert not (run_dir / "blocks" / "block_039.json").exists()
    assert gone(home), "Prefect's temporary server outlived the run"
    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (run_dir / "model" / "config.json").is_file()
