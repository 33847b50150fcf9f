"""Resumable checkpoints of the fine-tune stage, one folder per step under out_dir/ckpt/.

`save_checkpoint` writes `ckpt/step_XXXXXXXX/` atomically file by file: the student's
weights (`model.safetensors`, shared tensors stored once), the training state
(`train_state.pt`: optimizer, scheduler and gradient-scaler state dicts and the torch,
CUDA, Python and NumPy RNG states), the loss history (`history.json`) and last the
done-record `done.json` (step, data position, checksums of the other files); then it
prunes all but the newest `keep` checkpoints. `latest_checkpoint` returns the newest
folder whose record verifies, so a crash while writing falls back to the one before.

Sharded ranks (`stages.finetune.sharded`) write the same folders with the weights and the
AdamW state as a distributed checkpoint (`save_sharded_checkpoint`: `dcp/`, each rank its
own shards, resharded on load if the rank count changed) and one `train_state_rank{r}.pt`
per rank; rank 0 writes the history and, last, the record over every file. Each kind is
refused by the other's loader with the fix named.

`torch.save` is used only for `train_state*.pt`, which this module writes itself, and
it is read back with `torch.load(weights_only=True)` (no arbitrary unpickling). User
checkpoints are never read this way: models are loaded from safetensors only.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from stages.run.rundir import atomic_path, atomic_write_json, verify_record, write_record

if TYPE_CHECKING:
    from torch.optim import Optimizer

_STEP_RE = re.compile(r"^step_(\d{8})$")
RECORD = "done.json"
WEIGHTS = "model.safetensors"
STATE = "train_state.pt"
HISTORY = "history.json"
DCP = "dcp"


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint on disk."""

    folder: Path
    """The step folder, e.g. out_dir/ckpt/step_00000100."""
    step: int
    """Optimizer steps done."""
    position: int
    """Data position: windows consumed."""
    seconds: float
    """Training wall time spent up to this checkpoint (all earlier calls included)."""


def rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), Python and NumPy RNG states, as tensors, lists and numbers only."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": list(random.getstate()),
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore the states captured by `rng_state`."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss_np = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss_np))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def step_folder(ckpt_dir: Path, step: int) -> Path:
    """The folder of the checkpoint after `step` optimizer steps."""
    return ckpt_dir / f"step_{step:08d}"


def save_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    train_state: dict[str, Any],
    history: list[dict[str, float]],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of step `meta["step"]` (record last), then keep only the newest `keep`."""
    folder = step_folder(ckpt_dir, int(meta["step"]))
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_model(model, str(tmp))
    with atomic_path(folder / STATE) as tmp:
        torch.save(train_state, tmp)
    atomic_write_json(folder / HISTORY, history)
    write_record(folder / RECORD, meta, [folder / WEIGHTS, folder / STATE, folder / HISTORY])
    for old in _step_folders(ckpt_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _step_folders(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def latest_checkpoint(ckpt_dir: Path) -> Checkpoint | None:
    """The newest checkpoint whose done-record and files verify, or None."""
    for folder in reversed(_step_folders(ckpt_dir)):
        meta = verify_record(folder / RECORD)
        if meta is not None:
            return Checkpoint(folder, int(meta["step"]), int(meta["position"]), float(meta.get("seconds", 0.0)))
    return None


def load_checkpoint(ckpt: Checkpoint, model: nn.Module) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Load the weights into `model` in place; return the training state and the loss history."""
    if not (ckpt.folder / WEIGHTS).is_file() and (ckpt.folder / DCP).is_dir():
        raise ValueError(
            f"{ckpt.folder} was written by sharded ranks; resume it with --nproc 2 or more, or delete "
            f"{ckpt.folder.parent} to start the fine-tune over"
        )
    missing, unexpected = load_model(model, ckpt.folder / WEIGHTS, strict=False, device="cpu")
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {ckpt.folder} does not match the student (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); was it written for another model? Delete {ckpt.folder.parent} to start over"
        )
    state = torch.load(ckpt.folder / STATE, map_location="cpu", weights_only=True)
    history = json.loads((ckpt.folder / HISTORY).read_text(encoding="utf-8"))
    return state, history


def _state_file(folder: Path, rank: int) -> Path:
    return folder / f"train_state_rank{rank}.pt"


def save_sharded_checkpoint(
    ckpt_dir: Path,
    model: nn.Module,
    optimizer: Optimizer,
    train_state: dict[str, Any],
    history: list[dict[str, float]],
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """`save_checkpoint` on sharded ranks (every rank calls it): weights and AdamW state through
    `torch.distributed.checkpoint`, this rank's `train_state`, then rank 0's history and record."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    rank = dist.get_rank()
    folder = step_folder(ckpt_dir, int(meta["step"]))
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)  # what a crash left of this very step
        folder.mkdir(parents=True)
    dist.barrier()
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim}, checkpoint_id=str(folder / DCP))
    with atomic_path(_state_file(folder, rank)) as tmp:
        torch.save(train_state, tmp)
    dist.barrier()
    if rank == 0:
        atomic_write_json(folder / HISTORY, history)
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        write_record(folder / RECORD, {**meta, "ranks": dist.get_world_size()}, files)
        for old in _step_folders(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return folder


def load_sharded_checkpoint(
    ckpt: Checkpoint, model: nn.Module, optimizer: Optimizer
) -> tuple[dict[str, Any], list[dict[str, float]]]:
    """Load a sharded checkpoint's weights and AdamW state in place (every rank calls it); return this rank's
    training state (rank 0's when the checkpoint had fewer ranks) and the loss history."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (ckpt.folder / DCP).is_dir():
        raise ValueError(
            f"{ckpt.folder} was written by one process; resume it with --nproc 1, or delete {ckpt.folder.parent} "
            "to start the fine-tune over"
        )
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optim": optim}
    dcp.load(state, checkpoint_id=str(ckpt.folder / DCP))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    own = _state_file(ckpt.folder, dist.get_rank())
    own = own if own.is_file() else _state_file(ckpt.folder, 0)
    train_state = torch.load(own, map_location="cpu", weights_only=True)
    history = json.loads((ckpt.folder / HISTORY).read_text(encoding="utf-8"))
    return train_state, history
