"""Tests for stages.finetune.sharded: the fine-tune on two FSDP2 ranks (gloo, this CPU).

Tiny random models of each architecture with dropout off (dropout draws differ between
one process and two ranks; nothing else may): the loss curve and weights equal one
process's within float rounding, the mask holds exactly, a resume on two ranks is
bit-identical (a clean stop and a real SIGKILL of the whole process group), and bad
input is refused with the fix before or from the ranks.
"""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages.finetune.config import FinetuneConfig, FinetuneRuntime
from stages.finetune.finetune import finetune
from stages.finetune.sharded import check_sharded
from stages.model.blocks import find_blocks, find_layers
from tests.conftest import tiny_config, tiny_tokenizer

DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout", "attention_dropout", "activation_dropout")
TWO = FinetuneRuntime(checkpoint_every=2, nproc=2)


def save_pair(kind: str, folder: Path) -> tuple[Path, Path]:
    """(dense, pruned) tiny models of `kind` without dropout; pruned: half of each block linear zeroed."""
    config = tiny_config(kind)
    for name in DROPOUTS:
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    dense, pruned = folder / "dense", folder / "pruned"
    model.save_pretrained(dense)
    _, blocks = find_blocks(model)
    with torch.no_grad():
        for block in blocks:
            for layer in find_layers(block).values():
                W = layer.weight  # (out, in), or (in, out) for GPT-2's Conv1D
                W[W.abs() <= W.abs().flatten().kthvalue(W.numel() // 2).values] = 0
    model.save_pretrained(pruned)
    for path in (dense, pruned):
        tiny_tokenizer().save_pretrained(path)
    return dense, pruned


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return save_pair("llama", tmp_path_factory.mktemp("llama"))


def make_cfg(dataset: str, **overrides: object) -> FinetuneConfig:
    """6 steps of 4 windows of 32 tokens (2 micro-batches of 2), every loss term on."""
    base = dict(dataset=dataset, steps=6, seqlen=32, micro_batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=1)
    return FinetuneConfig(**{**base, "squarehead": 1.0, "weight_decay": 0.1, **overrides})


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "model" / "model.safetensors")


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_two_ranks_follow_one_process(kind: str, corpus: str, tmp_path: Path) -> None:
    dense, pruned = save_pair(kind, tmp_path)
    cfg = make_cfg(corpus)
    one = finetune(pruned, dense, tmp_path / "one", cfg, FinetuneRuntime(checkpoint_every=2))
    steps: list[int] = []
    two = finetune(pruned, dense, tmp_path / "two", cfg, TWO, on_step=lambda i, n, losses: steps.append(i))
    assert steps == [1, 2, 3, 4, 5, 6] and two["ranks"] == 2 and len(two["peak"]) == 2
    for a, b in zip(one["losses"], two["losses"], strict=True):
        assert a.keys() == b.keys()
        for name in a:
            assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-7), (a["step"], name)
    assert two["windows"] == one["windows"] == 24 and two["sparsity"] == one["sparsity"]
    a, b, before = weights(tmp_path / "one"), weights(tmp_path / "two"), load_file(pruned / "model.safetensors")
    assert a.keys() == b.keys() == before.keys()  # the student's names (tied lm_head left out as it was)
    for name in a:
        assert b[name].dtype == before[name].dtype
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4)
        pruned_out = before[name] == 0
        if name.endswith("weight") and pruned_out.float().mean() >= 0.5:  # a block linear: the mask held exactly
            assert (b[name][pruned_out] == 0).all() and (b[name] != before[name]).any(), name
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "model")
    assert sum(p.numel() for p in model.parameters()) == two["parameters"]
    assert not (tmp_path / "two" / "ckpt").exists()


def test_resume_on_two_ranks_is_bit_identical(llama: tuple[Path, Path], corpus: str, tmp_path: Path) -> None:
    dense, pruned = llama
    cfg = make_cfg(corpus)
    straight = finetune(pruned, dense, tmp_path / "a", cfg, TWO)
    stopped = finetune(pruned, dense, tmp_path / "b", cfg, TWO, stop_after=3)
    assert stopped["stopped_at"] == 3 and [e["step"] for e in stopped["losses"]] == [1, 2, 3]
    assert (tmp_path / "b" / "ckpt" / "step_00000003" / "dcp" / ".metadata").is_file()
    with pytest.raises(ValueError, match="written by sharded ranks; resume it with --nproc 2 or more"):
        finetune(pruned, dense, tmp_path / "b", cfg, FinetuneRuntime())  # one process cannot take it over
    # the runtime may change on a resume: recomputing activations (non-reentrant, inside FSDP's hooks) gives
    # the very same gradients
    resumed = finetune(pruned, dense, tmp_path / "b", cfg, replace(TWO, gradient_checkpointing=True))
    assert resumed["losses"] == straight["losses"]
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a finished out_dir is found whatever the rank count (the identity holds the same mask digest)
    assert finetune(pruned, dense, tmp_path / "b", cfg, FinetuneRuntime())["losses"] == straight["losses"]


