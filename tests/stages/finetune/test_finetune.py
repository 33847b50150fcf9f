"""Tests for stages.finetune.finetune: fixed masks, distillation losses, bit-exact resume, config checks.

All on the tiny random Llama of conftest (3 blocks, hidden 32, char tokenizer) and a small
repetitive text corpus; a few dozen optimizer steps in all.
"""

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import stages.finetune.finetune as ft
from stages.finetune.config import FinetuneConfig, FinetuneRuntime, lr_factor
from stages.finetune.data import TokenWindows, prepare_windows
from stages.finetune.finetune import finetune
from stages.finetune.loss import BlockOutputs, derive_masks, kl_loss, squarehead_loss
from stages.model.blocks import find_blocks, find_layers
from stages.model.models import load_tokenizer
from tests.stages.finetune.conftest import TEXT


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Run these tiny models on one CPU thread: thread start-up costs more than it saves here."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pruned_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with 50% of every block linear zeroed by magnitude (per layer)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for layer in find_layers(block).values():
                W = layer.weight  # (out, in)
                k = W.numel() // 2
                threshold = W.abs().flatten().kthvalue(k).values
                W[W.abs() <= threshold] = 0
    folder = tmp_path_factory.mktemp("pruned")
    model.save_pretrained(folder)
    load_tokenizer(tiny_llama_dir).save_pretrained(folder)
    return folder


def make_cfg(dataset: str, **overrides: object) -> FinetuneConfig:
    """A small config: windows of 32 tokens, micro-batch 2, fp32 on CPU."""
    base = dict(
        dataset=dataset,
        steps=6,
        seqlen=32,
        micro_batch_size=2,
        grad_accum=1,
        lr=1e-2,
        warmup_steps=1,
        max_grad_norm=1.0,
    )
    return FinetuneConfig(**{**base, **overrides})


def masked_params(model_dir: Path) -> dict[str, torch.Tensor]:
    """The block linear weights of a saved model, by parameter name."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return {k: v.detach() for k, v in model.named_parameters() if k in derive_masks(model)}


def test_masked_weights_stay_zero_with_weight_decay(
    pruned_dir: Path, tiny_llama_dir: Path, corpus: str, tmp_path: Path
) -> None:
    cfg = make_cfg(corpus, steps=15, grad_accum=2, weight_decay=0.1, kl=1.0, squarehead=1.0)
    result = finetune(pruned_dir, tiny_llama_dir, tmp_path, cfg)
    before, after = masked_params(pruned_dir), masked_params(tmp_path / "model")
    assert before.keys() == after.keys() and len(before) == 3 * 7
    for name, W in before.items():
        pruned = W == 0
        assert torch.all(after[name][pruned] == 0), name
        assert int((after[name] == 0).sum()) == int(pruned.sum()), f"{name}: sparsity changed"
        assert not torch.equal(after[name], W), f"{name} was not trained"
    assert result["sparsity"]["zeros"] == result["sparsity"]["mask"] == pytest.approx(0.5, abs=0.01)
    assert len(result["losses"]) == 15 and result["tokens"] == 15 * 2 * 2 * 32
    assert {"lm", "kl", "squarehead", "grad_norm", "lr"} <= result["losses"][0].keys()


def test_loss_decreases_on_repetitive_text(tiny_llama_dir: Path, corpus: str, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, steps=30, kl=0.0, lm=1.0, schedule="linear")
    result = finetune(tiny_llama_dir, None, tmp_path, cfg)
    losses = [e["lm"] for e in result["losses"]]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.75 * first, (first, last)
    assert (tmp_path / "model" / "tokenizer.json").is_file()


def test_resume_gives_the_same_weights(
    pruned_dir: Path, tiny_llama_dir: Path, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(corpus, steps=7, grad_accum=2, weight_decay=0.1, squarehead=0.5)
    every2 = FinetuneRuntime(checkpoint_every=2)
    straight = finetune(pruned_dir, tiny_llama_dir, tmp_path / "a", cfg, every2)
    # slice 1: a clean stop after step 3 (checkpoint written at 2 and at 3)
    stopped = finetune(pruned_dir, tiny_llama_dir, tmp_path / "b", cfg, every2, stop_after=3)
    assert stopped["stopped_at"] == 3
    # slice 2: resumes at 3, checkpoints at 4, crashes during step 6 (steps 5's progress is lost)
    calls = []
    real_step = ft.train_step

    def crashing(tr):  # noqa: ANN001, ANN202
        calls.append(tr.step)
        if tr.step == 5:
            raise RuntimeError("simulated crash")
        return real_step(tr)

    monkeypatch.setattr(ft, "train_step", crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        finetune(pruned_dir, tiny_llama_dir, tmp_path / "b", cfg, every2)
    assert calls == [3, 4, 5]
    # slice 3: resumes from the checkpoint of step 4 and finishes
    calls.clear()
    monkeypatch.setattr(ft, "train_step", lambda tr: (calls.append(tr.step), real_step(tr))[1])
    resumed = finetune(pruned_dir, tiny_llama_dir, tmp_path / "b", cfg, every2)
    assert calls == [4, 5, 6]
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["losses"] == straight["losses"] and resumed["windows"] == straight["windows"]
    assert not (tmp_path / "b" / "ckpt").exists()
    # a finished out_dir returns its record without training
    calls.clear()
    assert finetune(pruned_dir, tiny_llama_dir, tmp_path / "b", cfg, every2)["losses"] == straight["losses"]
    assert calls == []


def test_resume_on_every_architecture(tiny_model_dir: Path, corpus: str, tmp_path: Path) -> None:
    """Tied embeddings (OPT, GPT-2) and Conv1D (GPT-2) survive a checkpoint round trip bit-exactly."""
    cfg = make_cfg(corpus, steps=3, lm=1.0, kl=1.0, squarehead=1.0, weight_decay=0.1)
    straight = finetune(tiny_model_dir, tiny_model_dir, tmp_path / "a", cfg)
    finetune(tiny_model_dir, tiny_model_dir, tmp_path / "b", cfg, stop_after=1)
    resumed = finetune(tiny_model_dir, tiny_model_dir, tmp_path / "b", cfg)
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["losses"] == straight["losses"]


def test_without_the_mask_pruned_weights_revive(
    pruned_dir: Path, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Control for the mask test: with gradient masking and re-masking off, pruned weights move."""
    import stages.finetune.train as train

    monkeypatch.setattr(train, "mask_gradients", lambda params, masks: None)
    monkeypatch.setattr(train, "apply_masks", lambda params, masks: None)
    finetune(pruned_dir, None, tmp_path, make_cfg(corpus, steps=2, kl=0.0, weight_decay=0.1))
    before, after = masked_params(pruned_dir), masked_params(tmp_path / "model")
    assert all(int((after[k] == 0).sum()) < int((W == 0).sum()) for k, W in before.items())


