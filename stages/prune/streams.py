"""The activation streams of a run directory: block boundaries on disk and how they are rebuilt.

`acts/block_XXX/` holds the pruned model's stream (block i's inputs, Arrow shards); with
`--reconstruct-target dense-stream`, `dense/block_XXX/` holds the dense model's own
(block 0's is `acts/block_000`, unless a `--reconstruct-teacher` embeds it itself);
`dense-block` writes the dense block's outputs on the pruned stream to `recon/target_XXX/`.
A missing boundary is rebuilt from the nearest earlier complete one, through the pruned
(or dense) blocks, deleting walked boundaries so disk holds `keep_acts` of them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from stages.config import PruneConfig
from stages.data.calibration import read_tokens
from stages.model.blocks import load_block, load_layer_kwargs, run_block, save_layer_kwargs, skeleton
from stages.model.capture import capture_inputs
from stages.prune import shared_inputs
from stages.run.memory import release_memory
from stages.run.rundir import prune_old, verify_record, write_record
from stages.run.shards import ShardSet, ShardWriter, is_complete, read_shards
from stages.run.shared import entry_lock

log = logging.getLogger("sparsegpt.pipeline")
SAMPLES_PER_SHARD = 16


@dataclass(frozen=True)
class Run:
    """Paths of a run directory and the resolved model it prunes."""

    root: Path
    model_dir: Path
    num_blocks: int
    dtype: torch.dtype = torch.float32
    """The compute dtype of the blocks (part of the run's identity)."""
    teacher_dir: Path | None = None
    """The dense model of `--reconstruct-teacher`, when it is another checkpoint than `model_dir`."""

    @property
    def teacher(self) -> Path:
        """The checkpoint whose dense blocks give the reconstruction targets."""
        return self.teacher_dir or self.model_dir

    @property
    def tokens(self) -> Path:
        return self.root / "calib" / "tokens.arrow"

    @property
    def layer_kwargs(self) -> Path:
        return self.root / "acts" / "layer_kwargs.safetensors"

    def acts(self, i: int) -> Path:
        return self.root / "acts" / f"block_{i:03d}"

    def dense_acts(self, i: int) -> Path:
        """Boundary i of the dense model's own stream (`--reconstruct-target dense-stream`); block 0's inputs
        are both streams' first boundary, unless a `--reconstruct-teacher` embeds them itself."""
        return self.acts(0) if i == 0 and self.teacher_dir is None else self.root / "dense" / f"block_{i:03d}"

    def target(self, i: int) -> Path:
        """The dense block i's outputs on the pruned stream (`--reconstruct-target dense-block`)."""
        return self.root / "recon" / f"target_{i:03d}"

    def block_file(self, i: int) -> Path:
        return self.root / "blocks" / f"block_{i:03d}.safetensors"

    def grid_file(self, i: int) -> Path:
        """Joint quantization's grids of block i (`--wbits`), what a packed export needs."""
        return self.root / "blocks" / f"block_{i:03d}.grid.safetensors"

    def block_record(self, i: int) -> Path:
        return self.root / "blocks" / f"block_{i:03d}.json"

    @property
    def owl(self) -> Path:
        return self.root / "owl.json"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def model_record(self) -> Path:
        return self.root / "model.json"


def capture(cfg: PruneConfig, run: Run, needed: bool = False) -> dict:
    """Inputs of block 0 into acts/block_000 and the layer kwargs into acts/layer_kwargs (or linked from the
    shared cache, `stages.prune.shared_inputs`).

    Skipped when both are on disk, or when block 0 is already pruned (its inputs were
    used and may have been deleted since); `needed=True` insists on acts/block_000.
    """
    kw_record = run.layer_kwargs.with_suffix(".json")
    if verify_record(kw_record) is not None and (
        is_complete(run.acts(0)) or (not needed and verify_record(run.block_record(0)) is not None)
    ):
        return {"captured": False}
    entry = shared_inputs.inputs_entry(cfg, run.model_dir, run.dtype)
    with entry_lock(entry):
        if shared_inputs.fetch(entry, run.root) and verify_record(kw_record) is not None and is_complete(run.acts(0)):
            return {"captured": False, "shared": True}
        ids = torch.from_numpy(read_tokens(run.tokens).astype(np.int64))
        dtype = run.dtype
        hidden, kwargs = capture_inputs(
            run.model_dir, ids, cfg.runtime.device, dtype, cfg.runtime.batch_size, cfg.trust_remote_code
        )
        with ShardWriter(run.acts(0), dtype, tuple(hidden.shape[1:]), SAMPLES_PER_SHARD) as writer:
            writer.add(hidden)
        save_layer_kwargs(run.layer_kwargs, kwargs)
        write_record(kw_record, {}, [run.layer_kwargs])
        samples = int(hidden.shape[0])
        del hidden
        release_memory()
        if cfg.runtime.share_inputs:
            files = sorted(p for p in run.acts(0).iterdir() if p.is_file() and ".tmp-" not in p.name)
            shared_inputs.store(entry, run.root, [*files, run.layer_kwargs, kw_record])
    return {"captured": True, "samples": samples}


def load_kwargs(run: Run) -> dict:
    return load_layer_kwargs(run.layer_kwargs)


def load_pruned(cfg: PruneConfig, run: Run, i: int, dtype: torch.dtype) -> torch.nn.Module:
    """Block i with its pruned weights from blocks/block_i.safetensors (checkpoint names, or block-relative
    names in runs from before the files were shards of the output)."""
    from safetensors.torch import load_file

    block = load_block(run.model_dir, i, cfg.runtime.device, dtype, cfg.trust_remote_code)
    state = load_file(str(run.block_file(i)), device=str(cfg.runtime.device))
    prefix = skeleton(run.model_dir, cfg.trust_remote_code).block_prefix(i)
    block.load_state_dict(
        {k.removeprefix(prefix): v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    )
    return block


def forward_to_shards(
    cfg: PruneConfig,
    block: torch.nn.Module,
    src: Path,
    dst: Path,
    kwargs: dict,
    targets: ShardSet | None = None,
    count: int = 0,
) -> float | None:
    """Run ``block`` over every sample of ``src`` and write the outputs to ``dst``; with ``targets``, return
    the outputs' normalised MSE against them over the first ``count`` samples (`normalised_mse`)."""
    acts = read_shards(src)
    device = cfg.runtime.device
    err, norm, seen = torch.zeros((), device=device), torch.zeros((), device=device), 0  # no host sync per batch
    with ShardWriter(dst, acts.dtype, acts.sample_shape, SAMPLES_PER_SHARD) as writer:
        for x in acts.iter_batches(cfg.runtime.batch_size, cfg.runtime.device):
            out = run_block(block, x, kwargs)
            n = min(len(out), count - seen) if targets is not None else 0
            if n > 0:
                y = torch.stack([targets[k] for k in range(seen, seen + n)]).to(out.device, torch.float32)
                err += (out[:n].float() - y).square().sum()
                norm += y.square().sum()
            seen += len(out)
            writer.add(out)
    return float(err) / max(float(norm), 1e-30) if targets is not None else None


def ensure_acts(cfg: PruneConfig, run: Run, i: int) -> None:
    """Make acts/block_i complete: rebuild it through pruned blocks from the nearest earlier boundary."""
    if is_complete(run.acts(i)):
        return
    start = next((k for k in range(i - 1, -1, -1) if is_complete(run.acts(k))), None)
    if start is None:
        capture(cfg, run, needed=True)
        start = 0
    dtype, kwargs = run.dtype, load_kwargs(run)
    for k in range(start, i):
        log.info("rebuilding activations of block %d from block %d", k + 1, k)
        forward_to_shards(cfg, load_pruned(cfg, run, k, dtype), run.acts(k), run.acts(k + 1), kwargs)
        # boundaries walked through go as the rebuild proceeds: disk holds keep_acts of them, as in a straight run
        prune_old([run.acts(j) for j in range(start, k + 2)], keep_last=cfg.runtime.keep_acts)


def ensure_dense_acts(cfg: PruneConfig, run: Run, i: int) -> None:
    """Make dense/block_i complete: the dense model's stream, rebuilt through the dense blocks from the
    nearest earlier complete boundary (block 0's inputs, captured again if they are gone)."""
    if is_complete(run.dense_acts(i)):
        return
    start = next((k for k in range(i - 1, 0, -1) if is_complete(run.dense_acts(k))), 0)
    if start == 0 and run.teacher_dir is None:
        ensure_acts(cfg, run, 0)
    elif start == 0 and not is_complete(run.dense_acts(0)):  # the teacher's own block-0 inputs
        ids = torch.from_numpy(read_tokens(run.tokens).astype(np.int64))
        hidden, _ = capture_inputs(
            run.teacher, ids, cfg.runtime.device, run.dtype, cfg.runtime.batch_size, cfg.trust_remote_code
        )
        with ShardWriter(run.dense_acts(0), run.dtype, tuple(hidden.shape[1:]), SAMPLES_PER_SHARD) as writer:
            writer.add(hidden)
        del hidden
    dtype, kwargs = run.dtype, load_kwargs(run)
    for k in range(start, i):
        log.info("rebuilding dense activations of block %d from block %d", k + 1, k)
        block = load_block(run.teacher, k, cfg.runtime.device, dtype, cfg.trust_remote_code)
        forward_to_shards(cfg, block, run.dense_acts(k), run.dense_acts(k + 1), kwargs)
        walked = [run.dense_acts(j) for j in range(start, k + 2) if j or run.teacher_dir]  # acts/block_000 stays
        prune_old(walked, keep_last=cfg.runtime.keep_acts)


def reconstruction_targets(cfg: PruneConfig, run: Run, i: int, block: torch.nn.Module, kwargs: dict) -> Path:
    """Write the reconstruction targets of block i with its dense weights (`block` before its solve, or the
    teacher's block i); return their folder. dense-stream: the dense block on the dense stream, which is
    also dense/block_{i+1}."""
    dense = block
    if run.teacher_dir is not None:
        dense = load_block(run.teacher, i, cfg.runtime.device, run.dtype, cfg.trust_remote_code)
    if cfg.reconstruct.target == "dense-stream":
        ensure_dense_acts(cfg, run, i)
        if not is_complete(run.dense_acts(i + 1)):
            forward_to_shards(cfg, dense, run.dense_acts(i), run.dense_acts(i + 1), kwargs)
        return run.dense_acts(i + 1)
    if not is_complete(run.target(i)):
        forward_to_shards(cfg, dense, run.acts(i), run.target(i), kwargs)
    return run.target(i)
