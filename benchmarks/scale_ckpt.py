"""Random-init checkpoints of real model shapes, written one tensor at a time (for bench_scale.py).

`write_checkpoint("llama3-8b", out)` writes a Hugging Face checkpoint with the real
model's `config.json` fields (from transformers' config classes), bf16 safetensors
shards of about `shard_gib` each with `model.safetensors.index.json`, and the embedded
SmolLM2 tokenizer (vocab_size and the bos/eos/pad ids are set to the tokenizer's).
Names and shapes come from the model built on the meta device, so nothing is allocated;
each shard's header is written first and each tensor is then generated in chunks of
16M elements and appended, so the writer holds one chunk, never a tensor or the model.
Matrices are N(0, 0.02), biases zeros, 1-D weights (norms) ones. `scale-ckpt.json`,
written last, marks a complete checkpoint: a second call with the same shape, depth,
seed and shard size reuses it.

    python benchmarks/scale_ckpt.py --shape smollm2-1.7b --blocks 1 --out /tmp/ck   # write, then load-check
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig, PretrainedConfig, Qwen2Config

ROOT = Path(__file__).resolve().parents[1]
MARKER = "scale-ckpt.json"
FORMAT = "bench-scale-ckpt/1"
CHUNK = 1 << 24  # elements generated at a time (64 MiB of fp32)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# The real models' config.json fields (their Hub configs); vocab and special ids come from the tokenizer.
# The real models' configs, a few lines each (fmt: skip below keeps them readable as a table).
SHAPES: dict[str, tuple[type[PretrainedConfig], dict]] = {
    "llama3-8b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=False)),
    "llama2-7b": (LlamaConfig, dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=False)),
    "qwen2.5-7b": (Qwen2Config, dict(
        hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
        sliding_window=131072, max_window_layers=28, use_sliding_window=False, hidden_act="silu",
        tie_word_embeddings=False)),
    "smollm2-1.7b": (LlamaConfig, dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
        hidden_act="silu", tie_word_embeddings=True)),
    "opt-6.7b": (OPTConfig, dict(
        hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32,
        max_position_embeddings=2048, word_embed_proj_dim=4096, do_layer_norm_before=True,
        activation_function="relu", enable_bias=True, dropout=0.1, tie_word_embeddings=True)),
}  # fmt: skip


def tokenizer_dir() -> Path:
    """The embedded SmolLM2-135M folder, whose tokenizer every scale checkpoint carries."""
    from stages.model.checkpoint import resolve_model

    return resolve_model("smollm2-135m")


def tokenizer_ids(tok_dir: Path) -> dict[str, int]:
    """vocab_size and bos/eos/pad token ids of the tokenizer in `tok_dir`."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    special = json.loads((tok_dir / "tokenizer_config.json").read_text())
    ids = {"vocab_size": tok.get_vocab_size()}
    for key in ("bos", "eos", "pad"):
        token = special.get(f"{key}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token is not None and tok.token_to_id(token) is not None:
            ids[f"{key}_token_id"] = tok.token_to_id(token)
    return ids


def build_config(
    shape: str, blocks: int | None = None, tok_dir: Path | None = None, overrides: dict | None = None
) -> PretrainedConfig:
    """`shape`'s real config (first `blocks` decoder blocks if given) with the tokenizer's vocab and ids;
    `overrides` replaces fields (tests use small widths)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    cls, fields = SHAPES[shape]
    fields = {**fields, **tokenizer_ids(tok_dir or tokenizer_dir()), **(overrides or {})}
    if blocks is not None:
        if not 1 <= blocks <= fields["num_hidden_layers"]:
            raise ValueError(f"--blocks must be 1..{fields['num_hidden_layers']} for {shape}, got {blocks}")
        fields["num_hidden_layers"] = blocks
    cfg = cls(**fields)
    cfg.dtype = torch.bfloat16
    return cfg


def meta_model(cfg: PretrainedConfig) -> torch.nn.Module:
    """The causal LM of `cfg` on the meta device: structure, names and shapes, no storage."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def tensor_layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor a checkpoint holds: parameters once (a tied head is not
    written again, as save_pretrained does) and persistent buffers."""
    state = model.state_dict()
    params = [(n, tuple(p.shape)) for n, p in model.named_parameters()]  # shared tensors listed once
    buffers = [(n, tuple(b.shape)) for n, b in model.named_buffers() if n in state]
    return params + buffers


def plan_shards(layout: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive tensors grouped into shards of at most `max_bytes` of bf16 (a tensor is never split)."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in layout:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_tensor(f, name: str, shape: tuple[int, ...], gen: torch.Generator) -> None:
    """Append one bf16 tensor's bytes, CHUNK elements at a time: matrices N(0, 0.02), biases 0, norms 1."""
    n = math.prod(shape)
    for start in range(0, n, CHUNK):
        count = min(CHUNK, n - start)
        if len(shape) >= 2:
            chunk = torch.empty(count).normal_(0.0, 0.02, generator=gen).to(torch.bfloat16)
        else:
            chunk = torch.full((count,), 0.0 if name.endswith("bias") else 1.0, dtype=torch.bfloat16)
        f.write(chunk.view(torch.uint8).numpy().data)


