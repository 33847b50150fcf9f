"""`sparsegpt sweep` with bad input: exit 2 and one `error: ...` line naming the axis or the point, before the
flow module (and Prefect's server) is imported, and nothing written under the run root."""

from __future__ import annotations

import re
import sys

import pytest

from flows.cli import main


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], r"a sweep needs at least one --grid FIELD=V1,V2"),
        (["--grid", "method=sparsegpt,obs"], r"--grid method: 'obs' is not one of sparsegpt, wanda, magnitude"),
        (["--grid", "sparsity=0.5,1.2"], r"grid point sparsity=1\.2: sparsity must be a fraction in \[0, 1\)"),
        (["--grid", "nm=2:4,3:3"], r"grid point nm=3-3: N:M sparsity needs integers 0 < N < M"),
        (["--grid", "seqlen=32,100"], r"grid point seqlen=100: seqlen 100 is beyond the model's 64 positions"),
        (["--grid", "sparsity=0.5", "--out", "x.json"], r"--out writes one lm-eval file, not one per point"),
        (["--grid", "sparsity=0.5", "--pool", "p", "--deployment", "x"], r"--deployment must read FLOW/NAME"),
    ],
    ids=["no-grid", "bad-method", "bad-sparsity", "bad-nm", "seqlen-too-long", "out", "deployment"],
)
def test_sweep_cli_refuses_bad_input_before_prefect(tiny_llama_dir, tmp_path, capsys, monkeypatch, options, expected):
    monkeypatch.delitem(sys.modules, "flows.sweep", raising=False)
    root = tmp_path / "root"
    argv = ["sweep", str(tiny_llama_dir), "--run-root", str(root), "--nsamples", "6", "--seqlen", "32", *options]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
    assert "flows.sweep" not in sys.modules and not root.exists()
