"""The one-shot stages end to end on tiny Llama, OPT and GPT-2 models (no Prefect)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from stages.config import PruneConfig
from stages.data.calibration import read_tokens
from stages.prune.oneshot import run_pipeline
from stages.run.rundir import RunError
from tests.configs import tiny_prune
from tests.stages.prune.reference_pipeline import reference_prune


def tiny_cfg(model_dir: Path, run_dir: Path, **kw) -> PruneConfig:
    return tiny_prune(model_dir, run_dir, **{"batch_size": 4, **kw})


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_pipeline_matches_in_memory_reference(tiny_model_dir, tmp_path, nm):
    """One sample per forward pass, as the reference does: the weights are bit-identical."""
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", nm=nm, batch_size=1)
    run = run_pipeline(cfg)
    ids = torch.from_numpy(read_tokens(run.tokens).astype(np.int64))
    n, m = cfg.solver.prune_nm
    ref = reference_prune(tiny_model_dir, ids, cfg.solver.sparsity, n, m, cfg.solver.blocksize)
    ours = AutoModelForCausalLM.from_pretrained(run.model, dtype=torch.float32)
    ref_sd, our_sd = ref.state_dict(), ours.state_dict()
    assert ref_sd.keys() == our_sd.keys()
    for k in ref_sd:
        assert torch.equal(our_sd[k], ref_sd[k]), k


@pytest.mark.device
def test_batched_forward_agrees_with_reference(tiny_model_dir, tmp_path, device):
    """Batches of 4 round differently (and on a GPU in its own order); only near-tied weights may flip
    between pruned and kept."""
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", batch_size=4, device=device, dtype="float32")
    run = run_pipeline(cfg)
    ids = torch.from_numpy(read_tokens(run.tokens).astype(np.int64))
    ref = reference_prune(tiny_model_dir, ids, cfg.solver.sparsity, 0, 0, cfg.solver.blocksize).state_dict()
    ours = AutoModelForCausalLM.from_pretrained(run.model, dtype=torch.float32).state_dict()
    flips = sum(int(((ref[k] == 0) != (ours[k] == 0)).sum()) for k in ref if k.endswith("weight"))
    total = sum(ref[k].numel() for k in ref if k.endswith("weight"))
    assert flips / total < 1e-3


@pytest.mark.device
@pytest.mark.parametrize("nm,sequential", [(None, False), ("2:4", False), ("2:4", True)])
def test_the_triton_kernel_through_the_pipeline(tiny_llama_dir, tmp_path, device, nm, sequential):
    """`--kernel triton` (a GPU's): the run's masks are the `--kernel torch` run's and (default mode) the
    in-memory reference's but for near ties, and its weights theirs to float32 rounding where no mask moved."""
    if not device.startswith("cuda"):
        pytest.skip("--kernel triton runs on a GPU; its CPU tests (Triton's interpreter): tests/sparsegpt")
    pytest.importorskip("triton")
    kw = dict(nm=nm, sequential=sequential, device=device, dtype="float32")
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "triton", kernel="triton", **kw)
    fused = run_pipeline(cfg)
    plain = run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "torch", **kw))
    ours = AutoModelForCausalLM.from_pretrained(fused.model, dtype=torch.float32).state_dict()
    others = [AutoModelForCausalLM.from_pretrained(plain.model, dtype=torch.float32).state_dict()]
    if not sequential:
        ids = torch.from_numpy(read_tokens(fused.tokens).astype(np.int64))
        n, m = cfg.solver.prune_nm
        others.append(
            reference_prune(tiny_llama_dir, ids, cfg.solver.sparsity, n, m, cfg.solver.blocksize).state_dict()
        )
    for other in others:
        keys = [k for k in other if k.endswith("proj.weight")]
        moved = {k: int(((other[k] == 0) != (ours[k] == 0)).sum()) for k in keys}
        assert sum(moved.values()) / sum(other[k].numel() for k in keys) < 1e-3
        for k in keys:
            if not moved[k]:
                torch.testing.assert_close(ours[k], other[k], rtol=1e-3, atol=1e-4)


