"""A sweep's grid: every combination becomes a checked one-shot config under the run root; bad axes fail
before anything runs with a line naming the axis; a point counts as finished only for its own settings."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from stages.config import PruneConfig
from stages.config.tree import to_flat
from stages.sweep.config import SweepConfig, points
from stages.sweep.summary import DONE, FAILED, Outcome, finished, sweep_markdown


def sweep_cfg(tmp_path: Path, *grid: str, **flat: object) -> SweepConfig:
    return SweepConfig.of(model="m", run_root=str(tmp_path / "root"), grid=grid, nsamples=6, seqlen=32, **flat)


def test_grid_expands_to_every_combination_with_typed_values(tmp_path):
    cfg = sweep_cfg(tmp_path, "method=sparsegpt,wanda", "sparsity=0.5,0.7", "owl=off,on", percdamp=0.05)
    pts = points(cfg)
    assert [p.name for p in pts][:3] == [
        "method=sparsegpt_sparsity=0.5_owl=off",
        "method=sparsegpt_sparsity=0.5_owl=on",
        "method=sparsegpt_sparsity=0.7_owl=off",
    ]
    assert len(pts) == 8 and len({p.name for p in pts}) == 8
    last = pts[-1].cfg
    assert isinstance(last, PruneConfig)
    assert (last.solver.method, last.solver.sparsity, last.solver.owl) == ("wanda", 0.7, True)
    assert last.solver.percdamp == 0.05 and last.calib.nsamples == 6 and last.model == "m"  # shared settings kept
    assert Path(last.run_dir) == (tmp_path / "root" / pts[-1].name).resolve()
    # apart from the swept leaves and the run directory, a point is the base config
    a, b = to_flat(pts[0].cfg), to_flat(cfg.base())
    assert {k for k in a if a[k] != b[k]} == {"run_dir"}  # the first point takes every axis' default


def test_nm_model_and_none_values_make_safe_folder_names(tmp_path):
    cfg = sweep_cfg(tmp_path, "nm=none,2:4", "model=/models/llama-7b,org/qwen")
    pts = points(cfg)
    assert [p.name for p in pts] == [
        "nm=none_model=llama-7b",
        "nm=none_model=qwen",
        "nm=2-4_model=llama-7b",
        "nm=2-4_model=qwen",
    ]
    assert pts[0].cfg.solver.nm is None and pts[2].cfg.solver.nm == "2:4" and pts[1].cfg.model == "org/qwen"


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ((), "a sweep needs at least one --grid FIELD=V1,V2"),
        (("method=sparsegpt,optimal",), "--grid method: 'optimal' is not one of sparsegpt, wanda, magnitude"),
        (("sparsity=0.5,lots",), "--grid sparsity: 'lots' is not a number"),
        (("sparsity=0.5,1.5",), "grid point sparsity=1.5: sparsity must be a fraction in [0, 1)"),
        (("owl=maybe",), "--grid owl: 'maybe' is not on/off"),
        (("sparsty=0.5",), "--grid sparsty: no such prune option"),
        (("run_dir=a,b",), "--grid run_dir: no such prune option"),
        (("sparsity",), "must read FIELD=V1,V2"),
        (("sparsity=0.5", "sparsity=0.6"), "--grid sparsity is given twice"),
        (("sparsity=0.5,0.50",), "a value is repeated"),
        (("eval=pydoc,wikitext2",), "a list-valued option cannot be swept"),
        (("method=wanda,magnitude", "wbits=4"), "grid point method=wanda_wbits=4: --wbits"),
    ],
)
def test_bad_grid_is_refused_naming_the_axis(tmp_path, grid, message):
    with pytest.raises(ValueError) as err:
        points(sweep_cfg(tmp_path, *grid))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_sweep_config_refuses_one_out_file_and_a_bad_deployment(tmp_path):
    with pytest.raises(ValueError, match="--out writes one lm-eval file, not one per point; drop it"):
        sweep_cfg(tmp_path, "sparsity=0.5", out=str(tmp_path / "x.json"))
    with pytest.raises(ValueError, match="--deployment must read FLOW/NAME"):
        sweep_cfg(tmp_path, "sparsity=0.5", pool="p", deployment="oneshot")


def test_sweep_config_round_trips_as_a_deployment_parameter(tmp_path):
    cfg = sweep_cfg(tmp_path, "method=sparsegpt,wanda", "sparsity=0.5,0.6", pool="p", eval=("pydoc",))
    again = SweepConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def _metrics(point_cfg: PruneConfig) -> None:
    out = Path(point_cfg.run_dir) / "eval" / "metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pydoc": {"ppl": 9.0, "dense_ppl": 8.0}, "config": to_flat(point_cfg)}))


def test_a_point_is_finished_only_for_its_own_settings_and_export(tmp_path):
    p = points(sweep_cfg(tmp_path, "sparsity=0.5,0.6", eval=("pydoc",)))[0]
    assert not finished(p)
    _metrics(p.cfg)
    assert finished(p)
    other_eval = replace(p, cfg=p.cfg.updated(eval_windows=3))
    other_solve = replace(p, cfg=p.cfg.updated(percdamp=0.1))
    other_runtime = replace(p, cfg=p.cfg.updated(batch_size=2, progress=True))
    assert not finished(other_eval) and not finished(other_solve) and finished(other_runtime)
    exported = replace(p, cfg=p.cfg.updated(export="hf"))
    assert not finished(exported)
    (p.run_dir / "export-hf").mkdir()
    (p.run_dir / "export-hf" / "export.json").write_text("{}")
    assert finished(exported)
    (p.run_dir / "eval" / "metrics.json").write_text("{not json")  # a torn file: the point runs again
    assert not finished(p)


def test_sweep_markdown_lists_every_point_and_why_one_failed(tmp_path):
    cfg = sweep_cfg(tmp_path, "sparsity=0.5,0.6")
    a, b = points(cfg)
    _metrics(a.cfg)
    text = sweep_markdown(
        cfg,
        [Outcome(a.name, str(a.run_dir), DONE), Outcome(b.name, str(b.run_dir), FAILED, "disk full | no space")],
    )
    assert f"| {a.name} | finished | pydoc 9.00 (dense 8.00) |  |" in text
    assert f"| {b.name} | failed | - | disk full / no space |" in text
    assert "2 points, 1 failed" in text
