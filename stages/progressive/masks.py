"""Mask files: the pruned positions of a checkpoint's block linears, bit-packed in safetensors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stages.run.rundir import atomic_path


def write_mask(path: Path, model_dir: Path, trust_remote_code: bool = False) -> dict:
    """Bit-pack the pruned positions (weight == 0) of every prunable block linear of a checkpoint.

    Keys and shapes are the checkpoint's own (GPT-2's Conv1D weights stay (in, out)).
    Reads one tensor at a time, never the whole model; returns
    ``{"pruned": int, "total": int, "sparsity": float}``.
    """
    from stages.model.blocks import skeleton
    from stages.model.checkpoint import SafetensorsIndex

    sk = skeleton(model_dir, trust_remote_code)
    index = SafetensorsIndex.open(model_dir)
    names = [f"{sk.block_prefix(i)}{name}.weight" for i in range(sk.num_blocks) for name in sk.layer_names[i]]
    packed, shapes, pruned, total = {}, {}, 0, 0
    for name in names:
        w = index.load([name])[name]
        mask = (w == 0).reshape(-1).numpy()
        packed[name] = torch.from_numpy(np.packbits(mask))
        shapes[name] = list(w.shape)
        pruned += int(mask.sum())
        total += mask.size
    with atomic_path(path) as tmp:
        save_file(packed, str(tmp), metadata={"shapes": json.dumps(shapes), "bits": "1 = pruned"})
    return {"pruned": pruned, "total": total, "sparsity": pruned / max(total, 1)}


def read_mask(path: Path) -> dict[str, torch.Tensor]:
    """The masks written by `write_mask`: bool tensors of each weight's shape, True = pruned."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    packed = load_file(str(path))
    out = {}
    for name, shape in shapes.items():
        bits = np.unpackbits(packed[name].numpy(), count=math.prod(shape)).astype(bool)
        out[name] = torch.from_numpy(bits).reshape(shape)
    return out


def mask_records(path: Path) -> list[dict]:
    """Per-layer sparsity of a mask file in the block records' layout (``[{"block": i, "layers": {name:
    {"shape", "sparsity"}}}]``), counted on the packed bits one tensor at a time."""
    from safetensors import safe_open

    blocks: dict[int, dict] = {}
    with safe_open(str(path), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
        for key, shape in shapes.items():
            m = re.match(r"^.*?\.(\d+)\.(.+)\.weight$", key)
            if m is None:
                raise ValueError(f"{path}: mask key {key!r} does not name a block's weight")
            bits = np.unpackbits(f.get_tensor(key).numpy(), count=math.prod(shape))
            layer = {"shape": shape, "sparsity": float(bits.sum()) / max(bits.size, 1)}
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = layer
    return [{"block": i, "layers": blocks[i]} for i in sorted(blocks)]
