"""A causal LM sharded over torch.distributed ranks with FSDP2, read from and written to safetensors.

`load_sharded(model_dir, mesh, device, dtype)` builds the model on the meta device and
materializes it one unit at a time, every rank reading the same tensors: each decoder
block (its tensors read from the checkpoint, then `fully_shard`, which keeps this rank's
rows and frees the rest), the input and output embeddings when they are not tied (each
its own unit: at 8B an fp32 embedding outweighs a block), then the remaining tensors
(final norm, tied embeddings; ties and non-persistent buffers as `from_pretrained` makes
them) and the root `fully_shard`. A rank never holds more than one unit's full tensors
beside its shards (saving: one tensor).

`save_sharded(model, src_dir, out_dir)` writes the model back as a Hugging Face
checkpoint with the source checkpoint's tensor names and dtypes: every rank casts its shard
of one tensor at a time to the written dtype and gathers it (`full_tensor`), rank 0 streams
it into the output shard (`stages.model.assemble.write_shards`) and copies config,
generation config and tokenizer files. All ranks must call both functions in the same order.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from transformers import PreTrainedModel

from stages.model.assemble import DEFAULT_SHARD_BYTES, WEIGHT_SUFFIXES, Unit, original_layout, write_index, write_shards
from stages.model.blocks import find_blocks, ignored_patterns, materialize, meta_model, skeleton
from stages.model.checkpoint import INDEX_NAME, SafetensorsIndex, validate_model_dir
from stages.run.rundir import fsync_dir, fsync_tree


def model_keys(model: PreTrainedModel, model_dir: Path, trust_remote_code: bool = False) -> dict[str, str]:
    """Checkpoint tensor name -> the model's state-dict name, for every checkpoint tensor the model has
    (old buffers transformers ignores on load are left out)."""
    sk = skeleton(model_dir, trust_remote_code)
    names, ignored = set(model.state_dict()), ignored_patterns(model)
    out: dict[str, str] = {}
    for key in SafetensorsIndex.open(model_dir).keys():
        i = sk.block_of(key)
        name = f"{sk.block_path}.{i}.{key[len(sk.block_prefix(i)) :]}" if i is not None else key
        if name not in names and f"{model.base_model_prefix}.{name}" in names:
            name = f"{model.base_model_prefix}.{name}"
        if name in names:
            out[key] = name
        elif not ignored.search(key):
            raise ValueError(
                f"{model_dir}: tensor {key!r} matches nothing in {type(model).__name__}; is config.json the one "
                "these weights were saved with?"
            )
    return out


def load_sharded(
    model_dir: Path,
    mesh: DeviceMesh,
    device: str,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    trainable: bool = True,
) -> PreTrainedModel:
    """The model of `model_dir`, every parameter sharded by rows over `mesh` (FSDP2), in `dtype` on `device`."""
    model_dir = validate_model_dir(Path(model_dir), trust_remote_code)
    model = meta_model(model_dir, trust_remote_code)
    keys = model_keys(model, model_dir, trust_remote_code)
    index = SafetensorsIndex.open(model_dir)
    path, blocks = find_blocks(model)
    by_block: list[dict[str, str]] = [{} for _ in blocks]
    rest: dict[str, str] = {}
    for key, name in keys.items():
        if name.startswith(f"{path}."):
            i, _, local = name[len(path) + 1 :].partition(".")
            by_block[int(i)][key] = local
        else:
            rest[key] = name
    units = list(zip(blocks, by_block, strict=True))
    for module in _embeddings(model):  # an untied embedding or lm_head (2 GiB in fp32 at 8B) is a unit of its own
        prefix = f"{_name_of(model, module)}."
        mine = {k: n for k, n in rest.items() if n.startswith(prefix)}
        units.append((module, {k: n[len(prefix) :] for k, n in mine.items()}))
        rest = {k: n for k, n in rest.items() if k not in mine}
    for unit, names in units:
        _materialize(unit, model, index, names, dtype, device)
        unit.requires_grad_(trainable)
        fully_shard(unit, mesh=mesh)
    _materialize(model, model, index, rest, dtype, device)
    model.requires_grad_(trainable)
    fully_shard(model, mesh=mesh)
    return model


def _embeddings(model: PreTrainedModel) -> list[nn.Module]:
    """The input and output embeddings, when they are not tied (tied ones stay with the root's tensors: one
    parameter cannot be sharded by two units)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if out is None or inp is None or out.weight is inp.weight:
        return []
    return [inp, out]


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _materialize(
    module: nn.Module,
    owner: PreTrainedModel,
    index: SafetensorsIndex,
    names: dict[str, str],
    dtype: torch.dtype,
    device: str,
) -> None:
    state = index.load(list(names), dtype, device)
    materialize(module, owner, {names[k]: t for k, t in state.items()}, device)


def _gather(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The full tensor in `dtype` on the CPU, cast before it is gathered from every rank (a collective)."""
    t = tensor.detach().to(dtype)  # a DTensor casts its shard: the gather moves and holds the written bytes
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).to("cpu")


def _units(model: PreTrainedModel, src_dir: Path, trust_remote_code: bool) -> list[Unit]:
    """The source checkpoint's tensors, one unit each in its order (an untied fp32 embedding gathered whole
    outweighs a block), gathered from the sharded model on demand, in the source's dtypes."""
    keys = model_keys(model, src_dir, trust_remote_code)
    layout = original_layout(SafetensorsIndex.open(src_dir))
    state = model.state_dict()

    def unit(key: str, name: str) -> Unit:
        dtype = layout[key][0]
        return Unit({key: layout[key]}, lambda: {key: _gather(state[name], dtype)})

    return [unit(key, name) for key, name in keys.items()]


def save_sharded(
    model: PreTrainedModel,
    src_dir: Path,
    out_dir: Path,
    trust_remote_code: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> None:
    """Write the sharded `model` to `out_dir` (rank 0 writes; every rank gathers with it), with `src_dir`'s
    tensor names, dtypes and non-weight files; written under a temporary name and renamed into place."""
    units = _units(model, Path(src_dir), trust_remote_code)
    if dist.get_rank() != 0:
        for unit in units:  # the gathers rank 0's writing asks for, in its order
            unit.load()
        dist.barrier()
        return
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write_index(tmp, write_shards(units, tmp, max_shard_bytes))
        for src in sorted(Path(src_dir).iterdir()):
            if src.is_file() and not src.name.endswith(WEIGHT_SUFFIXES) and src.name != INDEX_NAME:
                shutil.copy2(src, tmp / src.name)
        fsync_tree(tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        os.replace(tmp, out_dir)
        fsync_dir(out_dir.parent)
    except BaseException:  # rank 0 leaves with the error; the spawner stops the ranks waiting in a gather
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    dist.barrier()