def test_output_is_a_loadable_sparse_checkpoint(tiny_model_dir, tmp_path):
    cfg = tiny_cfg(tiny_model_dir, tmp_path / "run", sparsity=0.6)
    run = run_pipeline(cfg)
    model, info = AutoModelForCausalLM.from_pretrained(run.model, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    AutoTokenizer.from_pretrained(run.model)
    from stages.model.blocks import find_blocks, find_layers, get_weight

    for block in find_blocks(model)[1]:
        for name, layer in find_layers(block).items():
            W = get_weight(layer)
            assert (W == 0).float().mean().item() == pytest.approx(0.6, abs=1e-3), name
    records = [json.loads(p.read_text()) for p in sorted((run.root / "blocks").glob("*.json"))]
    assert len(records) == run.num_blocks
    assert all(0 <= st["rel_error"] < 1 for r in records for st in r["layers"].values())


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_baseline_methods_and_owl(tiny_llama_dir, tmp_path, method):
    run = run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "run", method=method))
    W = model_tensors(run.model)["model.layers.0.mlp.up_proj.weight"]
    assert (W == 0).float().mean().item() == pytest.approx(0.5, abs=1e-3)
    owl = run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "owl", owl=True, sparsity=0.6, owl_lambda=0.1))
    alloc = json.loads((owl.root / "owl.json").read_text())
    assert sum(alloc["sparsities"]) / len(alloc["sparsities"]) == pytest.approx(0.6)
    assert max(alloc["sparsities"]) - min(alloc["sparsities"]) == pytest.approx(0.2)


