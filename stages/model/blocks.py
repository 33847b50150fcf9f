"""Model surgery, one decoder block at a time, for any decoder-only transformers model.

The model is instantiated on the meta device (no memory, no weights) to learn its
structure: `find_blocks` locates the one `nn.ModuleList` holding the decoder blocks
and `skeleton` records its dotted path, the checkpoint key prefix of its blocks and
the prunable linear layers (`nn.Linear` and transformers' `Conv1D`) of each block.
`load_block` then materializes a single block from safetensors; `run_block` calls it
on hidden states with the keyword arguments the model passes its decoder layers.
Those arguments and the inputs of block 0 come from `stages.model.capture`, and
`save_layer_kwargs` / `load_layer_kwargs` keep them on disk without pickle;
`save_block` writes a (pruned) block that `stages.model.assemble` puts back into a checkpoint.
"""

import copy
import functools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as hf_init
from transformers.pytorch_utils import Conv1D

from sparsegpt.quant import QuantGrid
from stages.model.checkpoint import SafetensorsIndex
from stages.model.models import load_config
from stages.run.rundir import atomic_path

PathLike = str | os.PathLike
Kwargs = dict[str, object]
# Buffers transformers itself ignores in old checkpoints (moved or made non-persistent).
_ALWAYS_IGNORED = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$")