def test_resume_refuses_a_different_config(tiny_llama_dir: Path, corpus: str, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, steps=3, kl=0.0)
    finetune(tiny_llama_dir, None, tmp_path, cfg, stop_after=1)
    with pytest.raises(ValueError, match="different configuration.*lr"):
        finetune(tiny_llama_dir, None, tmp_path, replace(cfg, lr=2e-2))
    finetune(tiny_llama_dir, None, tmp_path, cfg, FinetuneRuntime(checkpoint_every=5))  # the runtime may change


def test_kl_is_zero_when_student_is_teacher(tiny_llama_dir: Path, corpus: str, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, steps=1, lm=0.0, kl=1.0, squarehead=1.0, temperature=2.0)
    entry = finetune(tiny_llama_dir, tiny_llama_dir, tmp_path, cfg)["losses"][0]
    assert entry["kl"] == 0.0 and entry["squarehead"] == 0.0 and entry["total"] == 0.0
    x = torch.randn(2, 5, 11)
    assert kl_loss(x, x, 2.0).item() == 0.0
    # T^2 * KL(p_t || p_s) against the formula
    y = torch.randn(2, 5, 11)
    p_t, log_s = torch.softmax(y / 2.0, -1), torch.log_softmax(x / 2.0, -1)
    expected = 4.0 * (p_t * (p_t.log() - log_s)).sum(-1).mean()
    torch.testing.assert_close(kl_loss(x, y, 2.0), expected)


def test_squarehead_matches_hand_computation(pruned_dir: Path, tiny_llama_dir: Path) -> None:
    student = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    cap_s, cap_t = BlockOutputs(student), BlockOutputs(teacher)
    ids = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states
        student(input_ids=ids)
    s_out, t_out = cap_s.take(), cap_t.take()
    assert len(s_out) == len(t_out) == 3
    torch.testing.assert_close(t_out[0], hidden[1])  # the hook sees block 0's output
    s, t = s_out[1], t_out[1]  # (2, 16, 32)
    n = s.numel()
    by_hand = (sum(float(v) ** 2 for v in (s - t).flatten()) / n) / (sum(float(v) ** 2 for v in t.flatten()) / n)
    assert squarehead_loss([s], [t]).item() == pytest.approx(by_hand, rel=1e-5)
    total = squarehead_loss(s_out, t_out).item()
    assert total == pytest.approx(
        sum(squarehead_loss([a], [b]).item() for a, b in zip(s_out, t_out, strict=True)), rel=1e-6
    )
    cap_s.remove()
    cap_t.remove()


