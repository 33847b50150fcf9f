"""What a one-shot prune refuses before any work, and the identity its run directory keys on.

`check` reads the arguments, the model's config (as JSON) and the files' existence only,
cheapest first (the model skeleton, the first import of torch and transformers' modeling
code, comes last), so that the command line answers bad input in well under a second,
before Prefect starts. It writes nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.config import PruneConfig
from stages.model.checkpoint import (
    DEPTH_ATTRS,
    HIDDEN_ATTRS,
    SafetensorsIndex,
    check_model,
    checkpoint_digest,
    compute_dtype_name,
    config_int,
)
from stages.run.identity import check_run
from stages.run.memory import device_bytes
from stages.run.rundir import RunError

if TYPE_CHECKING:
    import torch

    from stages.model.blocks import Skeleton

_ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def check(cfg: PruneConfig) -> tuple[Path, Skeleton, torch.dtype]:
    """Refuse what the arguments, the model's config and the files show to be wrong: the model, its
    blocks, seqlen against its positions, N:M against its layers' widths, a GPU that is not there, a run
    directory holding another run, too little free disk. Returns the model directory, its skeleton and the
    compute dtype."""
    seqlens = {"seqlen": cfg.calib.seqlen, "eval_seqlen": cfg.eval_seqlen}
    model_dir, config = check_model(cfg.model, cfg.trust_remote_code, cfg.runtime.device, seqlens)
    dtype = compute_dtype_name(cfg.runtime.device, config, cfg.runtime.dtype)
    identity = run_identity(cfg, dtype, model_dir)
    check_run(cfg.run_dir, identity, upgrade=identity_upgrade(identity))
    check_free_disk(cfg, model_dir, config, dtype)
    check_nm_hidden(cfg, config)
    check_teacher(cfg, config)
    check_sequential_fits(cfg, config, dtype)
    check_ranks(cfg)
    check_kernel(cfg)
    if cfg.runtime.export == "compressed-tensors" and cfg.solver.quant is None:
        raise ValueError("--export compressed-tensors packs quantized weights: add --wbits 4 (or 8), or --export hf")
    # the first import of torch and transformers' modeling code: the model built on the meta device
    from stages.model.blocks import skeleton
    from stages.model.models import compute_dtype

    sk = skeleton(model_dir, cfg.trust_remote_code)
    check_nm_fits(cfg, sk)
    return model_dir, sk, compute_dtype(cfg.runtime.device, model_dir, cfg.runtime.dtype)


def run_identity(cfg: PruneConfig, dtype: torch.dtype | str, model_dir: Path) -> dict:
    """The config's identity, the compute dtype it resolved to (activations on disk are in that dtype, so a
    resume with another `--dtype`, or a device whose auto dtype differs, is refused) and the checkpoint's
    digest (`checkpoint_digest`: a checkpoint replaced under a half-pruned run is refused)."""
    resolved = {"compute_dtype": str(dtype).removeprefix("torch."), "model_revision": checkpoint_digest(model_dir)}
    return {**cfg.identity(), **resolved}


def identity_upgrade(identity: Mapping[str, Any]) -> Callable[[Mapping[str, Any]], dict]:
    """Today's identity of a stored config; a run from before the compute dtype or the checkpoint's digest
    were recorded takes today's (`identity`'s) values of them."""
    resolved = ("compute_dtype", "model_revision")

    def upgrade(stored: Mapping[str, Any]) -> dict:
        config = PruneConfig.upgrade({k: v for k, v in stored.items() if k not in resolved})
        return {**config, **{k: stored.get(k, identity[k]) for k in resolved}}

    return upgrade


FFN_ATTRS = ("intermediate_size", "ffn_dim", "n_inner")


def sequential_bytes(cfg: PruneConfig, config: Mapping[str, Any], dtype: str) -> int:
    """What `--sequential` holds at once: every calibration batch's in-flight activations of a block, at its
    widest point (the residual stream, the normed input and the MLP's inner width, a token each)."""
    hidden = config_int(config, HIDDEN_ATTRS) or 0
    inner = config_int(config, FFN_ATTRS) or 4 * hidden
    return cfg.calib.nsamples * cfg.calib.seqlen * (2 * hidden + inner) * _ITEMSIZE.get(dtype, 4)


def check_sequential_fits(cfg: PruneConfig, config: Mapping[str, Any], dtype: str) -> None:
    """Refuse `--sequential` when `sequential_bytes` exceeds the device's memory."""
    if not cfg.solver.sequential:
        return
    need, have = sequential_bytes(cfg, config, dtype), device_bytes(cfg.runtime.device)
    if have is not None and need > have:
        tokens = f"{cfg.calib.nsamples} x {cfg.calib.seqlen}"
        raise ValueError(
            f"--sequential holds every calibration batch's activations of a block at once: about "
            f"{need / 2**30:.1f} GiB for {tokens} tokens in {dtype}, and {cfg.runtime.device} has "
            f"{have / 2**30:.1f} GiB; lower --nsamples or drop --sequential"
        )


def disk_needed(cfg: PruneConfig, model_dir: Path, config: Mapping[str, Any], dtype: str) -> int:
    """Bytes a prune writes at its peak: the pruned blocks (about the checkpoint's size; `model/` links
    them and adds its non-block tensors) and the activation boundaries kept at once (`keep_acts` + the one
    being written; twice that for `--reconstruct-target dense-stream`)."""
    index = SafetensorsIndex.open(model_dir)
    weights = sum((model_dir / f).stat().st_size for f in index.files())
    hidden = config_int(config, HIDDEN_ATTRS) or 0
    boundary = cfg.windows * cfg.calib.seqlen * hidden * _ITEMSIZE.get(dtype, 4)
    boundaries = cfg.runtime.keep_acts + 1
    if cfg.reconstruct.enabled:  # the dense stream as many more, or one boundary of dense-block targets
        boundaries += boundaries if cfg.reconstruct.target == "dense-stream" else 1
    return weights + boundaries * boundary


def check_kernel(cfg: PruneConfig) -> None:
    """Refuse ``--kernel triton`` where the triton package is missing (the config itself refuses it off a GPU)."""
    if cfg.solver.kernel == "triton":
        from sparsegpt.kernel import triton_missing

        if missing := triton_missing():
            raise ValueError(missing)


def check_free_disk(cfg: PruneConfig, model_dir: Path, config: Mapping[str, Any], dtype: str) -> None:
    """Refuse a run whose peak disk use exceeds the free space under its run directory (minus what a
    resumed run has already written)."""
    root = Path(cfg.run_dir)
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    files = {(st.st_dev, st.st_ino): st.st_size for p in root.rglob("*") if p.is_file() for st in [p.stat()]}
    done = sum(files.values())  # a hard link (model/ shares blocks/) counted once
    needed = disk_needed(cfg, model_dir, config, dtype) - done
    free = shutil.disk_usage(existing).free
    if needed > free:
        raise RunError(
            f"not enough free disk for {root}: the run needs about {needed / 2**30:.2f} GiB more, "
            f"{existing} has {free / 2**30:.2f} GiB free; free space there or use a --run-dir on a larger disk"
        )


def check_nm_hidden(cfg: PruneConfig, config: Mapping[str, Any]) -> None:
    """Refuse, from the config alone, an N:M whose M does not divide the hidden size: the input width of the
    layers that read a block's input (q/k/v, gate/up, fc1) in every decoder (`check_nm_fits` then checks
    every layer against the skeleton)."""
    n, m = cfg.solver.prune_nm
    hidden = config_int(config, HIDDEN_ATTRS)
    if m and hidden is not None and hidden % m:
        raise ValueError(
            f"--nm {n}:{m} does not fit the model: its hidden size {hidden} (the input width of the layers that "
            f"read each block's input) is not a multiple of M={m}; choose an M that divides it (e.g. 2:4)"
        )


def check_teacher(cfg: PruneConfig, config: Mapping[str, Any]) -> None:
    """Refuse a `--reconstruct-teacher` that does not resolve or whose blocks do not match the model's."""
    if not (cfg.reconstruct.enabled and cfg.reconstruct.teacher):
        return
    _, teacher = check_model(cfg.reconstruct.teacher, cfg.trust_remote_code, "cpu", {})
    ours, theirs = [(config_int(c, DEPTH_ATTRS), config_int(c, HIDDEN_ATTRS)) for c in (config, teacher)]
    if ours != theirs:
        raise ValueError(
            f"--reconstruct-teacher {cfg.reconstruct.teacher} has {theirs[0]} blocks of width {theirs[1]}, the model "
            f"being pruned {ours[0]} of width {ours[1]}; pass the dense version of the model being pruned"
        )


def check_nm_fits(cfg: PruneConfig, sk: Skeleton) -> None:
    """Refuse an N:M pattern whose M does not divide some pruned layer's input width (before any work)."""
    from stages.model.blocks import find_blocks, find_layers, get_weight, shared_meta_model

    n, m = cfg.solver.prune_nm
    if not m:
        return
    _, blocks = find_blocks(shared_meta_model(sk.model_dir, cfg.trust_remote_code))
    for i, block in enumerate(blocks):
        for name, layer in find_layers(block).items():
            cols = get_weight(layer).shape[1]
            if cols % m:
                raise ValueError(
                    f"--nm {n}:{m} does not fit layer {sk.block_prefix(i)}{name}: its input width {cols} is not "
                    f"a multiple of M={m}; choose an M that divides every layer's width (e.g. 2:4)"
                )


def world_size(cfg: PruneConfig) -> int:
    """The ranks that prune the run: torchrun's WORLD_SIZE when it launched this process, else `--nproc`."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    return launched if launched > 1 else cfg.runtime.nproc


def check_ranks(cfg: PruneConfig) -> None:
    """Refuse a `--nproc` the run cannot use: more ranks than GPUs or than shards of calibration windows
    (each rank needs one), and the modes the data-parallel path does not run yet."""
    nproc = world_size(cfg)
    if nproc != cfg.runtime.nproc and cfg.runtime.nproc != 1:
        raise ValueError(f"torchrun started {nproc} ranks; drop --nproc {cfg.runtime.nproc} (its ranks are the run's)")
    if nproc == 1:
        return
    if cfg.solver.sequential or cfg.reconstruct.enabled:
        what = "--sequential" if cfg.solver.sequential else "--reconstruct"
        raise ValueError(f"--nproc {nproc} does not run {what} yet; drop one of the two")
    from stages.prune.streams import SAMPLES_PER_SHARD

    shards = -(-cfg.windows // SAMPLES_PER_SHARD)
    if nproc > shards:
        raise ValueError(
            f"--nproc {nproc} needs {nproc} shards of {SAMPLES_PER_SHARD} calibration windows, the run has "
            f"{shards}; give --nsamples {nproc * SAMPLES_PER_SHARD} or more, or --nproc {shards}"
        )
    if cfg.runtime.device.startswith("cuda"):
        import torch

        if cfg.runtime.device != "cuda":
            device = cfg.runtime.device
            raise ValueError(f"--nproc {nproc} gives each rank its own GPU: use --device cuda, not {device}")
        if nproc > torch.cuda.device_count() and nproc == cfg.runtime.nproc:  # torchrun: GPUs on several nodes
            raise ValueError(f"--nproc {nproc} needs {nproc} GPUs, torch sees {torch.cuda.device_count()}")
