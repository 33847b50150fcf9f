"""The sweep flow without a work pool: points as subflows, the dense evaluation done once, a failed point
listed while the others finish, and a rerun that runs only what did not finish."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flows.sweep import sweep
from stages.prune import oneshot as st
from stages.run.rundir import RunError, RunLock
from stages.sweep.config import SweepConfig, points

GRID = ("method=sparsegpt,magnitude", "sparsity=0.5,0.6")


def sweep_cfg(model: Path, root: Path, *grid: str, **flat: object) -> SweepConfig:
    base = dict(calib="pydoc", nsamples=6, seqlen=32, blocksize=16, progress=False, eval=("pydoc",), eval_windows=2)
    return SweepConfig.of(model=str(model), run_root=str(root), grid=grid, **{**base, **flat})


def dense_records(cfg: SweepConfig) -> list[dict]:
    out = []
    for p in points(cfg):
        (path,) = (p.run_dir / "eval").glob("dense-*.json")
        out.append({k: v for k, v in json.loads(path.read_text()).items() if k != "files"})
    return out


def test_grid_runs_as_subflows_with_one_dense_evaluation_and_reruns_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_EVAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SPARSEGPT_CALIB_CACHE", str(tmp_path / "calib"))
    cfg = sweep_cfg(tiny_llama_dir, tmp_path / "sweep", *GRID)
    out = sweep(cfg)
    names = [p.name for p in points(cfg)]
    assert [p["name"] for p in out["points"]] == names
    assert all(p["state"] == "finished" and not p["skipped"] for p in out["points"])
    metrics = {n: json.loads((tmp_path / "sweep" / n / "eval" / "metrics.json").read_text()) for n in names}
    assert {round(m["sparsity"]["overall"], 1) for m in metrics.values()} == {0.5, 0.6}
    # the dense evaluation ran once: one cache entry, and every point holds the very same record (its timing too)
    assert len(list((tmp_path / "cache").glob("ppl-*.json"))) == 1
    dense = dense_records(cfg)
    assert all(d == dense[0] for d in dense) and dense[0]["seconds"] > 0
    # calibration windows sampled once: every point's tokens are links to one file (block-0 inputs likewise)
    assert len({(tmp_path / "sweep" / n / "calib" / "tokens.arrow").stat().st_ino for n in names}) == 1
    assert len({(tmp_path / "sweep" / n / "acts" / "layer_kwargs.safetensors").stat().st_ino for n in names}) == 1
    report = tmp_path / "sweep" / "report"
    comparison = (report / "comparison.md").read_text()
    assert all(n in comparison for n in names)
    table = (report / "sweep.md").read_text()
    assert all(f"| {n} | finished | pydoc " in table for n in names)
    stored = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert SweepConfig.from_dict(stored["config"]) == cfg and len(stored["points"]) == 4

    stamps = {n: (tmp_path / "sweep" / n / "eval" / "metrics.json").stat().st_mtime_ns for n in names}
    again = sweep(cfg)
    assert all(p["state"] == "finished" and p["skipped"] for p in again["points"])
    assert stamps == {n: (tmp_path / "sweep" / n / "eval" / "metrics.json").stat().st_mtime_ns for n in names}


def test_a_failed_point_is_listed_the_others_finish_and_a_rerun_retries_it(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEGPT_EVAL_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "sweep"
    cfg = sweep_cfg(tiny_llama_dir, root, "sparsity=0.5,0.6,0.7")
    assemble = st.assemble_model

    def full_disk_at_06(point_cfg, run):  # noqa: ANN001, ANN202
        if Path(point_cfg.run_dir).name == "sparsity=0.6":
            raise RunError("disk full while writing model/; free space and rerun")
        return assemble(point_cfg, run)

    monkeypatch.setattr(st, "assemble_model", full_disk_at_06)
    with pytest.raises(RunError, match=r"1 of 3 points failed \(sparsity=0.6\); see .*sweep.md"):
        sweep(cfg)
    table = (root / "report" / "sweep.md").read_text()
    assert "| sparsity=0.5 | finished | pydoc " in table and "| sparsity=0.7 | finished | pydoc " in table
    assert "| sparsity=0.6 | failed | - | disk full while writing model/; free space and rerun |" in table
    stored = json.loads((root / "sweep.json").read_text())
    assert [p["state"] for p in stored["points"]] == ["finished", "failed", "finished"]

    monkeypatch.setattr(st, "assemble_model", assemble)
    out = sweep(cfg)
    assert [(p["state"], p["skipped"]) for p in out["points"]] == [
        ("finished", True),
        ("finished", False),
        ("finished", True),
    ]


def test_a_point_whose_folder_is_taken_stops_the_sweep_before_anything_runs(tiny_llama_dir, tmp_path):
    root = tmp_path / "sweep"
    (root / "sparsity=0.6").mkdir(parents=True)
    (root / "sparsity=0.6" / "notes.txt").write_text("not a run directory")
    with pytest.raises(RunError, match="grid point sparsity=0.6: run dir .* is not empty and holds no run.json"):
        sweep(sweep_cfg(tiny_llama_dir, root, "sparsity=0.5,0.6"))
    assert not (root / "sparsity=0.5").exists()


def test_a_second_sweep_on_the_same_run_root_is_refused(tiny_llama_dir, tmp_path):
    cfg = sweep_cfg(tiny_llama_dir, tmp_path / "sweep", "sparsity=0.5,0.6")
    with RunLock(tmp_path / "sweep"), pytest.raises(RunError, match="is in use by another process"):
        sweep(cfg)
    assert not (tmp_path / "sweep" / "sparsity=0.5").exists()


def test_a_bad_point_stops_the_sweep_before_anything_runs(tiny_llama_dir, tmp_path):
    cfg = sweep_cfg(tiny_llama_dir, tmp_path / "sweep", "method=sparsegpt,wanda", "wbits=16,4")
    with pytest.raises(ValueError, match="grid point method=wanda_wbits=4: --wbits"):
        sweep(cfg)
    assert not (tmp_path / "sweep").exists()
