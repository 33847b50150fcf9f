"""`sparsegpt export RUN_DIR --format hf`: the pruned checkpoint (hard links, no copy), its model card and
sparsity.json, built from the run's records; a run that is not finished is refused in one line."""

import json
import os
import re

import pytest
from transformers import AutoModelForCausalLM

from flows.cli import main
from stages.evaluate.evaluate import evaluate_run
from stages.export.export import export_run
from stages.prune.oneshot import block_records, run_pipeline
from stages.run.rundir import RunError
from tests.configs import tiny_prune


@pytest.fixture(scope="module")
def pruned(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_prune(tiny_llama_dir, root / "run", nm="2:4", eval=("pydoc",), eval_windows=2)
    run = run_pipeline(cfg)
    metrics = evaluate_run(cfg, run, run.dtype, block_records(run), {})
    return cfg, run, metrics


def test_hf_export_links_the_model_and_writes_the_card(pruned, capsys) -> None:
    cfg, run, metrics = pruned
    assert main(["export", str(run.root)]) == 0
    out = run.root / "export-hf"
    assert capsys.readouterr().out.strip() == str(out)
    for f in run.model.iterdir():
        assert os.path.samefile(f, out / f.name)  # the export costs no disk
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())
    table = json.loads((out / "sparsity.json").read_text())
    assert table["pattern"] == "2:4" and table["overall"] == pytest.approx(0.5)
    types = {f"self_attn.{p}_proj" for p in "qkvo"} | {f"mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert set(table["by_type"]) == types
    assert len(table["layers"]) == 7 * run.num_blocks
    card = (out / "README.md").read_text()
    header = "---\nlibrary_name: transformers\ntags:\n- sparsegpt\n- pruned\n- sparsity-50\n- n-m-2-4\n---"
    assert card.startswith(header)
    assert "| mlp.down_proj | 50.00% |" in card and "pattern 2:4" in card
    assert re.search(r"Calibration: `pydoc`, 6 samples x 32 tokens", card)
    m = metrics["pydoc"]
    assert f"| perplexity pydoc (2 x 32) | {m['dense_ppl']:.3f} | {m['ppl']:.3f} |" in card


def test_export_of_an_unfinished_run_is_refused(pruned, tmp_path, capsys) -> None:
    _, run, _ = pruned
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text((run.root / "run.json").read_text())
    assert main(["export", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no assembled model/; rerun its prune command" in err
    with pytest.raises(RunError, match="holds no run.json"):
        export_run(tmp_path / "nowhere")
    assert not (tmp_path / "run" / "export-hf").exists()
