"""Bad input through the CLI: `flows.cli.main` returns 2 and prints one `error: ...` line, before
Prefect (the flow modules) is imported, and nothing is written that the corrected command could not use.
Options the config rejects, and what `check` reads from the model's files and the run directory."""

from __future__ import annotations

import re
import shutil
import sys

import pytest
import torch

from flows.cli import main
from stages.prune.oneshot import prepare
from tests.stages.prune.test_bad_input import tiny_cfg


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--sparsity", "1.0"], r"sparsity must be a fraction in \[0, 1\) \(e\.g\. 0\.5\), got 1\.0"),
        (["--sparsity", "-0.1"], r"sparsity must be a fraction in \[0, 1\)"),
        (["--nm", "3:3"], r"N:M sparsity needs integers 0 < N < M \(e\.g\. 2:4 or 4:8\), got 3:3"),
        (["--nm", "2-4"], r"N:M must look like 2:4 or 4:8, got '2-4'"),
        (["--nm", "2:6", "--blocksize", "16"], r"blocksize \(16\) must be a multiple of M=6 .*use blocksize 128"),
        (["--calib", "wikitext3"], r"unknown dataset 'wikitext3' .*Use NAME \(hub\) or NAME=PATH"),
        (
            ["--calib", "text=/no/such/corpus.txt"],
            r"dataset file not found: '/no/such/corpus.txt'.*Pass an existing file",
        ),
        (["--nsamples", "0"], r"nsamples must be a positive integer, got 0"),
        (
            ["--tasks", "piqa=/no/such.jsonl"],
            r"task file for piqa not found: /no/such.jsonl; pass piqa=PATH to valid.jsonl",
        ),
        (["--tasks", "boolq,mmlu"], r"unknown task 'mmlu'; choose one of lambada, piqa, arc_easy"),
        (["--limit", "0"], r"task_limit \(--limit\) must be a positive integer, got 0"),
        (["--reconstruct", "--reconstruct-epochs", "0"], r"reconstruct_epochs must be a positive integer, got 0"),
        (["--reconstruct-lr=-1e-4"], r"reconstruct_lr must be a positive learning rate \(e\.g\. 1e-4\), got -"),
        (["--reconstruct", "--wbits", "4"], r"--reconstruct trains the weights off --wbits' quantization grid"),
        (["--kernel", "triton"], r"--kernel triton runs on a GPU: add --device cuda, or use --kernel torch"),
        (["--kernel", "triton", "--wbits", "4"], r"--kernel triton runs the SparseGPT solve without --wbits"),
    ],
    ids=[
        "sparsity-1",
        "sparsity-negative",
        "nm-3:3",
        "nm-syntax",
        "nm-blocksize",
        "unknown-dataset",
        "missing-dataset-file",
        "nsamples-0",
        "missing-task-file",
        "unknown-task",
        "limit-0",
        "reconstruct-epochs-0",
        "reconstruct-lr-negative",
        "reconstruct-wbits",
        "kernel-on-cpu",
        "kernel-wbits",
    ],
)
def test_cli_rejects_bad_options_in_one_line(tiny_llama_dir, tmp_path, capsys, options, expected) -> None:
    run_dir = tmp_path / "run"
    code = main(["prune", str(tiny_llama_dir), "--run-dir", str(run_dir), "--no-progress", *options])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out == ""
    assert re.search(expected, err), err
    assert not run_dir.exists()  # nothing started: the corrected command can use the same run dir


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        ("missing", [], r"model path .*nope does not exist; pass an existing directory"),
        ("llama", ["--seqlen", "100"], r"seqlen 100 is beyond the model's 64 positions; use --seqlen 64 or less"),
        ("llama", ["--nm", "2:5", "--blocksize", "20"], r"--nm 2:5 does not fit the model: its hidden size 32"),
        ("other-run", [], r"holds a run with different options: calib\.nsamples: 7 \(run dir\) != 6"),
        ("foreign-dir", [], r"run dir .*run is not empty and holds no run\.json \(it has notes\.txt\).*new or empty"),
        ("no-disk", [], r"not enough free disk for .*run: the run needs about 0\.\d\d GiB more, .* has 0\.00 GiB free"),
        ("llama", ["--device", "cuda"], r"--device cuda was asked for but torch sees no GPU; use --device cpu"),
    ],
    ids=["missing-model", "seqlen-too-long", "nm-width", "run-dir-of-another-run", "foreign-dir", "no-disk", "no-gpu"],
)
def test_cli_checks_the_model_and_run_dir_before_prefect_starts(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, model, options, expected
) -> None:
    """What the model's files and the run directory show is refused by `check` in the CLI process,
    before the flow module (and so Prefect's server) is imported."""
    run_dir = tmp_path / "run"
    if model == "other-run":
        prepare(tiny_cfg(tiny_llama_dir, run_dir, nsamples=7))
    if model == "foreign-dir":
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("not a run")
    if model == "no-disk":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 4096))
    if "--device" in options and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = (run_dir / "run.json").read_bytes() if (run_dir / "run.json").exists() else None
    monkeypatch.delitem(sys.modules, "flows.oneshot", raising=False)
    path = tmp_path / "nope" if model == "missing" else tiny_llama_dir
    code = main(["prune", str(path), "--run-dir", str(run_dir), "--nsamples", "6", "--seqlen", "32", *options])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(expected, err), err
    assert "flows.oneshot" not in sys.modules
    if model == "foreign-dir":
        assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    else:
        assert (run_dir / "run.json").read_bytes() == before if before else not run_dir.exists()


