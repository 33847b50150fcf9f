"""`sparsegpt report`: per-layer tables and heatmaps equal the block records, OWL and
evaluation sections equal their files, a hand-made progressive summary gives the
round-by-round curve, several runs are compared, and bad run directories fail clearly."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest

import stages.report.report as report
from flows.cli import main
from stages.report.report import layer_grid, load_run, write_report
from stages.run.rundir import verify_record

LLAMA_LAYERS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]
PNG = b"\x89PNG\r\n\x1a\n"

SUMMARY = {
    "dense": {"pydoc": {"ppl": 20.0, "windows": 2, "seqlen": 32}},
    "rounds": [
        {
            "round": 1,
            "target": 0.5,
            "sparsity": 0.5,
            "ppl_before": {"pydoc": 30.0},
            "ppl_after": {"pydoc": 22.0},
            "tokens": 1000,
            "seconds": 3.5,
        },
        {
            "round": 2,
            "target": 0.7,
            "sparsity": 0.7001,
            "ppl_before": {"pydoc": 60.0},
            "ppl_after": {"pydoc": 35.0},
            "tokens": 2000,
            "seconds": 4.0,
        },
    ],
}


@pytest.fixture()
def run_copy(evaluated_run, tmp_path) -> Path:
    """A private copy of the evaluated run (reports write into it)."""
    _, run, _, _ = evaluated_run
    dst = tmp_path / "oneshot"
    shutil.copytree(run.root, dst, ignore=shutil.ignore_patterns("acts", "model"))
    return dst


@pytest.fixture()
def progressive_dir(tmp_path) -> Path:
    """A finished progressive run as its flow leaves it: run.json, summary.json, rounds/ (no blocks/ at the top)."""
    root = tmp_path / "progressive"
    (root / "rounds" / "round_01").mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({"config": {"model": "m", "schedule": ["0.5", "0.7"]}}))
    (root / "summary.json").write_text(json.dumps({"schedule": ["0.5", "0.7"], **SUMMARY, "complete": True}))
    return root


def records(root: Path) -> list[dict]:
    return [verify_record(p) for p in sorted((root / "blocks").glob("block_*.json"))]


def test_heatmap_data_equals_the_block_records(run_copy, monkeypatch):
    recs = records(run_copy)
    blocks, names, grid = layer_grid(recs, "rel_error")
    assert blocks == [0, 1, 2] and names == sorted(LLAMA_LAYERS)  # records store layers sorted by name
    assert grid == [[r["layers"][n]["rel_error"] for n in names] for r in recs]
    drawn = {}
    real = report.plots.heatmap
    monkeypatch.setattr(
        report.plots,
        "heatmap",
        lambda g, rows, cols, title, *a: drawn.setdefault(title, (g, rows, cols)) and real(g, rows, cols, title, *a),
    )
    pictures = report.run_pictures(load_run(run_copy))
    sparsity = drawn["achieved sparsity"]
    assert sparsity == ([[r["layers"][n]["sparsity"] for n in names] for r in recs], ["0", "1", "2"], names)
    assert drawn[next(t for t in drawn if t.startswith("relative"))][0] == grid
    assert set(pictures) == {
        "sparsity-heatmap.png",
        "error-heatmap.png",
        "block-seconds.png",
        "owl.png",
        "ppl-vs-sparsity.png",
    }
    assert all(png.startswith(PNG) for png in pictures.values())


def test_one_run_report_lists_every_layer_and_embeds_its_pictures(run_copy, evaluated_run):
    _, _, metrics, _ = evaluated_run
    written = write_report([run_copy])
    eval_dir = run_copy / "eval"
    assert {p.name for p in written} == {
        "report.md",
        "report.html",
        "sparsity-heatmap.png",
        "error-heatmap.png",
        "block-seconds.png",
        "owl.png",
        "ppl-vs-sparsity.png",
    }
    md = (eval_dir / "report.md").read_text()
    for rec in records(run_copy):
        for name, st in rec["layers"].items():
            shape = f"{st['shape'][0]}x{st['shape'][1]}"
            nums = f"{st['target']:.4f} | {st['sparsity']:.4f} | {st['rel_error']:.5f}"
            row = f"| {rec['block']} | {name} | {shape} | {nums} |"
            assert row in md, row
        assert f"| {rec['block']} | {rec['seconds']:.2f} |" in md
    assert len(re.findall(r"^\| \d \| (self_attn|mlp)\.", md, flags=re.M)) == 3 * 7
    owl = json.loads((run_copy / "owl.json").read_text())
    for i, (r, s) in enumerate(zip(owl["ratios"], owl["sparsities"], strict=True)):
        assert f"| {i} | {r:.4f} | {s:.4f} |" in md
    ppl = metrics["pydoc"]
    assert f"| pydoc | 2 x 32 | {ppl['dense_ppl']:.2f} | {ppl['ppl']:.2f} |" in md
    boolq = metrics["tasks"]["boolq"]
    assert f"| boolq | 3 | acc | {boolq['dense']['acc']:.4f} | {boolq['pruned']['acc']:.4f} |" in md
    assert "| arc_easy | 3 | acc_norm |" in md
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == sorted(p.name for p in written if p.suffix == ".png")
    page = (eval_dir / "report.html").read_text()
    for name in links:
        assert base64.b64encode((eval_dir / name).read_bytes()).decode() in page
    assert not re.search(r'src="(?!data:image/png;base64,)', page)  # self-contained


def test_progressive_run_shows_the_round_curve(progressive_dir, monkeypatch):
    drawn = {}
    monkeypatch.setattr(report.plots, "rounds", lambda *a: drawn.setdefault("rounds", a) and PNG)
    write_report([progressive_dir])
    targets, before, after, dense = drawn["rounds"]
    assert (targets, before, after, dense) == (
        [0.5, 0.7],
        {"pydoc": [30.0, 60.0]},
        {"pydoc": [22.0, 35.0]},
        {"pydoc": 20.0},
    )
    md = (progressive_dir / "eval" / "report.md").read_text()
    assert "| 1 | 0.500 | 0.5000 | 30.00 / 22.00 | 1000 | 3.5 |" in md
    assert "| 2 | 0.700 | 0.7001 | 60.00 / 35.00 | 2000 | 4.0 |" in md
    assert "| target sparsity | 0.5, 0.7 |" in md and "| method / pattern | progressive |" in md
    assert "![perplexity by round](rounds.png)" in md and (progressive_dir / "eval" / "rounds.png").is_file()
    (progressive_dir / "run.json").rename(
        progressive_dir / "progressive.json"
    )  # progressive.json stands in for run.json
    assert load_run(progressive_dir).summary["rounds"] == SUMMARY["rounds"]


def test_several_runs_side_by_side(run_copy, progressive_dir, tmp_path, evaluated_run):
    _, _, metrics, _ = evaluated_run
    series, dense = report.ppl_points([load_run(run_copy), load_run(progressive_dir)])
    s = metrics["sparsity"]["overall"]
    assert series == {
        "pydoc": {
            "sparsegpt unstructured +owl": [(s, metrics["pydoc"]["ppl"])],
            "progressive, fine-tuned": [(0.5, 22.0), (0.7001, 35.0)],
            "progressive, before fine-tuning": [(0.5, 30.0), (0.7001, 60.0)],
        }
    }
    assert dense == {"pydoc": [metrics["pydoc"]["dense_ppl"], 20.0]}
    out = tmp_path / "compare"
    assert main(["report", str(run_copy), str(progressive_dir), "--out", str(out)]) == 0
    md = (out / "comparison.md").read_text()
    assert (
        f"| oneshot | sparsegpt unstructured +owl | {s:.4f} | "
        f"{metrics['pydoc']['ppl']:.2f} ({metrics['pydoc']['dense_ppl']:.2f}) |" in md
    )
    assert "| progressive | progressive | 0.7001 | 35.00 (20.00) | - |" in md  # where the rounds ended
    assert (out / "comparison-ppl-vs-sparsity.png").read_bytes().startswith(PNG)
    assert (out / "comparison.html").is_file()
    assert (run_copy / "eval" / "report.md").is_file() and (progressive_dir / "eval" / "report.md").is_file()


def test_bad_run_directories_fail_with_one_line(tmp_path, capsys, run_copy):
    assert main(["report", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {tmp_path} is not a run directory (no run.json); pass the --run-dir of a `sparsegpt prune` run\n"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(run_copy / "run.json", empty / "run.json")
    assert main(["report", str(run_copy), str(empty)]) == 2  # every run is read before anything is written
    err = capsys.readouterr().err
    assert (
        err.startswith(f"error: {empty} has no finished blocks and no eval/metrics.json yet") and err.count("\n") == 1
    )
    assert not (run_copy / "eval" / "report.md").exists()