def test_resume_skips_finished_blocks_and_redoes_corrupt_ones(tiny_llama_dir, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    run = run_pipeline(cfg)
    first = {k: v.clone() for k, v in model_tensors(run.model).items()}  # model/ shares the block files
    rec0, rec1 = run.block_record(0), run.block_record(1)
    t0, t1 = rec0.stat().st_mtime_ns, rec1.stat().st_mtime_ns
    # Corrupt block 1's weights (same size), drop the assembled model: block 1 is redone, block 0 is not.
    data = bytearray(run.block_file(1).read_bytes())
    data[-8:] = b"\x00" * 8
    run.block_file(1).write_bytes(bytes(data))
    (run.root / "model.json").unlink()
    run_pipeline(cfg)
    assert rec0.stat().st_mtime_ns == t0 and rec1.stat().st_mtime_ns != t1
    again = model_tensors(run.model)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_missing_activations_are_rebuilt_identically(tiny_llama_dir, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    run = run_pipeline(cfg)
    first = model_tensors(run.model)

    for i in (1, 2):
        run.block_record(i).unlink()
    shutil.rmtree(run.root / "acts")  # every boundary gone: recapture, then replay block 0
    (run.root / "model.json").unlink()
    run_pipeline(cfg)
    again = model_tensors(run.model)
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_rebuilt_activations_keep_disk_to_keep_acts_boundaries(tiny_llama_dir, tmp_path, monkeypatch):
    """Rebuilding boundaries through several blocks deletes the walked ones as it goes."""
    import stages.prune.streams as streams

    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    run = run_pipeline(cfg)
    run.block_record(2).unlink()
    (run.root / "model.json").unlink()
    for b in ("block_002", "block_003"):
        shutil.rmtree(run.root / "acts" / b)  # block 2 must be redone from recaptured inputs: 0 -> 1 -> 2
    on_disk, real = [], streams.forward_to_shards

    def spy(cfg, block, src, dst, kwargs):
        on_disk.append(sorted(p.name for p in (run.root / "acts").iterdir() if p.is_dir()))
        return real(cfg, block, src, dst, kwargs)

    monkeypatch.setattr(streams, "forward_to_shards", spy)
    run_pipeline(cfg)
    assert on_disk == [["block_000"], ["block_000", "block_001"], ["block_001", "block_002"]]


def test_each_boundary_is_hashed_once_when_written_and_once_when_a_resumed_process_reads_it(tiny_llama_dir, tmp_path):
    """A block record's `bytes_hashed`: the boundary it wrote and its own file, each once; the process that
    wrote its input boundary does not hash it again. A resumed process hashes the input it reads once."""
    import stages.run.rundir as rundir

    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    run = run_pipeline(cfg)
    last = run.num_blocks - 1
    boundary = sum(p.stat().st_size for p in run.acts(last + 1).glob("*.arrow"))  # every boundary's size
    for i in range(run.num_blocks):
        rec = json.loads(run.block_record(i).read_text())
        assert rec["bytes_hashed"] == boundary + run.block_file(i).stat().st_size, i
    run.block_record(last).unlink()
    rundir.forget_hashes()  # as a new process
    run_pipeline(cfg)
    rec = json.loads(run.block_record(last).read_text())
    assert rec["bytes_hashed"] == 2 * boundary + run.block_file(last).stat().st_size


def test_model_links_the_block_files_instead_of_copying_them(tiny_llama_dir, tmp_path):
    """Each block file is a shard of the output under its checkpoint names: model/ holds it as a hard link,
    so the pruned model costs the disk of its non-block tensors only, and it loads with no key missing."""
    run = run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "run"))
    shards = sorted(run.model.glob("*.safetensors"))
    for i in range(run.num_blocks):
        assert sum(os.path.samefile(run.block_file(i), s) for s in shards) == 1, i
    inodes = {p.stat().st_ino: p.stat().st_size for p in [*shards, *run.root.glob("blocks/*.safetensors")]}
    blocks = sum(run.block_file(i).stat().st_size for i in range(run.num_blocks))
    non_block = [s for s in shards if not any(os.path.samefile(s, run.block_file(i)) for i in range(run.num_blocks))]
    assert sum(inodes.values()) == blocks + sum(s.stat().st_size for s in non_block)
    model, info = AutoModelForCausalLM.from_pretrained(run.model, output_loading_info=True)
    assert not any(info.values())


def test_old_activations_are_deleted(tiny_llama_dir, tmp_path):
    run = run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "run"))
    kept = sorted(p.name for p in (run.root / "acts").iterdir() if p.is_dir())
    assert kept == ["block_002", "block_003"]


def test_different_config_is_refused(tiny_llama_dir, tmp_path):
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    run_pipeline(cfg)
    with pytest.raises(RunError, match=r"sparsity: 0.5 \(run dir\) != 0.7"):
        run_pipeline(cfg.updated(sparsity=0.7))
    run_pipeline(cfg.updated(eval_windows=3, batch_size=2))  # not part of the run's identity


def test_run_directory_of_the_flat_config_resumes(tiny_llama_dir, tmp_path):
    """A run directory whose run.json holds the flat config the code wrote before the config tree
    (written here as that code wrote it) resumes: finished blocks are kept, the rest is pruned."""
    import json

    from stages.run.identity import config_hash

    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    straight = run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "straight"))
    run = run_pipeline(cfg)
    old = {
        "model": str(tiny_llama_dir),
        "method": "sparsegpt",
        "sparsity": 0.5,
        "nm": None,
        "wbits": 16,
        "calib": "pydoc",
        "nsamples": 6,
        "seqlen": 32,
        "seed": 0,
        "blocksize": 16,
        "percdamp": 0.01,
        "damp_retries": 3,
        "owl": False,
        "owl_lambda": 0.08,
        "owl_threshold": 5.0,
        "trust_remote_code": False,
    }
    meta = json.loads((run.root / "run.json").read_text())
    meta.update(config=old, config_hash=config_hash(old))
    meta.pop("options")
    (run.root / "run.json").write_text(json.dumps(meta))
    for f in (run.root / "blocks").glob("block_002.*"):  # the old run stopped before its last block
        f.unlink()
    shutil.rmtree(run.model)
    (run.root / "model.json").unlink()
    kept = (run.root / "blocks" / "block_001.json").stat().st_mtime_ns
    run_pipeline(cfg)
    assert (run.root / "blocks" / "block_001.json").stat().st_mtime_ns == kept
    a, b = model_tensors(run.model), model_tensors(straight.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RunError, match=r"calib\.nsamples: 6 \(run dir\) != 7"):
        run_pipeline(cfg.updated(nsamples=7))


