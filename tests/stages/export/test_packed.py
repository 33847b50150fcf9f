"""Packed exports: `--format compressed-tensors` (a --wbits run's integers, reloaded by transformers bit for bit)
and `--format gguf` (llama.cpp; reloaded by the gguf reader and transformers' GGUF loader), with their refusals."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from flows.cli import main
from sparsegpt.quant import quant_grid, quantize
from sparsegpt.spec import QuantSpec
from stages.config import PruneConfig
from stages.evaluate.evaluate import evaluate_run
from stages.evaluate.perplexity import causal_lm_forward, eval_windows, perplexity
from stages.export.export import export_run
from stages.export.packed import codes
from stages.model.blocks import load_grids
from stages.model.models import load_tokenizer
from stages.prune.oneshot import block_records, run_pipeline
from stages.run.rundir import RunError, verify_record
from tests.configs import tiny_prune


def _size(folder: Path, suffix: str) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffix))


@pytest.fixture(scope="module", params=[4, 8])
def quantized(request, tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"w{request.param}")
    return run_pipeline(tiny_prune(tiny_llama_dir, root / "run", wbits=request.param, sparsity=0.5))


def test_codes_recover_the_grid_levels_and_refuse_off_grid_weights() -> None:
    torch.manual_seed(0)
    W = torch.randn(8, 32)
    spec = QuantSpec(4)
    grid = quant_grid(W, spec)
    q = torch.randint(0, spec.maxq + 1, W.shape).float()
    stored = (grid.scale.repeat_interleave(32, 1) * (q - grid.zero.repeat_interleave(32, 1))).to(torch.bfloat16)
    assert torch.equal(codes(stored, grid, "w"), q)
    # the solver's rounding (one column's scale and zero at a time), stored in bf16: its levels come back exactly
    solved = torch.stack([quantize(W[:, j], *grid.column(j), grid.maxq) for j in range(32)], dim=1)
    levels = codes(solved.to(torch.bfloat16), grid, "w")
    assert torch.equal(grid.scale * (levels - grid.zero), solved)
    off = stored.clone()
    off[3, 5] = stored[3, 5].float() + 0.4 * grid.scale[3, 0]
    with pytest.raises(RunError, match=r"weight \[3, 5\] .* is not on the run's quantization grid"):
        codes(off, grid, "w")


def test_grids_are_saved_with_each_block_and_verified_by_its_record(quantized) -> None:
    run = quantized
    for i in range(run.num_blocks):
        assert verify_record(run.block_record(i)) is not None
        assert run.grid_file(i).name in json.loads(run.block_record(i).read_text())["files"]  # hashed with the block
        grids = load_grids(run.grid_file(i))
        assert len(grids) == 7 and all(name.startswith(f"model.layers.{i}.") for name in grids)


def test_compressed_tensors_reloads_the_run_bit_for_bit(quantized, capsys) -> None:
    run = quantized
    assert main(["export", str(run.root), "--format", "compressed-tensors"]) == 0
    out = Path(capsys.readouterr().out.strip())
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    bits = json.loads((run.root / "run.json").read_text())["options"]["wbits"]
    weights = cfg["config_groups"]["group_0"]["weights"]
    assert (cfg["quant_method"], cfg["format"], cfg["ignore"]) == ("compressed-tensors", "pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"]) == (bits, False, "channel")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        name = "model.layers.1.mlp.down_proj"
        packed, shape = f.get_tensor(f"{name}.weight_packed"), f.get_tensor(f"{name}.weight_shape")
        assert packed.dtype == torch.int32 and packed.shape[1] == math.ceil(shape[1] * bits / 32)
    ref = AutoModelForCausalLM.from_pretrained(run.model).state_dict()
    got = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k  # the run's own scales: no re-quantization
        if k.endswith("proj.weight"):
            assert torch.equal(got[k] == 0, ref[k] == 0) and float((got[k] == 0).float().mean()) >= 0.5
    # float32 weights in, `bits` bits per pruned weight out (plus scales, norms and embeddings)
    assert _size(out, ".safetensors") < 0.6 * _size(run.model, ".safetensors")
    card = (out / "README.md").read_text()
    assert "- compressed-tensors\n" in card and f"pack-quantized` W{bits}A16" in card


def test_export_refusals_are_one_line(quantized, tiny_llama_dir, tmp_path, capsys) -> None:
    run = quantized
    plain = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "plain"))
    assert main(["export", str(plain.root), "--format", "compressed-tensors"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pruned without --wbits" in err and "--wbits 4" in err
    assert not (plain.root / "export-compressed-tensors").exists()
    # the tiny tokenizer is character-level, not the byte-level BPE llama.cpp's gpt2 model needs
    assert main(["export", str(plain.root), "--format", "gguf"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "WordLevel tokenizer.json" in err and "--format hf" in err
    # an --out that is not an earlier export of this run is never replaced
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert main(["export", str(plain.root), "--out", str(other)]) == 2
    assert "is not an export of" in capsys.readouterr().err and (other / "keep.txt").read_text() == "mine"
    first = export_run(plain.root, "hf", tmp_path / "again")
    assert export_run(plain.root, "hf", first) == first  # an earlier export of the same run is replaced
    with pytest.raises(RunError, match="is not an export of"):
        export_run(run.root, "hf", first)


def test_architectures_outside_a_format_are_refused(tiny_model_factory, tmp_path) -> None:
    gpt2 = run_pipeline(tiny_prune(tiny_model_factory("gpt2"), tmp_path / "gpt2", wbits=4))
    with pytest.raises(RunError, match="is a Conv1D, not a Linear: compressed-tensors packs Linear layers only"):
        export_run(gpt2.root, "compressed-tensors")
    opt = run_pipeline(tiny_prune(tiny_model_factory("opt"), tmp_path / "opt"))
    with pytest.raises(RunError, match=r"--format gguf maps Llama-family models .* \(model_type 'opt'\)"):
        export_run(opt.root, "gguf")
    assert not list(tmp_path.glob("*/export-*"))


@pytest.mark.slow
def test_smollm2_w4_exports_score_like_the_run(tmp_path) -> None:
    """The embedded model at 50% + 4 bits: compressed-tensors and GGUF f16 within 0.5% of the run's own
    perplexity, q8_0 within 3%; GGUF tensor names, shapes and types as llama.cpp reads them."""
    import gguf

    cfg = PruneConfig.of(
        model="smollm2-135m",
        run_dir=str(tmp_path / "run"),
        calib="pydoc",
        nsamples=4,
        seqlen=128,
        wbits=4,
        eval=("pydoc",),
        eval_windows=4,
        eval_seqlen=128,
        progress=False,
    )
    run = run_pipeline(cfg)
    own = evaluate_run(cfg, run, run.dtype, block_records(run), {})["pydoc"]["ppl"]
    windows = eval_windows(load_tokenizer(run.model), "pydoc", 128, max_windows=4)

    def ppl(model) -> float:
        return perplexity(causal_lm_forward(model.eval()), windows).ppl

    ref = AutoModelForCausalLM.from_pretrained(run.model).state_dict()
    ct = AutoModelForCausalLM.from_pretrained(export_run(run.root, "compressed-tensors"))
    assert ppl(ct) == pytest.approx(own, rel=0.005)
    for gguf_type, tol in (("f16", 0.005), ("q8_0", 0.03)):
        out = export_run(run.root, "gguf", gguf_type=gguf_type)
        (file,) = out.glob("*.gguf")
        reader = gguf.GGUFReader(str(file))
        tensors = {t.name: t for t in reader.tensors}
        down = tensors["blk.0.ffn_down.weight"]
        assert (down.tensor_type.name, list(down.shape)) == (gguf_type.upper(), [1536, 576])
        assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32" and len(tensors) == 2 + 9 * 30
        model = AutoModelForCausalLM.from_pretrained(out, gguf_file=file.name)
        assert ppl(model) == pytest.approx(own, rel=tol)
        got = model.state_dict()
        for k in ref:
            if k.endswith("proj.weight"):
                assert torch.equal(got[k] == 0, ref[k] == 0), k  # exact zeros stay zero
    # the tokenizer.json path writes the vocabulary the model's own GGUF carries
    from stages.export.gguf import _tokenizer_fields
    from stages.model.embedded import gguf_path

    ours = {k: v for k, v, _, _ in _tokenizer_fields(gguf, run.model, None)}
    theirs = {k: v for k, v, _, _ in _tokenizer_fields(gguf, run.model, gguf_path())}
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours[key] == theirs[key], key


def test_prune_export_compressed_tensors_without_wbits_is_refused_before_any_work(tiny_llama_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["prune", str(tiny_llama_dir), "--run-dir", str(run_dir), "--seqlen", "32", "--export", "compressed-tensors"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--export compressed-tensors packs quantized weights: add --wbits 4" in err
    assert not run_dir.exists()
