"""`--sequential`: each layer against its inputs through the pruned layers before it, one forward per block."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import stages.prune.oneshot as oneshot
from stages.config import SolverConfig
from stages.data.calibration import read_tokens
from stages.model.blocks import run_block
from stages.prune.oneshot import run_pipeline
from stages.prune.sequential import NotSequential, prune_block_sequential
from stages.prune.streams import load_kwargs, load_pruned
from stages.run.shards import read_shards
from tests.configs import tiny_prune
from tests.stages.prune.reference_pipeline import reference_prune


def model_state(folder: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


@pytest.mark.parametrize("nm", [None, "2:4"])
def test_sequential_pipeline_matches_in_memory_sequential_reference(tiny_model_dir, tmp_path, nm):
    """Batch 1, as the reference: bit-identical to a layer-by-layer reference that runs one pass per layer.
    And not the default mode's weights: later layers were solved against other inputs."""
    cfg = tiny_prune(tiny_model_dir, tmp_path / "run", nm=nm, batch_size=1, sequential=True)
    run = run_pipeline(cfg)
    ids = torch.from_numpy(read_tokens(run.tokens).astype(np.int64))
    n, m = cfg.solver.prune_nm
    args = (tiny_model_dir, ids, cfg.solver.sparsity, n, m, cfg.solver.blocksize)
    ref = reference_prune(*args, sequential=True).state_dict()
    ours = model_state(run.model)
    assert ref.keys() == ours.keys()
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    default = reference_prune(*args).state_dict()
    assert any(not torch.equal(ours[k], default[k]) for k in ref)


def test_one_forward_per_block(tiny_llama_dir, tmp_path, monkeypatch):
    """The default mode runs every block twice over the calibration batches, sequential mode once."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls = {"n": 0}
    real = LlamaDecoderLayer.forward

    def counted(self, *args, **kwargs):
        calls["n"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    passes = {}
    for sequential in (False, True):
        run_dir = tmp_path / f"run-{sequential}"
        cfg = tiny_prune(tiny_llama_dir, run_dir, batch_size=2, sequential=sequential, keep_acts=8)
        run = run_pipeline(cfg)
        calls["n"] = 0
        run.block_record(1).unlink()  # redo block 1 only (its inputs are on disk)
        run.model_record.unlink()
        run_pipeline(cfg)
        passes[sequential] = calls["n"] / (cfg.calib.nsamples // 2)
    assert passes == {False: 2, True: 1}


def test_outputs_are_what_the_saved_block_gives(tiny_llama_dir, tmp_path):
    """A bf16 checkpoint: each solved weight is rounded as saved before later layers see its outputs, so the
    boundary the pass writes equals the one a resumed run rebuilds from the saved blocks."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    for f in tiny_llama_dir.glob("tok*"):
        (tmp_path / "bf16" / f.name).write_bytes(f.read_bytes())
    cfg = tiny_prune(tmp_path / "bf16", tmp_path / "run", batch_size=2, sequential=True, keep_acts=8)
    run = run_pipeline(cfg)
    assert run.dtype == torch.float32
    kwargs = load_kwargs(run)
    for i in range(run.num_blocks):
        block = load_pruned(cfg, run, i, run.dtype)
        written = read_shards(run.acts(i + 1))
        for j, x in enumerate(read_shards(run.acts(i)).iter_batches(1)):
            assert torch.equal(run_block(block, x, kwargs)[0], written[j]), (i, j)


UNWOUND: list[str] = []


class Routed(nn.Module):
    """Data-dependent routing: a batch goes through `a` or `b` by the sign of its sum."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.a(x) if x.sum() > 0 else self.b(x)
        finally:
            UNWOUND.append(type(self).__name__)


class Twice(nn.Module):
    """One layer applied twice in a forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            return self.a(torch.relu(self.a(x)))
        finally:
            UNWOUND.append(type(self).__name__)


@pytest.mark.parametrize(
    ("block", "message"), [(Routed(), r"Routed stop at different layers \(a, b\)"), (Twice(), "a runs twice")]
)
def test_a_block_that_cannot_be_split_raises_and_unwinds_every_batch(block, message):
    x = torch.randn(1, 4, 8)
    batches = [x.abs(), -x.abs(), x.abs()]
    UNWOUND.clear()
    with pytest.raises(NotSequential, match=message):
        prune_block_sequential(block, batches, {}, SolverConfig(), 0.5, outputs=lambda y: pytest.fail("no output"))
    assert UNWOUND == [type(block).__name__] * 3  # every parked forward ran its finally: nothing left suspended


def test_an_error_inside_the_forward_reaches_the_caller():
    class Failing(Twice):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                self.a(x)
                raise ValueError("inside the block")
            finally:
                UNWOUND.append("Failing")

    UNWOUND.clear()
    with pytest.raises(ValueError, match="inside the block"):
        prune_block_sequential(Failing(), [torch.randn(1, 4, 8)] * 2, {}, SolverConfig(), 0.5)
    assert UNWOUND == ["Failing"] * 2