SCRIPT = """
import sys
from pathlib import Path
from stages.finetune.config import FinetuneConfig, FinetuneRuntime
from stages.finetune.finetune import finetune

if __name__ == "__main__":
    dense, pruned, out, dataset = (Path(a) for a in sys.argv[1:5])
    cfg = FinetuneConfig(dataset=str(dataset), steps=int(sys.argv[5]), seqlen=32, micro_batch_size=2, grad_accum=2,
                         lr=1e-2, warmup_steps=1, squarehead=1.0, weight_decay=0.1)
    finetune(pruned, dense, out, cfg, FinetuneRuntime(checkpoint_every=2, nproc=2))
"""


def test_sigkill_of_the_ranks_resumes_bit_identically(llama: tuple[Path, Path], corpus: str, tmp_path: Path) -> None:
    """SIGKILL of the launcher and both ranks after a checkpoint, then the same call: the weights of an
    uninterrupted two-rank run."""
    dense, pruned = llama
    cfg = make_cfg(corpus, steps=40)
    script = tmp_path / "run.py"
    script.write_text(SCRIPT, encoding="utf-8")
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    args = [sys.executable, str(script), str(dense), str(pruned), str(out), cfg.dataset, str(cfg.steps)]
    proc = subprocess.Popen(args, env=env, start_new_session=True)
    deadline, seen = time.monotonic() + 300, out / "ckpt" / "step_00000004" / "done.json"
    while not seen.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert seen.is_file(), "no checkpoint of step 4 before the kill"
    assert not (out / "finetune.json").exists()
    resumed = finetune(pruned, dense, out, cfg, TWO)
    straight = finetune(pruned, dense, tmp_path / "straight", cfg, TWO)
    assert resumed["losses"] == straight["losses"]
    a, b = weights(tmp_path / "straight"), weights(out)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_is_refused_with_the_fix(llama: tuple[Path, Path], corpus: str, tmp_path: Path) -> None:
    dense, pruned = llama
    few = make_cfg(corpus, micro_batch_size=1, grad_accum=1)
    with pytest.raises(ValueError, match=r"splits each step's 1 windows .* or use --nproc 1"):
        check_sharded(few, TWO, dense)
    with pytest.raises(ValueError, match="use bf16"):
        check_sharded(make_cfg(corpus, autocast="fp16"), FinetuneRuntime(device="cuda", nproc=2), dense)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match=r"--nproc 2 needs 2 GPUs, torch sees"):
            check_sharded(make_cfg(corpus), FinetuneRuntime(device="cuda", nproc=2), dense)
    with pytest.raises(ValueError, match="need a dense teacher"):
        check_sharded(make_cfg(corpus), TWO, None)
    with pytest.raises(ValueError, match="pass masks=None with nproc > 1"):
        finetune(pruned, dense, tmp_path / "m", make_cfg(corpus), TWO, masks={})
    # found on a rank (the model's positions): the rank's one-line ValueError, the other rank stopped
    with pytest.raises(ValueError, match=r"seqlen=100000 exceeds the model's \d+ positions"):
        finetune(pruned, dense, tmp_path / "s", make_cfg(corpus, seqlen=100000), TWO)
    assert not (tmp_path / "s" / "finetune.json").exists()
    # a one-process checkpoint is not taken over by ranks either
    finetune(pruned, dense, tmp_path / "one", make_cfg(corpus), FinetuneRuntime(checkpoint_every=2), stop_after=2)
    with pytest.raises(ValueError, match="written by one process; resume it with --nproc 1"):
        finetune(pruned, dense, tmp_path / "one", make_cfg(corpus), TWO)


def test_a_resume_may_change_the_rank_count(llama: tuple[Path, Path], corpus: str, tmp_path: Path) -> None:
    """Two ranks stop after step 3, three ranks finish: the checkpoint (weights and AdamW state) is resharded on
    load. Step 4 starts from the same weights, so its terms that are means over windows (lm, kl) equal the
    uninterrupted run's; SquareHead normalises per micro-batch, and three ranks group the windows 1/1/2 instead
    of 2/2, so the rest moves by that grouping only."""
    dense, pruned = llama
    cfg = make_cfg(corpus)
    straight = finetune(pruned, dense, tmp_path / "a", cfg, TWO)
    finetune(pruned, dense, tmp_path / "b", cfg, TWO, stop_after=3)
    resumed = finetune(pruned, dense, tmp_path / "b", cfg, replace(TWO, nproc=3))
    assert resumed["ranks"] == 3 and resumed["losses"][:3] == straight["losses"][:3]
    a, b = straight["losses"][3], resumed["losses"][3]
    assert (
        b["step"] == 4 and b["lm"] == pytest.approx(a["lm"], rel=1e-5) and b["kl"] == pytest.approx(a["kl"], rel=1e-5)
    )
    for a, b in zip(straight["losses"][3:], resumed["losses"][3:], strict=True):
        assert b["total"] == pytest.approx(a["total"], rel=1e-2), a["step"]
    assert resumed["sparsity"] == straight["sparsity"]
