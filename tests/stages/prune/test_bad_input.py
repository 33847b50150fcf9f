"""Bad input ends with a one-line error naming the problem and the fix, and a resumable run dir.

Options the config rejects are tested through the CLI (`flows.cli.main` returns 2 and
prints one `error: ...` line before Prefect is reached). Problems found by the stages
are tested through `run_pipeline`: they are raised before `run.json` is written when
they concern the options (so the same run dir takes the corrected command), or leave
finished work in place when they happen mid-run (so the same command resumes).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import sys
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
from flows.cli import main
from sparsegpt import HessianError
from stages.config import PruneConfig
from stages.model.models import resolve_model
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


# ---------------------------------------------------------------- through the CLI


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--sparsity", "1.0"], r"sparsity must be a fraction in \[0, 1\) \(e\.g\. 0\.5\), got 1\.0"),
        (["--sparsity", "-0.1"], r"sparsity must be a fraction in \[0, 1\)"),
        (["--nm", "3:3"], r"N:M sparsity needs integers 0 < N < M \(e\.g\. 2:4 or 4:8\), got 3:3"),
        (["--nm", "2-4"], r"N:M must look like 2:4 or 4:8, got '2-4'"),
        (["--nm", "2:6", "--blocksize", "16"], r"blocksize \(16\) must be a multiple of M=6 .*use blocksize 128"),
        (["--calib", "wikitext3"], r"unknown dataset 'wikitext3' .*Use NAME \(hub\) or NAME=PATH"),
        (
            ["--calib", "text=/no/such/corpus.txt"],
            r"dataset file not found: '/no/such/corpus.txt'.*Pass an existing file",
        ),
        (["--nsamples", "0"], r"nsamples must be a positive integer, got 0"),
        (
            ["--tasks", "piqa=/no/such.jsonl"],
            r"task file for piqa not found: /no/such.jsonl; pass piqa=PATH to valid.jsonl",
        ),
        (["--tasks", "boolq,mmlu"], r"unknown task 'mmlu'; choose one of lambada, piqa, arc_easy"),
        (["--limit", "0"], r"task_limit \(--limit\) must be a positive integer, got 0"),
    ],
    ids=[
        "sparsity-1",
        "sparsity-negative",
        "nm-3:3",
        "nm-syntax",
        "nm-blocksize",
        "unknown-dataset",
        "missing-dataset-file",
        "nsamples-0",
        "missing-task-file",
        "unknown-task",
        "limit-0",
    ],
)
def test_cli_rejects_bad_options_in_one_line(tiny_llama_dir, tmp_path, capsys, options, expected) -> None:
    run_dir = tmp_path / "run"
    code = main(["prune", str(tiny_llama_dir), "--run-dir", str(run_dir), "--no-progress", *options])
    out, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert out == ""
    assert re.search(expected, err), err
    assert not run_dir.exists()  # nothing started: the corrected command can use the same run dir


@pytest.mark.parametrize(
    ("model", "options", "expected"),
    [
        ("missing", [], r"model path .*nope does not exist; pass an existing directory"),
        ("llama", ["--seqlen", "100"], r"seqlen 100 is beyond the model's 64 positions; use --seqlen 64 or less"),
        ("llama", ["--nm", "2:5", "--blocksize", "20"], r"--nm 2:5 does not fit the model: its hidden size 32"),
        ("other-run", [], r"holds a run with different options: calib\.nsamples: 7 \(run dir\) != 6"),
        ("foreign-dir", [], r"run dir .*run is not empty and holds no run\.json \(it has notes\.txt\).*new or empty"),
        ("no-disk", [], r"not enough free disk for .*run: the run needs about 0\.\d\d GiB more, .* has 0\.00 GiB free"),
        ("llama", ["--device", "cuda"], r"--device cuda was asked for but torch sees no GPU; use --device cpu"),
    ],
    ids=["missing-model", "seqlen-too-long", "nm-width", "run-dir-of-another-run", "foreign-dir", "no-disk", "no-gpu"],
)
def test_cli_checks_the_model_and_run_dir_before_prefect_starts(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, model, options, expected
) -> None:
    """What the model's files and the run directory show is refused by `check` in the CLI process,
    before the flow module (and so Prefect's server) is imported."""
    run_dir = tmp_path / "run"
    if model == "other-run":
        prepare(tiny_cfg(tiny_llama_dir, run_dir, nsamples=7))
    if model == "foreign-dir":
        run_dir.mkdir()
        (run_dir / "notes.txt").write_text("not a run")
    if model == "no-disk":
        monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 4096))
    if "--device" in options and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    before = (run_dir / "run.json").read_bytes() if (run_dir / "run.json").exists() else None
    monkeypatch.delitem(sys.modules, "flows.oneshot", raising=False)
    path = tmp_path / "nope" if model == "missing" else tiny_llama_dir
    code = main(["prune", str(path), "--run-dir", str(run_dir), "--nsamples", "6", "--seqlen", "32", *options])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(expected, err), err
    assert "flows.oneshot" not in sys.modules
    if model == "foreign-dir":
        assert sorted(p.name for p in run_dir.iterdir()) == ["notes.txt"]
    else:
        assert (run_dir / "run.json").read_bytes() == before if before else not run_dir.exists()


