"""Shared fixtures: tiny random causal LMs of real architectures, saved as HF checkpoints.

`device` is where the tests marked `device` run (the CPU unless `SPARSEGPT_TEST_DEVICE` says
otherwise). `tiny_model_dir` is parametrized over Llama (untied lm_head, rotary), OPT (learned
positions, project_in/out, biases, tied) and GPT-2 (Conv1D, tied); `tiny_llama_dir`
is the Llama one alone. `tiny_model_factory(kind, max_shard_size=..., tied=...)` builds
variants; `smollm2_dir` is the real embedded model (for tests marked slow). Each
folder holds config.json, model.safetensors (or shards + index) and a character-level
tokenizer (vocab < 128), so it can be used like a downloaded model.
"""

import os
import string
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    OPTConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

TINY_VOCAB = 128
SPECIALS = ["<unk>", "<s>", "</s>"]


# Dense evaluations and calibration inputs shared across run directories (stages.evaluate.cache,
# stages.prune.shared_inputs) go to folders of this test
# session, never to the user's cache, and no earlier session's results are found there.
os.environ["SPARSEGPT_EVAL_CACHE"] = tempfile.mkdtemp(prefix="sparsegpt-eval-cache-")
os.environ["SPARSEGPT_CALIB_CACHE"] = tempfile.mkdtemp(prefix="sparsegpt-calib-cache-")


DEVICE = os.environ.get("SPARSEGPT_TEST_DEVICE", "cpu")
if DEVICE == "cpu":
    # The Triton column loop (sparsegpt.kernel) runs in Triton's interpreter on a CPU; it must be chosen
    # before triton's first import.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> str:
    """Where a test marked `device` runs its stage: the CPU, or ``SPARSEGPT_TEST_DEVICE`` (``cuda`` in
    benchmarks/gpu_check.sh, which runs ``pytest -m device`` on a GPU machine)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _own_calib_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets an empty calibration cache: an entry a sweep test shared must not stand in for the
    sampling and capture another test watches (or makes fail)."""
    monkeypatch.setenv("SPARSEGPT_CALIB_CACHE", str(tmp_path_factory.mktemp("calib-cache")))


def tiny_config(kind: str, tied: bool | None = None) -> PretrainedConfig:
    """A 3-layer config of `kind` ('llama', 'opt', 'gpt2') with hidden size 32 and vocab 128."""
    common = dict(vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    if tied is not None:
        common["tie_word_embeddings"] = tied
    if kind == "llama":
        return LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    if kind == "opt":
        return OPTConfig(
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            **common,
        )
    if kind == "gpt2":
        return GPT2Config(n_embd=32, n_layer=3, n_head=4, n_positions=64, **common)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer over printable ASCII plus <unk>, <s>, </s> (ids < 128)."""
    chars = [c for c in string.printable if c not in "\t\n\r\x0b\x0c"] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_model(
    kind: str, folder: Path, max_shard_size: str | None = None, tied: bool | None = None, seed: int = 0
) -> Path:
    """Build a seeded random model of `kind` and save it (safetensors) with the tiny tokenizer."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, tied)).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`factory(kind, max_shard_size=None, tied=None, seed=0) -> Path`, cached per arguments."""
    cache: dict[tuple, Path] = {}

    def factory(kind: str, max_shard_size: str | None = None, tied: bool | None = None, seed: int = 0) -> Path:
        key = (kind, max_shard_size, tied, seed)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{kind}")
            cache[key] = save_tiny_model(kind, folder, max_shard_size, tied, seed)
        return cache[key]

    return factory


@pytest.fixture(scope="session", params=["llama", "opt", "gpt2"])
def tiny_model_dir(request: pytest.FixtureRequest, tiny_model_factory: Callable[..., Path]) -> Path:
    """A saved tiny model, once per architecture."""
    return tiny_model_factory(request.param)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M as safetensors (converted on first use into the default cache; slow)."""
    from stages.model.checkpoint import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory: Callable[..., Path]) -> Path:
    """The saved tiny Llama."""
    return tiny_model_factory("llama")
