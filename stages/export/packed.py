"""compressed-tensors export: a `--wbits` run's weights packed as the integers they are.

    write_compressed_tensors(run_dir, model_dir, folder, trust_remote_code) -> {"bits": 4, "layers": 210}

A joint sparse + quantized run stores each pruned layer de-quantized (`scale * (q - zero)` in the
checkpoint's dtype) and its grid beside the block (`blocks/block_XXX.grid.safetensors`: the run's
float32 scales and integer zero points). The integer codes are read back from the stored weights
(`q = round(w / scale) + zero`, checked against the stored value) and written the way llm-compressor
writes a `W4A16`/`W8A16` asymmetric model, with the `compressed-tensors` library's own packing and
config: `NAME.weight_packed` (int32, `pack_to_int32`), `NAME.weight_scale` (the run's float32
scales, so a reload gives the run's weights bit for bit), `NAME.weight_zero_point` (signed, packed
along the output channels), `NAME.weight_shape`, and `quantization_config` in config.json (format
`pack-quantized`, strategy `channel` or `group`, every other `Linear` in `ignore`).

The config also says `"dequantize": true`: transformers (5.24, compressed-tensors 0.20.1) cannot load
asymmetric packed zero points into compressed modules (it builds them unpacked), but it loads this
checkpoint de-quantizing at load time. vLLM reads the same tensors and ignores the key.

The output is streamed one block at a time (`stages.model.assemble.write_shards`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from sparsegpt import QuantGrid
from stages.model.assemble import DEFAULT_SHARD_BYTES, Unit, original_layout, write_index, write_shards
from stages.model.blocks import load_grids, meta_model, skeleton
from stages.model.checkpoint import SafetensorsIndex
from stages.run.rundir import RunError

Layout = dict[str, tuple[torch.dtype, tuple[int, ...]]]


def _library():
    """The compressed-tensors pieces used here, or a one-line error saying how to install them."""
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    except ImportError as exc:
        raise RunError(
            "--format compressed-tensors needs the compressed-tensors package: pip install 'sparsegpt-pipeline[export]'"
        ) from exc
    return ModelCompressor, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme


def codes(weight: torch.Tensor, grid: QuantGrid, name: str) -> torch.Tensor:
    """The integer levels ``(rows, cols)`` in [0, maxq] of a stored de-quantized weight on ``grid``.

    Refuses a weight that is not on the grid: each stored value must be its level's
    ``scale * (q - zero)`` up to the storage dtype's rounding (2^-7 relative; exact zeros exact).
    """
    W = weight.float()
    rows, cols = W.shape
    gs = grid.groupsize
    if gs <= 0 or cols % gs:
        raise RunError(f"{name}: group size {gs} does not divide the layer's {cols} columns; rerun the prune")
    scale = grid.scale.float().repeat_interleave(gs, dim=1)  # (rows, cols)
    zero = grid.zero.float().repeat_interleave(gs, dim=1)
    q = torch.clamp(torch.round(W / scale) + zero, 0, grid.maxq)
    back = scale * (q - zero)
    off = (back - W).abs() > 2**-7 * W.abs()
    if bool(off.any()):
        r, c = (int(v) for v in off.nonzero()[0])
        raise RunError(
            f"{name}: weight [{r}, {c}] = {W[r, c].item():.6g} is not on the run's quantization grid "
            "(was model/ changed after the prune?); export it with --format hf"
        )
    return q


def _packed_layout(shape: tuple[int, ...], grid_shape: tuple[int, int], bits: int) -> Layout:
    rows, cols = shape
    return {
        "weight_packed": (torch.int32, (rows, math.ceil(cols * bits / 32))),
        "weight_scale": (torch.float32, grid_shape),
        "weight_zero_point": (torch.int32, (math.ceil(rows * bits / 32), grid_shape[1])),
        "weight_shape": (torch.int64, (2,)),
    }


def write_compressed_tensors(run_dir: Path, model_dir: Path, folder: Path, trust_remote_code: bool = False) -> dict:
    """Write the packed checkpoint of a finished `--wbits` run into ``folder`` (weights, index, config.json);
    return what was packed. Other files of ``model_dir`` are the caller's to place."""
    ModelCompressor, pack_to_int32, QuantizationArgs, QuantizationConfig, QuantizationScheme = _library()
    sk = skeleton(model_dir, trust_remote_code)
    grid_files = [run_dir / "blocks" / f"block_{i:03d}.grid.safetensors" for i in range(sk.num_blocks)]
    absent = [p.name for p in grid_files if not p.is_file()]
    if absent:
        raise RunError(
            f"{run_dir} has no quantization grids ({absent[0]}): --format compressed-tensors needs a run pruned with"
            " --wbits 4 or 8 by this version; prune again with --wbits, or export --format hf"
        )
    grids: dict[str, QuantGrid] = {}
    for p in grid_files:
        grids.update(load_grids(p))
    (maxq,) = {g.maxq for g in grids.values()}  # one --wbits per run
    bits = (maxq + 1).bit_length() - 1
    modules = dict(meta_model(model_dir, trust_remote_code).named_modules())
    not_linear = sorted(n for n in grids if not isinstance(modules.get(n), nn.Linear))
    if not_linear:
        raise RunError(
            f"{not_linear[0]} is a {type(modules.get(not_linear[0])).__name__}, not a Linear: compressed-tensors packs"
            f" Linear layers only ({sk.architecture}); export it with --format hf"
        )
    index = SafetensorsIndex.open(model_dir)
    original = original_layout(index)
    off = 1 << (bits - 1)

    def unit(names: list[str]) -> Unit:
        layout: Layout = {}
        for n in names:
            layer = n.removesuffix(".weight")
            if layer in grids and n.endswith(".weight"):
                g = grids[layer]
                packed = _packed_layout(original[n][1], tuple(g.scale.shape), bits)
                layout.update({f"{layer}.{k}": v for k, v in packed.items()})
            else:
                layout[n] = original[n]

        def load() -> dict[str, torch.Tensor]:
            out = {}
            for n, t in index.load(names).items():
                layer = n.removesuffix(".weight")
                if layer not in grids or not n.endswith(".weight"):
                    out[n] = t
                    continue
                g = grids[layer]
                q = codes(t, g, n)
                out[f"{layer}.weight_packed"] = pack_to_int32((q - off).to(torch.int8), bits)
                out[f"{layer}.weight_scale"] = g.scale.float().contiguous()
                zp = (g.zero - off).to(torch.int8)
                out[f"{layer}.weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
                out[f"{layer}.weight_shape"] = torch.tensor(t.shape, dtype=torch.int64)
            return out

        return Unit(layout, load)

    rest = [k for k in index.weight_map if sk.block_of(k) is None]
    per_block = [[k for k in index.weight_map if sk.block_of(k) == i] for i in range(sk.num_blocks)]
    units = [unit(rest)] + [unit(names) for names in per_block]
    write_index(folder, write_shards(units, folder, DEFAULT_SHARD_BYTES))

    per_channel = all(g.groupsize == original[f"{n}.weight"][1][1] for n, g in grids.items())
    groupsizes = {g.groupsize for g in grids.values()}
    if not per_channel and len(groupsizes) != 1:
        raise RunError(f"layers of {run_dir} use several group sizes {sorted(groupsizes)}; export it with --format hf")
    strategy, group_size = ("channel", None) if per_channel else ("group", groupsizes.pop())
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy=strategy, group_size=group_size)
    ignore = sorted(n for n, m in modules.items() if isinstance(m, nn.Linear) and n not in grids)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        format="pack-quantized",
        quantization_status="compressed",
        ignore=ignore,
    )
    (folder / "config.json").write_text((model_dir / "config.json").read_text(encoding="utf-8"), encoding="utf-8")
    ModelCompressor(quantization_config=config).update_config(str(folder))
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    data["quantization_config"]["dequantize"] = True  # see the module docstring
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return {"bits": bits, "strategy": strategy, "group_size": group_size, "layers": len(grids), "ignore": ignore}