def test_a_block_that_cannot_be_split_is_pruned_the_default_way(tiny_llama_dir, tmp_path, monkeypatch, caplog):
    """The fallback reloads the dense block (the failed pass may have solved some layers) and prunes it as the
    default mode does: here every block falls back, so the model equals a default run's."""

    def unsplittable(block, *args, **kwargs):
        for p in block.parameters():
            p.data.zero_()  # what a pass that failed halfway may leave behind
        raise NotSequential(f"the batches of {type(block).__name__} stop at different layers (x, y)")

    monkeypatch.setattr(oneshot, "prune_block_sequential", unsplittable)
    with caplog.at_level(logging.WARNING, logger="sparsegpt.pipeline"):
        run = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "seq", sequential=True))
    assert "block 0: the batches of LlamaDecoderLayer stop at different layers (x, y); it is pruned the default" in (
        caplog.text
    )
    default = run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "default"))
    ours, ref = model_state(run.model), model_state(default.model)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)


def test_magnitude_gives_the_default_modes_weights():
    """Magnitude pruning needs no Hessian: both modes give the same weights."""
    from stages.prune.pruning import prune_block

    torch.manual_seed(0)
    xs = [torch.randn(1, 4, 8) for _ in range(3)]
    a, b = Twice(), Twice()
    b.load_state_dict(a.state_dict())
    cfg = SolverConfig(method="magnitude")
    prune_block(a.a, lambda: xs, {}, cfg, 0.5)
    prune_block_sequential(b.a, xs, {}, cfg, 0.5)
    assert torch.equal(a.a.weight, b.a.weight) and (a.a.weight == 0).float().mean() == 0.5


@pytest.mark.parametrize(
    "options",
    [
        {"owl": True, "sparsity": 0.6, "owl_lambda": 0.1},
        {"wbits": 4},
        {"reconstruct": True, "reconstruct_target": "dense-block"},
        {"reconstruct": True, "reconstruct_target": "dense-stream", "nm": "2:4"},
    ],
    ids=["owl", "wbits4", "reconstruct-dense-block", "reconstruct-2:4"],
)
def test_sequential_with_owl_quantization_and_reconstruction(tiny_llama_dir, tmp_path, options):
    """Each block's layers reach the block's target; quantized weights keep at most 16 levels a row; a
    reconstructed block keeps its mask and records its loss before and after."""
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "run", batch_size=2, sequential=True, **options)
    run = run_pipeline(cfg)
    records = [oneshot.verify_record(run.block_record(i)) for i in range(run.num_blocks)]
    targets = [r["layers"]["mlp.up_proj"]["target"] for r in records]
    if cfg.solver.owl:
        assert max(targets) - min(targets) == pytest.approx(0.2)
    for record in records:
        for stats in record["layers"].values():
            assert stats["sparsity"] == pytest.approx(stats["target"], abs=0.02)
    state = model_state(run.model)
    W = state["model.layers.1.self_attn.o_proj.weight"]
    if cfg.solver.wbits == 4:
        assert max(len(torch.unique(row[row != 0])) for row in W) <= 16
    if cfg.reconstruct.enabled:
        assert all(
            r["reconstruct"]["after"] <= r["reconstruct"]["before"] or r["reconstruct"]["kept_solved"] for r in records
        )
    if cfg.solver.nm:
        assert bool(((W.reshape(W.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def test_sequential_that_cannot_fit_is_refused_before_any_work(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """Tiny Llama: 6 x 32 tokens x (2 x 32 + 64) float32 values = 96 KiB held at once by --sequential."""
    import stages.prune.check as check
    from flows.cli import main

    monkeypatch.setattr(check, "device_bytes", lambda device: 64 * 1024)
    args = ["prune", str(tiny_llama_dir), "--run-dir", str(tmp_path / "r"), "--nsamples", "6", "--seqlen", "32"]
    assert main([*args, "--sequential"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --sequential holds every calibration batch's activations of a block at once: about 0.0 GiB for "
        "6 x 32 tokens in float32, and cpu has 0.0 GiB; lower --nsamples or drop --sequential\n"
    )
    assert not (tmp_path / "r").exists()
    cfg = tiny_prune(tiny_llama_dir, tmp_path / "r", sequential=True)
    config = {"hidden_size": 32, "intermediate_size": 64}
    assert check.sequential_bytes(cfg, config, "float32") == 6 * 32 * 128 * 4
    check.check(tiny_prune(tiny_llama_dir, tmp_path / "d"))  # the default mode holds one batch: no such limit


@pytest.mark.parametrize("sequential", [False, True])
def test_layers_sharing_a_hessian_factor_it_once(tiny_llama_dir, tmp_path, monkeypatch, sequential):
    """q/k/v share one Hessian and gate/up another: 4 factorisations a Llama block instead of 7 (the weights
    stay bit-identical to the per-layer reference: the pipeline-vs-reference tests)."""
    from stages.prune import pruning

    calls = []
    real = pruning.hessian_inverse

    def counted(H, *args, **kwargs):
        calls.append(kwargs.get("name"))
        return real(H, *args, **kwargs)

    monkeypatch.setattr(pruning, "hessian_inverse", counted)
    run_pipeline(tiny_prune(tiny_llama_dir, tmp_path / "run", sequential=sequential))
    assert len(calls) == 4 * 3  # the tiny Llama's 3 blocks
    assert [name.rsplit(".", 1)[-1] for name in calls[:4]] == ["q_proj", "o_proj", "gate_proj", "down_proj"]