def test_windows_are_served_in_seeded_epochs(tiny_llama_dir: Path, corpus: str, tmp_path: Path) -> None:
    path = prepare_windows(load_tokenizer(tiny_llama_dir), corpus, 32, tmp_path / "tokens.arrow")
    data = TokenWindows(path, seed=3)
    n = len(data)
    assert n == len(TEXT) // 32
    epoch = data.batch(0, n)
    assert sorted(data.permutation(0).tolist()) == list(range(n)) and epoch.shape == (n, 32)
    assert torch.equal(data.batch(5, 4), epoch[5:9])
    assert torch.equal(TokenWindows(path, seed=3).batch(n - 1, 3)[1:], data.batch(n, 2))
    assert not torch.equal(TokenWindows(path, seed=4).batch(0, n), epoch)


def test_lr_schedule_warms_up_and_decays_to_the_floor() -> None:
    cfg = FinetuneConfig(steps=11, warmup_steps=2, min_lr_ratio=0.1, schedule="cosine")
    assert [lr_factor(s, cfg) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(10, cfg) == pytest.approx(0.1)
    linear = replace(cfg, schedule="linear")
    assert lr_factor(6, linear) == pytest.approx(0.55)
    assert FinetuneConfig(tokens=5000, seqlen=100, micro_batch_size=2, grad_accum=3).total_steps == 9


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(tokens=-1), "tokens must be >= 0"),
        (dict(steps=0), "steps must be >= 1"),
        (dict(steps=5, seqlen=1), "seqlen must be >= 2"),
        (dict(steps=5, lr=0.0), "lr must be a positive"),
        (dict(steps=5, warmup_steps=6), "lower warmup_steps"),
        (dict(steps=5, schedule="step"), "schedule must be one of"),
        (dict(steps=5, min_lr_ratio=1.5), r"min_lr_ratio must be in \[0, 1\]"),
        (dict(steps=5, betas=(0.9, 1.0)), "betas must be two numbers"),
        (dict(steps=5, weight_decay=-1.0), "weight_decay must be >= 0"),
        (dict(steps=5, max_grad_norm=0.0), "or None to disable clipping"),
        (dict(steps=5, kl=-1.0), "loss weight kl"),
        (dict(steps=5, lm=0.0, kl=0.0), "set lm, kl or squarehead"),
        (dict(steps=5, temperature=0.0), "temperature must be > 0"),
        (dict(steps=5, autocast="fp8"), "autocast must be one of"),
        (dict(steps=5, dataset="nope"), "unknown dataset"),
    ],
)
def test_bad_config_raises_with_the_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(**kwargs)


def test_bad_inputs_raise_with_the_fix(tiny_llama_dir: Path, corpus: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="pass teacher_dir"):
        finetune(tiny_llama_dir, None, tmp_path / "a", make_cfg(corpus, kl=1.0))
    with pytest.raises(ValueError, match="set seqlen <= 64"):
        finetune(tiny_llama_dir, None, tmp_path / "b", make_cfg(corpus, kl=0.0, seqlen=128))
    bad = {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3, dtype=torch.bool)}
    with pytest.raises(ValueError, match="must be a bool tensor of shape"):
        finetune(tiny_llama_dir, None, tmp_path / "c", make_cfg(corpus, kl=0.0), masks=bad)
    with pytest.raises(ValueError, match="set autocast='none'"):
        finetune(
            tiny_llama_dir, None, tmp_path / "d", make_cfg(corpus, kl=0.0, autocast="bf16"), FinetuneRuntime("cpu")
        )
    with pytest.raises(ValueError, match="checkpoint_every must be >= 0"):
        FinetuneRuntime(checkpoint_every=-1)


def test_gradient_checkpointing_gives_the_same_weights(
    pruned_dir: Path, tiny_llama_dir: Path, corpus: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recomputing the blocks' activations in the backward pass changes memory, not the result."""
    cfg = make_cfg(corpus, steps=3, squarehead=0.5)
    enabled: list[bool] = []
    real = ft.train_step

    def step(tr):  # noqa: ANN001, ANN202
        enabled.append(any(getattr(m, "gradient_checkpointing", False) for m in tr.student.modules()))
        return real(tr)

    monkeypatch.setattr(ft, "train_step", step)
    plain = finetune(pruned_dir, tiny_llama_dir, tmp_path / "a", cfg)
    saving = finetune(pruned_dir, tiny_llama_dir, tmp_path / "b", cfg, FinetuneRuntime(gradient_checkpointing=True))
    assert enabled == [False] * 3 + [True] * 3
    a = load_file(tmp_path / "a" / "model" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)
    assert [e["total"] for e in saving["losses"]] == pytest.approx([e["total"] for e in plain["losses"]], rel=1e-5)
