"""Bad input ends with a one-line error naming the problem and the fix, and a resumable run dir.

Options the config rejects, and what `check` finds before Prefect starts, are tested through the
CLI in test_bad_input_cli.py. Problems found by the stages
are tested through `run_pipeline`: they are raised before `run.json` is written when
they concern the options (so the same run dir takes the corrected command), or leave
finished work in place when they happen mid-run (so the same command resumes).
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, BartConfig, BertConfig, BertModel

import stages.data.calibration
import stages.model.assemble
import stages.model.blocks
import stages.prune.oneshot
import stages.prune.streams
from sparsegpt import HessianError
from stages.config import PruneConfig
from stages.model.checkpoint import resolve_model
from stages.prune.oneshot import prepare, run_pipeline
from stages.run.rundir import RunError
from tests.configs import tiny_prune
from tests.conftest import tiny_config, tiny_tokenizer


def tiny_cfg(model_dir: Path, run_dir: Path, **kw) -> PruneConfig:
    return tiny_prune(model_dir, run_dir, **{"batch_size": 2, **kw})


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg.strip(), msg
    return msg


# ---------------------------------------------------------------- models the stages refuse


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> dict[str, Path]:
    """Checkpoints that are not what the pipeline can prune."""
    root = tmp_path_factory.mktemp("odd-models")
    bert = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)
    BertModel(bert).save_pretrained(root / "bert")  # an encoder without an LM head
    # BartForCausalLM counts num_hidden_layers = encoder_layers, but its decoder has 3 blocks:
    # no ModuleList has num_hidden_layers entries, so the blocks cannot be found.
    bart = BartConfig(
        d_model=32,
        encoder_layers=2,
        decoder_layers=3,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=128,
        max_position_embeddings=64,
    )
    AutoModelForCausalLM.from_config(bart).save_pretrained(root / "bart")
    for name, model_type in (("remote", "my-custom-lm"), ("remote-native", "llama")):
        folder = root / name
        shutil.copytree(tiny_llama_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config.update(
            model_type=model_type,
            auto_map={"AutoConfig": "configuration_my.MyConfig", "AutoModelForCausalLM": "modeling_my.MyForCausalLM"},
        )
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    # hidden 32, MLP width 40: an N:M of M=16 fits the hidden size but not down_proj's input
    odd_ffn = tiny_config("llama")
    odd_ffn.intermediate_size = 40
    AutoModelForCausalLM.from_config(odd_ffn).save_pretrained(root / "odd-ffn")
    tiny_tokenizer().save_pretrained(root / "odd-ffn")
    return {
        "odd-ffn": root / "odd-ffn",
        "bert": root / "bert",
        "bart": root / "bart",
        "remote": root / "remote",
        "remote-native": root / "remote-native",
    }


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        ("missing", {}, r"model path .*nope does not exist; pass an existing directory"),
        ("bert", {}, r"holds a BertModel .*not a causal language model.*pass a checkpoint saved from a causal LM"),
        ("bart", {}, r"architecture BartForCausalLM: cannot find its decoder blocks .*only models whose"),
        ("remote", {}, r"needs its own Python code .*pass --trust-remote-code"),
        ("llama", {"seqlen": 100}, r"seqlen 100 is beyond the model's 64 positions; use --seqlen 64 or less"),
        (
            "llama",
            {"nm": "2:5", "blocksize": 20},
            r"--nm 2:5 does not fit the model: its hidden size 32 \(the input width of the layers that read each "
            r"block's input\) is not a multiple of M=5; choose an M",
        ),
        (
            "odd-ffn",
            {"nm": "2:16"},
            r"--nm 2:16 does not fit layer model\.layers\.0\.mlp\.down_proj: its input width 40 is not "
            r"a multiple of M=16; choose an M",
        ),
    ],
    ids=[
        "missing-path",
        "not-causal-lm",
        "blocks-not-found",
        "remote-code",
        "seqlen-too-long",
        "nm-hidden",
        "nm-layer-width",
    ],
)
def test_stages_refuse_before_the_run_starts(odd_models, tiny_llama_dir, tmp_path, model, options, expected) -> None:
    path = {"missing": tmp_path / "nope", "llama": tiny_llama_dir}.get(model) or odd_models[model]
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=expected) as info:
        run_pipeline(tiny_cfg(path, run_dir, **options))
    one_line(info)
    assert not (run_dir / "run.json").exists()  # the run's identity is not pinned yet


def test_remote_code_needs_trust_and_is_never_run_without_it(odd_models, caplog) -> None:
    with pytest.raises(
        ValueError, match=r"model_type 'my-custom-lm' is not built into transformers.*--trust-remote-code"
    ):
        resolve_model(odd_models["remote"])
    # A built-in model_type is built by transformers itself; the repo's code is ignored, with a warning.
    with caplog.at_level(logging.WARNING, logger="sparsegpt.models"):
        assert resolve_model(odd_models["remote-native"]) == odd_models["remote-native"].resolve()
    assert "not run without --trust-remote-code" in caplog.text


# ---------------------------------------------------------------- problems found mid-run


def test_corpus_too_short_then_resumes_with_a_longer_one(tiny_llama_dir, tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("too short")
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run", calib=f"text={corpus}")
    too_short = r"has 9 tokens, too few for windows of seqlen=32 .*Use a larger corpus or a smaller seqlen"
    with pytest.raises(ValueError, match=too_short):
        run_pipeline(cfg)
    corpus.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    run = run_pipeline(cfg)  # the same command, same run dir
    assert stages.prune.oneshot.verify_record(run.model_record) is not None


def test_different_config_is_refused_key_by_key(tiny_llama_dir, tmp_path) -> None:
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    prepare(cfg)
    with pytest.raises(
        RunError,
        match=r"holds a run with different options: solver\.nm: null \(run dir\) != \"2:4\" \(this command\); "
        r"solver\.sparsity: 0\.5 \(run dir\) != 0\.6 \(this command\)\. Use a new --run-dir",
    ) as info:
        run_pipeline(cfg.updated(sparsity=0.6, nm="2:4"))
    one_line(info)
    prepare(cfg)  # the run dir still takes its own command


def test_a_checkpoint_replaced_under_a_run_is_refused(tiny_llama_dir, tmp_path) -> None:
    """Same names, dtypes and shapes, other values (a fine-tuned checkpoint copied over the old one)."""
    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    cfg = tiny_cfg(model, tmp_path / "run")
    prepare(cfg)
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"] += 1e-3
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RunError, match=r"holds a run with different options: model_revision: \"\w+\" \(run dir\) != "):
        run_pipeline(cfg)


def test_disk_full_mid_run_then_resume_gives_identical_weights(tiny_llama_dir, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(stages.prune.streams, "SAMPLES_PER_SHARD", 2)
    reference = model_tensors(run_pipeline(tiny_cfg(tiny_llama_dir, tmp_path / "reference")).model)
    cfg = tiny_cfg(tiny_llama_dir, tmp_path / "run")
    run_dir = Path(cfg.run_dir)
    full = OSError(errno.ENOSPC, "No space left on device")

    def no_space(path, mode="r", *args, **kwargs):
        raise full

    with monkeypatch.context() as m:  # 0: the disk is full when the calibration tokens are written
        m.setattr(stages.data.calibration, "open", no_space, raising=False)
        with pytest.raises(RunError, match=r"^disk full while writing .*calib/tokens\.arrow"):
            run_pipeline(cfg)

    real_save = stages.model.blocks.save_file

    def save_file(tensors, filename, metadata=None):
        if "block_001" in filename:
            Path(filename).write_bytes(b"partial")
            raise full
        return real_save(tensors, filename, metadata=metadata)

    with monkeypatch.context() as m:  # 1: the disk fills while block 1's weights are written
        m.setattr(stages.model.blocks, "save_file", save_file)
        with pytest.raises(
            RunError,
            match=r"^disk full while writing .*blocks/block_001\.safetensors: free space on that "
            r"file system, then rerun the same command to resume",
        ) as info:
            run_pipeline(cfg)
    one_line(info)
    block0 = run_dir / "blocks" / "block_000.json"
    stamp = block0.stat().st_mtime_ns

    real_osfile = pa.OSFile

    def osfile(path, mode="r"):
        if "block_002" in path and "shard-00001" in path and "w" in mode:
            raise full
        return real_osfile(path, mode)

    with monkeypatch.context() as m:  # 2: the disk fills while block 1's outputs are written
        m.setattr(pa, "OSFile", osfile)
        with pytest.raises(RunError, match=r"^disk full while writing .*acts/block_002/shard-00001\.arrow"):
            run_pipeline(cfg)
    assert not (run_dir / "blocks" / "block_001.json").exists()

    real_stream = stages.model.assemble._stream_safetensors

    def stream(path, units):
        Path(path).write_bytes(b"partial")
        raise full

    with monkeypatch.context() as m:  # 3: the disk fills while model/ is assembled
        m.setattr(stages.model.assemble, "_stream_safetensors", stream)
        with pytest.raises(RunError, match=r"^disk full while writing .*run/model: free space") as info:
            run_pipeline(cfg)
    one_line(info)
    assert not (run_dir / "model").exists() and not (run_dir / "model.json").exists()
    assert real_stream is stages.model.assemble._stream_safetensors

    run = run_pipeline(cfg)  # 4: space freed, the same command finishes
    assert block0.stat().st_mtime_ns == stamp  # block 0 was not redone
    ours = model_tensors(run.model)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in reference)
    assert not [p for p in run_dir.rglob("*") if ".tmp-" in p.name or p.name.startswith(".trash-")]


def test_singular_hessian_names_the_layer_and_damping_retries_fix_it(tiny_llama_dir, tmp_path, caplog) -> None:
    corpus = tmp_path / "a.txt"
    corpus.write_text("a" * 400)  # one repeated token: every layer input is the same vector, H has rank 1
    cfg = tiny_cfg(
        tiny_llama_dir, tmp_path / "run", calib=f"text={corpus}", nsamples=2, seqlen=16, percdamp=0.0, damp_retries=0
    )
    with pytest.raises(
        HessianError,
        match=r"Hessian of layer 'model\.layers\.0\.self_attn\.q_proj' is not positive "
        r"definite .*use a larger percdamp",
    ) as info:
        run_pipeline(cfg)
    one_line(info)
    assert isinstance(info.value, ValueError)  # the CLI reports it as one `error:` line
    with caplog.at_level(logging.WARNING, logger="sparsegpt.hessian"):
        run = run_pipeline(cfg.updated(run_dir=str(tmp_path / "retry"), damp_retries=3))
    assert (
        "'model.layers.0.self_attn.q_proj' is not positive definite with percdamp=0; retrying with 0.01" in caplog.text
    )
    record = json.loads(run.block_record(0).read_text())
    assert record["layers"]["self_attn.q_proj"]["percdamp"] == pytest.approx(0.01)