def write_shard(path: Path, entries: list[tuple[str, tuple[int, ...]]], seed: int) -> int:
    """Write one safetensors file: header first, then each tensor streamed; return its size."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data 8-byte aligned, as safetensors writes it
    gen = torch.Generator()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for k, (name, shape) in enumerate(entries):
            gen.manual_seed(seed * 1_000_003 + k)
            _write_tensor(f, name, shape, gen)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _identity(shape: str, blocks: int | None, seed: int, shard_bytes: int, overrides: dict | None) -> dict:
    return {
        "format": FORMAT,
        "shape": shape,
        "blocks": blocks,
        "seed": seed,
        "shard_bytes": shard_bytes,
        "overrides": overrides or {},
    }


def reusable(out: Path, identity: dict) -> dict | None:
    """The marker of a complete checkpoint in `out` written with `identity`, else None."""
    try:
        marker = json.loads((out / MARKER).read_text())
        ok = {k: marker[k] for k in identity} == identity
        ok = ok and all((out / n).stat().st_size == size for n, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return marker if ok else None


def _ours(name: str) -> bool:
    """A file name `write_checkpoint` writes (so a partial checkpoint may be deleted)."""
    return name in (MARKER, "config.json", "model.safetensors.index.json", *TOKENIZER_FILES) or bool(
        re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", name)
    )


def write_checkpoint(
    shape: str,
    out: Path,
    blocks: int | None = None,
    shard_gib: float = 4.0,
    seed: int = 0,
    overrides: dict | None = None,
    tok_dir: Path | None = None,
) -> dict:
    """Write (or reuse) the random-init checkpoint of `shape` in `out`; return its marker ("reused": bool).

    `tok_dir` (default: the embedded SmolLM2's folder) supplies the tokenizer files."""
    identity = _identity(shape, blocks, seed, int(shard_gib * (1 << 30)), overrides)
    done = reusable(out, identity)
    if done is not None:
        return {**done, "reused": True}
    foreign = [f.name for f in out.iterdir() if not _ours(f.name)] if out.is_dir() else []
    if foreign:
        raise ValueError(f"{out} holds files a scale checkpoint does not ({foreign[:3]}); choose another --work")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok = tok_dir or tokenizer_dir()
    cfg = build_config(shape, blocks, tok, overrides)
    model = meta_model(cfg)
    cfg.architectures = [type(model).__name__]
    shards = plan_shards(tensor_layout(model), identity["shard_bytes"])
    files, weight_map = {}, {}
    for j, entries in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        files[name] = write_shard(out / name, entries, seed * 10_007 + j)
        weight_map.update(dict.fromkeys((n for n, _ in entries), name))
        print(f"  wrote {name}: {files[name] / 2**30:.2f} GiB", file=sys.stderr, flush=True)
    total = sum(2 * math.prod(s) for entries in shards for _, s in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.to_json_file(str(out / "config.json"))
    for f in TOKENIZER_FILES:
        if (tok / f).is_file():
            shutil.copy2(tok / f, out / f)
    marker = {**identity, "num_hidden_layers": cfg.num_hidden_layers, "bytes": sum(files.values()), "files": files}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return {**marker, "reused": False}


def load_check(out: Path) -> tuple[list[str], list[str]]:
    """Load `out` with AutoModelForCausalLM.from_pretrained; return (missing, unexpected) keys."""
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"non-finite weights after loading: {bad[:3]}")
    return sorted(info["missing_keys"]), sorted(info["unexpected_keys"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), required=True)
    p.add_argument("--blocks", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shard-gib", type=float, default=4.0)
    p.add_argument("--no-load-check", action="store_true", help="skip from_pretrained (needs the model in RAM)")
    args = p.parse_args()
    marker = write_checkpoint(args.shape, args.out, args.blocks, args.shard_gib)
    print(
        f"{args.out}: {marker['bytes'] / 2**30:.2f} GiB in {len(marker['files'])} shards"
        f"{' (reused)' if marker['reused'] else ''}"
    )
    if not args.no_load_check:
        missing, unexpected = load_check(args.out)
        print(f"from_pretrained: missing keys {missing or 'none'}, unexpected keys {unexpected or 'none'}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
