"""Block-wise reconstruction: the training loop against a straightforward reference, the mask, the
fallback to the solved weights, and `--reconstruct` through the one-shot pipeline (no Prefect)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.func import functional_call

from sparsegpt import magnitude_prune
from stages.config import ReconstructConfig
from stages.model.blocks import (
    find_layers,
    get_weight,
    load_block,
    move_kwargs,
    round_to_stored,
    run_block,
    set_weight,
)
from stages.model.capture import capture_inputs
from stages.prune.oneshot import run_pipeline
from stages.prune.reconstruct import normalised_mse, reconstruct_block
from tests.configs import tiny_prune
from tests.conftest import TINY_VOCAB


@pytest.fixture()
def solved(tiny_llama_dir: Path, device: str) -> tuple:
    """Block 0 of the tiny Llama on the `device` fixture's device, its inputs (captured as the pipeline
    does), the dense block's outputs on them, and the block pruned to 70% by magnitude (a poor solve, so
    reconstruction has much to recover)."""
    torch.manual_seed(0)
    ids = torch.randint(3, TINY_VOCAB, (6, 16))
    inputs, kwargs = capture_inputs(tiny_llama_dir, ids, device)
    inputs = inputs.to(device)
    block = load_block(tiny_llama_dir, 0, device, torch.float32)
    targets = run_block(block, inputs, kwargs)
    for layer in find_layers(block).values():
        set_weight(layer, magnitude_prune(get_weight(layer).detach(), 0.7).weight)
    return block, inputs, targets, kwargs


def reference_train(block, inputs, targets, kwargs, cfg: ReconstructConfig, seed: int) -> dict[str, torch.Tensor]:
    """The same training written as EBFT writes it: weights reparametrised as ``W * keep`` inside the forward
    (so pruned entries get no gradient by construction), one Adam over every parameter, linear decay."""
    params = {k: v.detach().clone().float().requires_grad_(True) for k, v in block.named_parameters()}
    keep = {f"{name}.weight": (layer.weight != 0).float() for name, layer in find_layers(block).items()}
    opt = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    total = cfg.epochs * math.ceil(len(inputs) / cfg.batch_size)
    gen = torch.Generator().manual_seed(seed)
    step = 0
    for _ in range(cfg.epochs):
        order = torch.randperm(len(inputs), generator=gen).tolist()
        for lo in range(0, len(inputs), cfg.batch_size):
            idx = order[lo : lo + cfg.batch_size]
            x, y = inputs[idx], targets[idx]
            effective = {k: v * keep[k] if k in keep else v for k, v in params.items()}
            moved = {k: move_kwargs(v, len(idx), x.device, x.dtype) for k, v in kwargs.items()}
            out = functional_call(block, effective, (x,), moved)
            out = out[0] if isinstance(out, tuple) else out
            loss = (out - y).square().sum() / y.square().sum()
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * (1 - step / total)
            opt.step()
            step += 1
    return {k: (v * keep[k] if k in keep else v).detach() for k, v in params.items()}


@pytest.mark.device
def test_training_matches_the_reparametrised_reference(solved) -> None:
    block, inputs, targets, kwargs = solved
    cfg = ReconstructConfig(enabled=True, epochs=3, lr=1e-3, batch_size=2)
    want = reference_train(block, inputs, targets, kwargs, cfg, seed=7)
    zeros = {f"{n}.weight": layer.weight == 0 for n, layer in find_layers(block).items()}
    stats = reconstruct_block(block, inputs, targets, kwargs, cfg, seed=7)
    assert stats.steps == 9 and not stats.kept_solved
    assert stats.after == stats.trained < stats.before
    got = dict(block.named_parameters())
    for k, v in want.items():
        torch.testing.assert_close(got[k].detach(), v, rtol=1e-4, atol=1e-6, msg=k)
    for k, z in zeros.items():
        assert torch.equal(got[k] == 0, z), f"{k}: the mask changed"
    assert stats.after == pytest.approx(normalised_mse(block, inputs, targets, kwargs, 4, len(inputs)), rel=1e-6)


def test_training_is_deterministic_and_keeps_the_dtype(solved) -> None:
    block, inputs, targets, kwargs = solved
    cfg = ReconstructConfig(enabled=True, epochs=1, lr=1e-3, batch_size=4)
    start = {k: v.clone() for k, v in block.state_dict().items()}
    block.to(torch.bfloat16)
    a = reconstruct_block(block, inputs.bfloat16(), targets.bfloat16(), kwargs, cfg, seed=1)
    assert all(p.dtype == torch.bfloat16 for p in block.parameters())
    first = {k: v.clone() for k, v in block.state_dict().items()}
    block.load_state_dict(start)
    block.to(torch.bfloat16)
    b = reconstruct_block(block, inputs.bfloat16(), targets.bfloat16(), kwargs, cfg, seed=1)
    assert a.after == b.after
    assert all(torch.equal(first[k], v) for k, v in block.state_dict().items())


def test_a_diverging_loss_keeps_the_solved_weights(solved) -> None:
    """Kept aside in bf16 (the weights were rounded through it, as the pipeline does for a bf16 checkpoint),
    the solved weights come back exactly."""
    block, inputs, targets, kwargs = solved
    stored = {k: torch.bfloat16 for k in block.state_dict()}
    round_to_stored(block, stored)
    start = {k: v.clone() for k, v in block.state_dict().items()}
    bad = targets.clone()
    bad[0, 0, 0] = math.nan
    cfg = ReconstructConfig(enabled=True)
    stats = reconstruct_block(block, inputs, bad, kwargs, cfg, seed=0, solved_dtypes=stored)
    assert stats.kept_solved and math.isnan(stats.trained)
    assert stats.steps < 2 * 3  # training stopped at the batch holding the NaN
    assert all(torch.equal(start[k], v) for k, v in block.state_dict().items())


def test_reconstruct_lowers_each_blocks_loss_and_keeps_the_mask(tiny_llama_dir: Path, tmp_path: Path) -> None:
    plain = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "plain", sparsity=0.7))
    solved = load_file(str(plain.block_file(0)))  # block 0 sees the same inputs with or without reconstruction
    for target in ("dense-stream", "dense-block"):
        cfg = tiny_prune(
            tiny_llama_dir,
            tmp_path / target,
            sparsity=0.7,
            reconstruct=True,
            reconstruct_target=target,
            reconstruct_lr=1e-3,
            reconstruct_epochs=2,
        )
        run = run_pipeline(cfg)
        steps = 2 * math.ceil(6 / cfg.reconstruct.batch_size)
        for i in range(run.num_blocks):
            rec = json.loads(run.block_record(i).read_text())["reconstruct"]
            assert rec["after"] < rec["before"] and not rec["kept_solved"] and rec["steps"] == steps, (target, i)
        ours = load_file(str(run.block_file(0)))
        for k, v in ours.items():
            if k.endswith("proj.weight"):
                assert torch.equal(v == 0, solved[k] == 0), f"{target}: {k} changed its mask"
                assert not torch.equal(v, solved[k]), f"{target}: {k} was not trained"
        assert not (run.root / "recon").exists()
        dense = sorted((run.root / "dense").glob("block_*"))
        assert (len(dense) == cfg.runtime.keep_acts) if target == "dense-stream" else not dense
    # the report: a column of reconstructed block errors in the heatmap, the before/after plot, the table
    from stages.report.report import write_report

    written = {p.name for p in write_report([run.root])}
    assert {"reconstruction.png", "error-heatmap.png"} <= written
    md = (run.root / "eval" / "report.md").read_text()
    rec = json.loads(run.block_record(1).read_text())["reconstruct"]
    assert f"| {rec['before']:.4g} | {rec['after']:.4g} |" in md


def test_more_reconstruction_samples_leave_the_hessians_alone(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """--reconstruct-samples above --nsamples draws more windows the same way; the solve sees the first ones."""
    plain = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "plain"))
    more = run_pipeline(
        tiny_prune(tiny_llama_dir, tmp_path / "more", reconstruct=True, reconstruct_samples=10, reconstruct_epochs=1)
    )
    from stages.data.calibration import read_tokens

    a, b = read_tokens(plain.tokens), read_tokens(more.tokens)
    assert b.shape[0] == 10 and (a == b[:6]).all()
    first = [json.loads(r.block_record(0).read_text()) for r in (plain, more)]
    assert first[1]["reconstruct"]["steps"] == math.ceil(10 / ReconstructConfig().batch_size)
    for name, st in first[0]["layers"].items():
        assert first[1]["layers"][name]["loss"] == st["loss"], name


def test_a_teacher_gives_the_targets_of_a_model_pruned_before(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """Pruning an already pruned model further toward the dense teacher: block 0's solved loss is measured
    against the dense block, so it is larger than against the half-pruned block the run starts from."""
    half = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "half", sparsity=0.5)).model
    losses = {}
    for teacher in (None, str(tiny_llama_dir)):
        for target in ("dense-stream", "dense-block"):
            run = run_pipeline(
                tiny_prune(
                    half,
                    tmp_path / f"{target}-{teacher is not None}",
                    sparsity=0.7,
                    keep_pruned=True,
                    reconstruct=True,
                    reconstruct_target=target,
                    reconstruct_teacher=teacher,
                    reconstruct_lr=1e-3,
                )
            )
            records = [json.loads(run.block_record(i).read_text())["reconstruct"] for i in range(run.num_blocks)]
            assert all(r["after"] < r["before"] for r in records)
            losses[target, teacher is not None] = records[0]["before"]
    for target in ("dense-stream", "dense-block"):
        assert losses[target, True] > losses[target, False], target


def test_a_teacher_of_another_shape_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from stages.prune.check import check

    other = tmp_path / "other"
    LlamaConfig(num_hidden_layers=5, hidden_size=64).save_pretrained(other)
    save_file({"x": torch.zeros(1)}, str(other / "model.safetensors"))
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "run", reconstruct=True, reconstruct_teacher=str(other))
    with pytest.raises(ValueError, match=r"--reconstruct-teacher .* has 5 blocks of width 64, the model being pruned"):
        check(cfg)
    assert not (tmp_path / "run").exists()