@pytest.mark.parametrize(
    ("command", "options", "expected"),
    [
        ("eval", ["MISSING", "--eval", "pydoc"], r"model path .*nope does not exist"),
        ("eval", ["LLAMA", "--eval", "pydoc", "--seqlen", "65"], r"eval_seqlen 65 is beyond the model's 64 positions"),
        ("progressive", ["MISSING", "--run-dir", "RUN"], r"model path .*nope does not exist"),
        ("progressive", ["LLAMA", "--run-dir", "RUN", "--seqlen", "65"], r"seqlen 65 is beyond the model's 64"),
        (
            "progressive",
            ["LLAMA", "--run-dir", "RUN", "--seqlen", "32", "--schedule", "2:5", "--blocksize", "20"],
            r"--nm 2:5 does not fit the model: its hidden size 32",
        ),
        ("progressive", ["LLAMA", "--run-dir", "OTHER", "--seqlen", "32"], r"holds a run with different options: sch"),
    ],
    ids=["eval-missing-model", "eval-seqlen", "prog-missing-model", "prog-seqlen", "prog-nm-width", "prog-other-run"],
)
def test_cli_eval_and_progressive_check_before_prefect_starts(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, command, options, expected
) -> None:
    other = tmp_path / "other"
    if "OTHER" in options:
        from stages.progressive.config import ProgressiveConfig
        from stages.run.identity import init_run

        prior = ProgressiveConfig.of(model=str(tiny_llama_dir), run_dir=str(other), schedule="0.5,0.6", seqlen=32)
        init_run(other, prior.identity(), {}, options={})
    names = {"MISSING": tmp_path / "nope", "LLAMA": tiny_llama_dir, "RUN": tmp_path / "run", "OTHER": other}
    flow_module = {"eval": "flows.evaluate", "progressive": "flows.progressive"}[command]
    monkeypatch.delitem(sys.modules, flow_module, raising=False)
    code = main([command, *(str(names.get(o, o)) for o in options)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(expected, err), err
    assert flow_module not in sys.modules
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], r"nothing to evaluate: give at least one --eval SPEC or --tasks SPEC\[,SPEC\.\.\.\]"),
        (["--tasks", "boolq=/no/b.jsonl,piqa"], r"task file for boolq not found: /no/b.jsonl"),
        (["--tasks", "boolq", "--tasks", "boolq"], r"task names must be unique, got \['boolq', 'boolq'\]"),
        (["--tasks", "boolq", "--limit", "-1"], r"task_limit \(--limit\) must be a positive integer, got -1"),
        (["--eval", "wikitext3"], r"unknown dataset 'wikitext3'"),
    ],
    ids=["nothing", "missing-task-file", "task-twice", "limit-negative", "unknown-dataset"],
)
def test_cli_eval_rejects_bad_requests_in_one_line(tiny_llama_dir, capsys, options, expected) -> None:
    code = main(["eval", str(tiny_llama_dir), *options])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err