def test_bfloat16_run_end_to_end_and_its_dtype_is_part_of_the_identity(tiny_model_dir, tmp_path):
    """The half-precision path a GPU takes, on the CPU: blocks, activations and evaluation in bf16 (Hessians
    and solves in fp32); the result is close to the fp32 run's, and a resume in another dtype is refused."""
    from stages.evaluate.evaluate import blockwise_perplexity
    from stages.evaluate.perplexity import eval_windows
    from stages.model.models import load_tokenizer
    from stages.run.shards import read_shards

    half = run_pipeline(tiny_cfg(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16"))
    full = run_pipeline(tiny_cfg(tiny_model_dir, tmp_path / "fp32"))
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    assert read_shards(half.acts(half.num_blocks)).dtype == torch.bfloat16
    meta = json.loads((half.root / "run.json").read_text())
    assert meta["config"]["compute_dtype"] == "bfloat16" and meta["options"]["dtype"] == "bfloat16"
    a, b = model_tensors(half.model), model_tensors(full.model)
    assert a.keys() == b.keys()
    pruned = [n for n, W in b.items() if W.dim() == 2 and (W == 0).float().mean() > 0.4]  # the block linears
    assert pruned and all((a[n] == 0).float().mean().item() == pytest.approx(0.5, abs=0.02) for n in pruned)
    ids = eval_windows(load_tokenizer(half.model), "pydoc", 32, 4)
    ppl_half = blockwise_perplexity(half.model, ids, "cpu", torch.bfloat16).ppl
    ppl_full = blockwise_perplexity(full.model, ids, "cpu", torch.float32).ppl
    assert ppl_half == pytest.approx(ppl_full, rel=0.05)
    with pytest.raises(RunError, match=r"compute_dtype: \"bfloat16\" \(run dir\) != \"float32\" \(this command\)"):
        run_pipeline(tiny_cfg(tiny_model_dir, tmp_path / "bf16"))  # auto on a CPU is float32


def test_bfloat16_checkpoint_keeps_its_dtype_in_blocks_and_resumes_identically(tiny_llama_dir, tmp_path):
    """A bf16 checkpoint pruned in fp32: blocks/ holds bf16 (half the bytes), the output is bf16, and the
    next block's inputs come from the bf16-rounded block, so boundaries rebuilt from blocks/ are identical."""
    from safetensors import safe_open

    from tests.conftest import tiny_tokenizer

    ckpt = tmp_path / "bf16-ckpt"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16).save_pretrained(ckpt)
    tiny_tokenizer().save_pretrained(ckpt)
    cfg = tiny_cfg(ckpt, tmp_path / "run")
    run = run_pipeline(cfg)
    with safe_open(run.block_file(1), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    first = model_tensors(run.model)
    assert {t.dtype for t in first.values()} == {torch.bfloat16}
    for i in (1, 2):
        run.block_record(i).unlink()
    shutil.rmtree(run.root / "acts")  # recapture, then replay block 0 from its saved bf16 weights
    (run.root / "model.json").unlink()
    run_pipeline(cfg)
    again = model_tensors(run.model)
    assert all(torch.equal(first[k], again[k]) for k in first)