@dataclass(frozen=True)
class Skeleton:
    """The structure of a causal LM, learned on the meta device without reading weights."""

    model_dir: Path
    """The checkpoint directory."""
    architecture: str
    """The model class name (for messages only, never for dispatch)."""
    block_path: str
    """Dotted path of the `nn.ModuleList` of decoder blocks, e.g. `model.layers` or `transformer.h`."""
    num_blocks: int
    """Number of decoder blocks."""
    key_prefix: str
    """Checkpoint key prefix of the block list, e.g. `model.layers.` or `h.` for old GPT-2 files."""
    layer_names: tuple[tuple[str, ...], ...]
    """Per block, the names of its prunable layers (Linear / Conv1D), in module order."""
    state_keys: tuple[tuple[str, ...], ...]
    """Per block, its state-dict names (block-relative): exactly what a block file holds."""

    def block_prefix(self, i: int) -> str:
        """Checkpoint key prefix of block `i`, e.g. `model.layers.3.`."""
        if not 0 <= i < self.num_blocks:
            raise IndexError(f"block {i} out of range: {self.architecture} has {self.num_blocks} blocks")
        return f"{self.key_prefix}{i}."

    def block_of(self, key: str) -> int | None:
        """The block index a checkpoint key belongs to, or None for non-block tensors."""
        if not key.startswith(self.key_prefix):
            return None
        head = key[len(self.key_prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() else None


# ---------------------------------------------------------------- discovery


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The dotted path and the `nn.ModuleList` holding the model's decoder blocks.

    Generic: among the ModuleLists with one entry per hidden layer and a single
    module type, the one with the most parameters (it contains any nested lists).
    """
    config = getattr(model, "config", None)
    n_layers = getattr(config.get_text_config(), "num_hidden_layers", None) if config is not None else None
    name = type(model).__name__
    candidates = [
        (sum(p.numel() for p in mod.parameters()), path, mod)
        for path, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and (n_layers is None or len(mod) == n_layers)
        and len({type(m) for m in mod}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"architecture {name}: cannot find its decoder blocks (no nn.ModuleList of {n_layers} identical modules); "
            "only models whose decoder blocks form one ModuleList are supported"
        )
    candidates.sort(key=lambda c: c[0], reverse=True)
    if len(candidates) > 1 and candidates[0][0] == candidates[1][0]:
        paths = ", ".join(c[1] for c in candidates)
        raise ValueError(f"architecture {name}: cannot find its decoder blocks, several candidates ({paths})")
    return candidates[0][1], candidates[0][2]


def find_layers(module: nn.Module) -> dict[str, nn.Module]:
    """The prunable layers of a block: every `nn.Linear` and `Conv1D`, by dotted name, in module order."""
    return {name: m for name, m in module.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as (out_features, in_features), a view (Conv1D stores (in, out))."""
    if isinstance(layer, Conv1D):
        return layer.weight.t()
    if isinstance(layer, nn.Linear):
        return layer.weight
    raise TypeError(f"{type(layer).__name__} is not a prunable layer (nn.Linear or Conv1D)")


def set_weight(layer: nn.Module, W: torch.Tensor) -> None:
    """Copy `W` of shape (out_features, in_features) into the layer, in its own orientation and dtype."""
    target = get_weight(layer)
    if tuple(W.shape) != tuple(target.shape):
        raise ValueError(f"weight shape {tuple(W.shape)} does not match the layer's (out, in) {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(W)


@functools.lru_cache(maxsize=4)
def _cached_meta_model(model_dir: str, stamp: int, trust_remote_code: bool) -> PreTrainedModel:
    config = load_config(model_dir, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return model.eval()


def shared_meta_model(model_dir: PathLike, trust_remote_code: bool) -> PreTrainedModel:
    """The cached meta instance (keyed on config.json's mtime): read it, never modify it; see `meta_model`."""
    path = Path(model_dir).resolve()
    return _cached_meta_model(str(path), (path / "config.json").stat().st_mtime_ns, trust_remote_code)


def meta_model(model_dir: PathLike, trust_remote_code: bool = False) -> PreTrainedModel:
    """A fresh instance of the model on the meta device (no memory; built from config.json)."""
    return copy.deepcopy(shared_meta_model(model_dir, trust_remote_code))


def _checkpoint_key_prefix(block_path: str, base_prefix: str, keys: list[str]) -> str:
    """Where the blocks live in the checkpoint: the module path, or it without the base-model prefix."""
    options = [f"{block_path}."]
    if base_prefix and block_path.startswith(f"{base_prefix}."):
        options.append(block_path[len(base_prefix) + 1 :] + ".")
    for option in options:
        if any(k.startswith(option) for k in keys):
            return option
    raise ValueError(f"checkpoint has no tensors under {' or '.join(options)}: it does not match its config.json")


def skeleton(model_dir: PathLike, trust_remote_code: bool = False) -> Skeleton:
    """Learn block path, count, checkpoint prefix and prunable layers without reading weights."""
    model = shared_meta_model(model_dir, trust_remote_code)
    path, blocks = find_blocks(model)
    keys = SafetensorsIndex.open(model_dir).keys()
    return Skeleton(
        model_dir=Path(model_dir),
        architecture=type(model).__name__,
        block_path=path,
        num_blocks=len(blocks),
        key_prefix=_checkpoint_key_prefix(path, model.base_model_prefix, keys),
        layer_names=tuple(tuple(find_layers(b)) for b in blocks),
        state_keys=tuple(tuple(b.state_dict()) for b in blocks),
    )


# ---------------------------------------------------------------- materializing modules


def ignored_patterns(model: PreTrainedModel) -> re.Pattern:
    """Checkpoint keys transformers itself skips on load for this model (old buffers)."""
    patterns = [*(model._keys_to_ignore_on_load_unexpected or ()), *_ALWAYS_IGNORED]
    return re.compile("|".join(f"({p})" for p in patterns))


def materialize(
    module: nn.Module, owner: PreTrainedModel, state: dict[str, torch.Tensor], device: torch.device | str
) -> None:
    """Give a meta `module` the tensors in `state` (assigned, not copied), then compute its non-persistent buffers.

    Non-persistent buffers (e.g. rotary `inv_freq`) are not in checkpoints; as in
    `from_pretrained`, they are filled by the owner model's `_init_weights`, with every
    loaded tensor flagged as initialized so that nothing loaded is overwritten.
    """
    module.load_state_dict(state, strict=False, assign=True)
    if module is owner:
        owner.tie_weights()  # tied targets (lm_head) are absent from checkpoints
    for _, t in [*module.named_parameters(), *module.named_buffers()]:
        if not t.is_meta:
            t._is_hf_initialized = True
    pending = [(n, b) for n, b in module.named_buffers() if b.is_meta]
    for name, buf in pending:
        parent, _, leaf = name.rpartition(".")
        module.get_submodule(parent).register_buffer(leaf, torch.empty_like(buf, device=device), persistent=False)
    if pending:
        with torch.no_grad(), hf_init.guard_torch_init_functions():
            for sub in module.modules():
                owner._init_weights(sub)
    still_meta = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"{type(owner).__name__}: tensors missing from the checkpoint: {still_meta[:5]}")


def load_block(
    model_dir: PathLike,
    i: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Decoder block `i`, in eval mode, with only its own tensors read from safetensors."""
    sk = skeleton(model_dir, trust_remote_code)
    owner = shared_meta_model(model_dir, trust_remote_code)  # only read: its config and init rules
    block = copy.deepcopy(owner.get_submodule(sk.block_path)[i])
    state = SafetensorsIndex.open(model_dir).load_tensors(sk.block_prefix(i), dtype, device)
    expected, ignored = set(block.state_dict()), ignored_patterns(owner)
    state = {k: v for k, v in state.items() if k in expected or not ignored.search(k)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"block {i} of {sk.architecture} does not match its checkpoint: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}; is config.json the one these weights were saved with?"
        )
    materialize(block, owner, state, device)
    return block.eval()


def stored_dtypes(model_dir: PathLike, i: int, trust_remote_code: bool = False) -> dict[str, torch.dtype]:
    """The dtype each tensor of block `i` has in the checkpoint (block-relative names; headers only)."""
    return SafetensorsIndex.open(model_dir).stored_dtypes(skeleton(model_dir, trust_remote_code).block_prefix(i))


@torch.no_grad()
def round_to_stored(block: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Round each floating tensor of `block` through its checkpoint dtype, in place (e.g. fp32 -> bf16 -> fp32).

    Then the block computes exactly what it will compute once saved in the checkpoint's dtype, so
    activations written now equal those a resumed run rebuilds from the saved block.
    """
    for name, t in block.state_dict(keep_vars=True).items():
        stored = dtypes.get(name)
        if stored is not None and t.is_floating_point() and stored.is_floating_point and stored != t.dtype:
            t.data.copy_(t.data.to(stored))


def save_block(
    path: PathLike,
    block_state_dict: dict[str, torch.Tensor],
    dtypes: dict[str, torch.dtype] | None = None,
    prefix: str = "",
) -> None:
    """Write a block's state dict to a safetensors file, atomically, its names prefixed by `prefix` (the
    block's checkpoint prefix: then the file is a shard of the checkpoint as it is, which
    `stages.model.assemble` links into the output instead of copying). Floating tensors named in `dtypes`
    (block-relative names) are stored in that dtype: the checkpoint's, so the file costs what the block costs."""
    dtypes = dtypes or {}
    tensors = {}
    for k, v in block_state_dict.items():
        v = v.detach().to("cpu")
        if k in dtypes and v.is_floating_point() and dtypes[k].is_floating_point:
            v = v.to(dtypes[k])
        tensors[prefix + k] = v.contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})


def save_grids(path: PathLike, grids: dict[str, QuantGrid]) -> None:
    """Write joint quantization's grids, atomically: per layer (checkpoint name without `.weight`)
    `NAME.weight_scale` (float32, rows x groups) and `NAME.weight_zero_point` (uint8, the integer zero point),
    the largest level in the metadata. With them the stored weights are exact integer codes (`load_grids`)."""
    tensors, maxq = {}, {g.maxq for g in grids.values()}
    if len(maxq) != 1:
        raise ValueError(f"one bit width per block expected, got levels {sorted(maxq)}")
    for name, g in grids.items():
        tensors[f"{name}.weight_scale"] = g.scale.detach().to("cpu", torch.float32).contiguous()
        tensors[f"{name}.weight_zero_point"] = g.zero.detach().to("cpu").to(torch.uint8).contiguous()
    with atomic_path(path) as tmp:
        groups = json.dumps({name: g.groupsize for name, g in grids.items()})
        save_file(tensors, str(tmp), metadata={"format": "pt", "maxq": str(maxq.pop()), "groupsize": groups})


def load_grids(path: PathLike) -> dict[str, QuantGrid]:
    """The grids `save_grids` wrote, by layer name."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        maxq, groups = int(meta["maxq"]), json.loads(meta["groupsize"])
        return {
            name: QuantGrid(
                scale=f.get_tensor(f"{name}.weight_scale"),
                zero=f.get_tensor(f"{name}.weight_zero_point").float(),
                maxq=maxq,
                groupsize=gs,
            )
            for name, gs in groups.items()
        }


# ---------------------------------------------------------------- running a block


def move_kwargs(value: object, batch: int, device: torch.device, dtype: torch.dtype) -> object:
    """Move (nested) tensors to `device`, floats to `dtype`, and expand batch-1 dims (ndim >= 2) to `batch`."""
    if isinstance(value, torch.Tensor):
        value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        if batch > 1 and value.dim() >= 2 and value.shape[0] == 1:
            value = value.expand(batch, *value.shape[1:])
        return value
    if isinstance(value, (tuple, list)):
        return type(value)(move_kwargs(v, batch, device, dtype) for v in value)
    return value


def block_output(out: object) -> torch.Tensor:
    """The hidden states in whatever a decoder block returns (tensor, tuple or ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"cannot find the hidden states in a block output of type {type(out).__name__}")


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, layer_kwargs: Kwargs) -> torch.Tensor:
    """Run `block` on hidden states (b, seqlen, hidden) with kwargs captured at batch size 1."""
    kwargs = {k: move_kwargs(v, hidden.shape[0], hidden.device, hidden.dtype) for k, v in layer_kwargs.items()}
    return block_output(block(hidden, **kwargs))


# ---------------------------------------------------------------- layer kwargs on disk

_KWARGS_KEY = "layer_kwargs"


def _encode(value: object, key: str, tensors: dict[str, torch.Tensor]) -> dict:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").clone().contiguous()  # clone: safetensors refuses shared storage
        return {"tensor": key}
    if isinstance(value, (tuple, list)):
        return {type(value).__name__: [_encode(v, f"{key}.{j}", tensors) for j, v in enumerate(value)]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    kind = type(value).__name__
    raise ValueError(f"layer kwarg '{key}' has type {kind}, which cannot be saved (only tensors, tuples, scalars)")


def _decode(node: dict, tensors: dict[str, torch.Tensor]) -> object:
    if "tensor" in node:
        return tensors[node["tensor"]]
    if "tuple" in node:
        return tuple(_decode(v, tensors) for v in node["tuple"])
    if "list" in node:
        return [_decode(v, tensors) for v in node["list"]]
    return node["value"]


def save_layer_kwargs(path: PathLike, kwargs: Kwargs) -> None:
    """Save block kwargs to one safetensors file: tensors as tensors, their structure as JSON metadata (no pickle)."""
    tensors: dict[str, torch.Tensor] = {}
    spec = {name: _encode(value, name, tensors) for name, value in kwargs.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", _KWARGS_KEY: json.dumps(spec)})


def load_layer_kwargs(path: PathLike) -> Kwargs:
    """Read kwargs written by `save_layer_kwargs` (tuples of tensors come back as tuples)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _KWARGS_KEY not in meta:
            raise ValueError(f"{path} holds no layer kwargs (not written by save_layer_kwargs)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return {name: _decode(node, tensors) for name, node in json.loads(meta[_KWARGS_KEY]).items()}
