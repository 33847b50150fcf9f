"""GGUF export for llama.cpp: the pruned model as one `.gguf` file, written with the `gguf` package.

    write_gguf(model_dir, path, "q8_0", source=None) -> {"file", "type", "tensors", "bytes"}

Llama-family checkpoints (`model_type` llama or mistral: the embedded SmolLM2 included) map onto
llama.cpp's `llama` architecture as its own converter (`convert_hf_to_gguf.py`) maps them: tensor names
from `gguf.get_tensor_name_map`, q/k projections permuted to llama.cpp's rotary layout, hyperparameters
from config.json. Matrices are stored as `f16`, `q8_0` or `q4_0` (the `gguf` package's reference
quantizers; an exact zero stays zero in all three), vectors (norms) as f32.

Tokenizer metadata comes from the model's own GGUF when it came in as one (`source`: the embedded
default), else from its `tokenizer.json` when that is a byte-level BPE (llama.cpp's `gpt2` model, the
pre-tokenizer set to `default`); other tokenizers are refused in one line.

The file is streamed: tensor infos from the safetensors headers first, then the data one block at a
time, so one block is the most ever in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from stages.config.parts import GGUF_TYPES
from stages.model.blocks import skeleton
from stages.model.checkpoint import SafetensorsIndex, read_config
from stages.run.rundir import RunError

ARCHITECTURES = {"llama": "llama", "mistral": "llama"}
"""config.json `model_type` -> llama.cpp architecture written."""


def _gguf():
    try:
        import gguf
    except ImportError as exc:
        raise RunError("--format gguf needs the gguf package: pip install 'sparsegpt-pipeline[gguf]'") from exc
    return gguf


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's q/k rows -> llama.cpp's rotary layout (as `convert_hf_to_gguf.LlamaModel.permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(gguf, model_dir: Path, source: Path | None) -> list[tuple[str, object, object, object]]:
    """(key, value, type, sub_type) of every `tokenizer.*` field to write."""
    T = gguf.GGUFValueType
    if source is not None:
        reader = gguf.GGUFReader(str(source))
        out = []
        for key, field in reader.fields.items():
            if key.startswith("tokenizer."):
                sub = field.types[-1] if field.types[0] == T.ARRAY else None
                out.append((key, field.contents(), field.types[0], sub))
        return out
    path = model_dir / "tokenizer.json"
    tok = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    model = tok.get("model") or {}
    pre = json.dumps(tok.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or model.get("byte_fallback") or "ByteLevel" not in pre:
        raise RunError(
            f"--format gguf writes byte-level BPE tokenizers (or a model that came in as GGUF); {model_dir} has "
            f"a {model.get('type') or 'missing'} tokenizer.json; export it with --format hf or compressed-tensors"
        )
    vocab = dict(model["vocab"])
    special = {}
    for added in tok.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special[added["id"]] = True
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for text, i in vocab.items():
        tokens[i] = text
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(n)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    out = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", "default", T.STRING, None),
        ("tokenizer.ggml.tokens", tokens, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
    ]
    sv = gguf.SpecialVocab(model_dir, load_merges=False)
    for kind, i in sv.special_token_ids.items():
        key = {"unk": "unknown", "pad": "padding"}.get(kind, kind)
        out.append((f"tokenizer.ggml.{key}_token_id", int(i), T.UINT32, None))
    if isinstance(sv.chat_template, str):
        out.append(("tokenizer.chat_template", sv.chat_template, T.STRING, None))
    return out


def write_gguf(model_dir: Path, path: Path, gguf_type: str = "f16", source: Path | None = None) -> dict:
    """Write ``model_dir`` (a pruned HF checkpoint) to the GGUF file ``path``; return what was written."""
    gguf = _gguf()
    if gguf_type not in GGUF_TYPES:
        raise RunError(f"--gguf-type {gguf_type!r} is not supported; choose one of {', '.join(GGUF_TYPES)}")
    raw = read_config(model_dir)
    kind = raw.get("model_type")
    if kind not in ARCHITECTURES:
        raise RunError(
            f"--format gguf maps Llama-family models ({', '.join(ARCHITECTURES)}), not {raw.get('architectures')} "
            f"(model_type {kind!r}); export it with --format hf or compressed-tensors"
        )
    arch = ARCHITECTURES[kind]
    sk = skeleton(model_dir)
    hidden, n_head = int(raw["hidden_size"]), int(raw["num_attention_heads"])
    n_kv = int(raw.get("num_key_value_heads") or n_head)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, sk.num_blocks)
    index = SafetensorsIndex.open(model_dir)
    qtype = {
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[gguf_type]

    def target(name: str) -> str:
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise RunError(f"{name} has no llama.cpp tensor name; export this model with --format hf")
        return new

    shapes = {}
    for file in index.files():
        with safe_open(str(model_dir / file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    tied = "lm_head.weight" not in shapes or bool(raw.get("tie_word_embeddings"))
    order = [k for k in index.weight_map if sk.block_of(k) is None and not (tied and k == "lm_head.weight")]
    groups = [order] + [[k for k in index.weight_map if sk.block_of(k) == i] for i in range(sk.num_blocks)]

    def stored_type(shape: tuple[int, ...]):
        if len(shape) == 2 and (qtype == gguf.GGMLQuantizationType.F16 or shape[-1] % 32 == 0):
            return qtype
        return gguf.GGMLQuantizationType.F32

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(Path(str(model_dir)).name)
    writer.add_context_length(int(raw.get("max_position_embeddings") or 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(sk.num_blocks)
    writer.add_feed_forward_length(int(raw["intermediate_size"]))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(int(raw.get("head_dim") or hidden // n_head))
    writer.add_rope_freq_base(float(raw.get("rope_theta") or (raw.get("rope_parameters") or {}).get("rope_theta", 1e4)))
    writer.add_layer_norm_rms_eps(float(raw.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(raw["vocab_size"]))
    writer.add_file_type(
        {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(
            gguf_type, gguf.LlamaFileType.MOSTLY_Q4_0
        )
    )
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value, vtype, sub in _tokenizer_fields(gguf, model_dir, source):
        writer.add_key_value(key, value, vtype, sub_type=sub)

    infos = []
    for group in groups:
        for name in group:
            shape, t = shapes[name], stored_type(shapes[name])
            if t == gguf.GGMLQuantizationType.F32:
                writer.add_tensor_info(target(name), shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
            elif t == gguf.GGMLQuantizationType.F16:
                writer.add_tensor_info(target(name), shape, np.dtype(np.float16), 2 * int(np.prod(shape)))
            else:
                byte_shape = gguf.quant_shape_to_byte_shape(shape, t)
                writer.add_tensor_info(target(name), byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), t)
            infos.append((name, t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for group in groups:
        tensors = index.load(group, dtype=torch.float32)
        for name in group:
            w = tensors.pop(name)
            if name.endswith("q_proj.weight"):
                w = _permute(w, n_head)
            elif name.endswith("k_proj.weight"):
                w = _permute(w, n_kv)
            t = stored_type(tuple(w.shape))
            data = w.numpy()
            if t == gguf.GGMLQuantizationType.F32:
                data = data.astype(np.float32)
            elif t == gguf.GGMLQuantizationType.F16:
                data = data.astype(np.float16)
            else:
                data = gguf.quants.quantize(data, t)
            writer.write_tensor_data(data)
    writer.close()
    return {"file": path.name, "type": gguf_type, "tensors": len(infos), "bytes": path.stat().st_size}
