"""The scale harness's helpers on tiny widths: checkpoint writer, process monitor, Hessian sharing."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.scale_ckpt import build_config, load_check, tokenizer_ids, write_checkpoint
from benchmarks.scale_model import shape_of
from benchmarks.scale_monitor import run_measured

TINY = {
    "llama3-8b": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "smollm2-1.7b": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4),
    "qwen2.5-7b": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    "opt-6.7b": dict(hidden_size=32, ffn_dim=64, num_attention_heads=4, word_embed_proj_dim=32),
}
SMALL_SHARDS = 16e3 / 2**30  # ~16 kB shards: several per checkpoint


@pytest.mark.parametrize("shape", sorted(TINY))
def test_checkpoint_loads_without_missing_or_unexpected_keys(shape: str, tmp_path: Path, tiny_llama_dir: Path) -> None:
    out = tmp_path / "ckpt"
    marker = write_checkpoint(
        shape, out, blocks=2, shard_gib=SMALL_SHARDS, overrides=TINY[shape], tok_dir=tiny_llama_dir
    )
    assert not marker["reused"] and len(marker["files"]) > 1
    assert load_check(out) == ([], [])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["dtype"] == "bfloat16"
    assert {k: cfg[k] for k in tokenizer_ids(tiny_llama_dir)} == tokenizer_ids(tiny_llama_dir)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert ("lm_head.weight" in weight_map) == (not cfg["tie_word_embeddings"])
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.dim() == 1:
            assert torch.all(p == 1), name
        else:
            assert 0.01 < p.float().std() < 0.03, name
    logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert torch.isfinite(logits).all()


def test_checkpoint_is_reused_only_with_the_same_identity(tmp_path: Path, tiny_llama_dir: Path) -> None:
    out, tiny = tmp_path / "ckpt", TINY["llama3-8b"]
    write_checkpoint("llama3-8b", out, blocks=1, overrides=tiny, tok_dir=tiny_llama_dir)
    shard = next(out.glob("model-*.safetensors"))
    stamp = shard.stat().st_mtime_ns
    assert write_checkpoint("llama3-8b", out, blocks=1, overrides=tiny, tok_dir=tiny_llama_dir)["reused"]
    assert shard.stat().st_mtime_ns == stamp
    again = write_checkpoint("llama3-8b", out, blocks=2, overrides=tiny, tok_dir=tiny_llama_dir)
    assert not again["reused"] and again["num_hidden_layers"] == 2
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="choose another --work"):
        write_checkpoint("llama3-8b", out, blocks=1, overrides=tiny, tok_dir=tiny_llama_dir)


def test_blocks_outside_the_depth_are_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(ValueError, match="--blocks must be 1..32"):
        build_config("llama3-8b", 33, tiny_llama_dir)


def test_monitor_measures_memory_io_disk_and_kills(tmp_path: Path) -> None:
    watch = tmp_path / "run"
    code = (
        "import os, subprocess, sys; os.makedirs(sys.argv[1]); x = bytearray(200 << 20); "
        "open(os.path.join(sys.argv[1], 'f'), 'wb').write(bytes(50 << 20)); "
        "subprocess.run([sys.executable, '-c', 'open(\"/dev/null\", \"wb\").write(bytes(30 << 20))'])"
    )
    m = run_measured(
        [sys.executable, "-c", code, str(watch)],
        tmp_path,
        {},
        tmp_path / "log",
        watch=watch,
        interval=0.01,
        du_every=0.01,
    )
    assert m.failure is None and m.peak_rss_max >= 200 << 20
    assert m.io["wchar"] >= (50 + 30) << 20  # the grandchild's writes are counted too
    assert m.disk_end >= 50 << 20 and m.disk_peak >= m.disk_end
    killed = run_measured(
        [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"],
        tmp_path,
        {},
        tmp_path / "log2",
    )
    assert killed.failure == "killed by SIGKILL"


@pytest.mark.parametrize("shape", ["llama3-8b", "opt-6.7b"])
def test_one_hessian_per_distinct_input(shape: str, tiny_llama_dir: Path) -> None:
    s = shape_of(build_config(shape, 2, tiny_llama_dir, TINY[shape]))
    owners = {li.owner for li in s.linears}
    assert len(s.linears) in (6, 7) and len(owners) == 4  # q/k/v share one, gate/up share one (Llama)
    assert s.layers == 2 and s.P == sum(li.rows * li.cols for li in s.linears)
    assert s.block_params >= s.P and s.total_params > 2 * s.block_params > 0
    assert s.hidden == 32
