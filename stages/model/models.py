"""What needs transformers' config classes and tokenizers, or torch: a model's `PretrainedConfig`, its
tokenizer, its positions, the torch dtype blocks run in.

`stages.model.checkpoint` resolves the model argument and reads the checkpoint's files (config.json as
JSON, safetensors headers and tensors) without them; the checks every command runs first use only that.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from stages.model.checkpoint import POSITION_ATTRS, SAFETENSORS_DTYPE_NAMES, compute_dtype_name, read_config

log = logging.getLogger("sparsegpt.models")
SAFETENSORS_DTYPES = {code: getattr(torch, name) for code, name in SAFETENSORS_DTYPE_NAMES.items()}
"""A safetensors header's dtype code -> torch dtype."""


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
    for attr in POSITION_ATTRS:
        value = getattr(text_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def compute_dtype(device: str, model_dir: Path, dtype: str = "auto") -> torch.dtype:
    """The dtype blocks run in (`stages.model.checkpoint.compute_dtype_name`: ``dtype`` unless "auto"; auto is
    fp32 on the CPU and the checkpoint's own half precision on a GPU, fp16 when it has none). Hessians and
    solves stay fp32 whatever this is."""
    if dtype == "float16" and torch.device(device).type == "cpu":
        _warn_once(
            "--dtype float16 on a CPU works but is slow (few CPUs have fast fp16 kernels); bfloat16 or "
            "float32 are the CPU's choices"
        )
    return getattr(torch, compute_dtype_name(device, read_config(model_dir), dtype))


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)