@pytest.mark.parametrize(
    ("command", "options", "expected"),
    [
        ("eval", ["MISSING", "--eval", "pydoc"], r"model path .*nope does not exist"),
        ("eval", ["LLAMA", "--eval", "pydoc", "--seqlen", "65"], r"eval_seqlen 65 is beyond the model's 64 positions"),
        ("progressive", ["MISSING", "--run-dir", "RUN"], r"model path .*nope does not exist"),
        ("progressive", ["LLAMA", "--run-dir", "RUN", "--seqlen", "65"], r"seqlen 65 is beyond the model's 64"),
        (
            "progressive",
            ["LLAMA", "--run-dir", "RUN", "--seqlen", "32", "--schedule", "2:5", "--blocksize", "20"],
            r"--nm 2:5 does not fit the model: its hidden size 32",
        ),
        ("progressive", ["LLAMA", "--run-dir", "OTHER", "--seqlen", "32"], r"holds a run with different options: sch"),
    ],
    ids=["eval-missing-model", "eval-seqlen", "prog-missing-model", "prog-seqlen", "prog-nm-width", "prog-other-run"],
)
def test_cli_eval_and_progressive_check_before_prefect_starts(
    tiny_llama_dir, tmp_path, capsys, monkeypatch, command, options, expected
) -> None:
    other = tmp_path / "other"
    if "OTHER" in options:
        from stages.progressive.config import ProgressiveConfig
        from stages.run.identity import init_run

        prior = ProgressiveConfig.of(model=str(tiny_llama_dir), run_dir=str(other), schedule="0.5,0.6", seqlen=32)
        init_run(other, prior.identity(), {}, options={})
    names = {"MISSING": tmp_path / "nope", "LLAMA": tiny_llama_dir, "RUN": tmp_path / "run", "OTHER": other}
    flow_module = {"eval": "flows.evaluate", "progressive": "flows.progressive"}[command]
    monkeypatch.delitem(sys.modules, flow_module, raising=False)
    code = main([command, *(str(names.get(o, o)) for o in options)])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and re.search(expected, err), err
    assert flow_module not in sys.modules
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ([], r"nothing to evaluate: give at least one --eval SPEC or --tasks SPEC\[,SPEC\.\.\.\]"),
        (["--tasks", "boolq=/no/b.jsonl,piqa"], r"task file for boolq not found: /no/b.jsonl"),
        (["--tasks", "boolq", "--tasks", "boolq"], r"task names must be unique, got \['boolq', 'boolq'\]"),
        (["--tasks", "boolq", "--limit", "-1"], r"task_limit \(--limit\) must be a positive integer, got -1"),
        (["--eval", "wikitext3"], r"unknown dataset 'wikitext3'"),
    ],
    ids=["nothing", "missing-task-file", "task-twice", "limit-negative", "unknown-dataset"],
)
def test_cli_eval_rejects_bad_requests_in_one_line(tiny_llama_dir, capsys, options, expected) -> None:
    code = main(["eval", str(tiny_llama_dir), *options])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(expected, err), err


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
    monkeypatch.setattr(stages.prune.oneshot, "SAMPLES_PER_SHARD", 2)
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
