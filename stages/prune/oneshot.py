"""The one-shot pipeline's stages over a run directory.

Each stage is a plain function `stage(cfg, run) -> small dict` that reads and writes
files under the run directory and returns at once when its done-record verifies,
so a crashed run resumes at the first unfinished piece of work:

    prepare -> calibrate -> capture -> [owl] -> prune_one(i) for each block -> assemble

(`run_steps`, written once; `OneshotSteps` says how each step runs, so the Prefect flow
passes its tasks and `run_pipeline` the plain functions).

A block is done when `blocks/block_XXX.json` (written last, with the checksum of
`block_XXX.safetensors`) verifies. Activations live in `acts/block_XXX/` as Arrow
shards; only the last `keep_acts` boundaries are kept, and a missing boundary is
rebuilt from the nearest earlier one through the already-pruned blocks.

With `--reconstruct`, `prune_one` trains the block after its solve toward targets on
disk (`stages.prune.reconstruct`): `dense-stream` keeps a second stream of boundaries,
the dense model's own, in `dense/block_XXX/` (block 0's is `acts/block_000`; rebuilt
through the dense blocks like the first stream); `dense-block` writes the dense block's
outputs on the pruned stream to `recon/target_XXX/` and deletes them once the block is done.
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from sparsegpt import owl_sparsities
from stages.config import PruneConfig
from stages.config.tree import to_flat
from stages.data.calibration import read_tokens, sample_calibration, write_tokens
from stages.model.assemble import assemble
from stages.model.blocks import (
    find_layers,
    load_block,
    load_layer_kwargs,
    round_to_stored,
    run_block,
    save_block,
    save_layer_kwargs,
    skeleton,
    stored_dtypes,
)
from stages.model.capture import capture_inputs
from stages.model.checkpoint import resolve_model
from stages.model.models import load_tokenizer
from stages.prune.check import check, identity_upgrade, run_identity
from stages.prune.pruning import block_outlier_ratio, collect_hessians, prune_block
from stages.prune.reconstruct import reconstruct_block
from stages.run.identity import init_run
from stages.run.memory import release_memory
from stages.run.rundir import (
    RunLock,
    bytes_hashed,
    prune_old,
    sweep_tmp,
    verify_record,
    write_record,
)
from stages.run.shards import ShardSet, ShardWriter, is_complete, read_shards
from stages.run.timing import timed

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


def versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


def prepare(cfg: PruneConfig) -> Run:
    """`check` the run's settings, then create or check run.json."""
    model_dir, sk, dtype = check(cfg)
    identity = run_identity(cfg, dtype, model_dir)
    init_run(cfg.run_dir, identity, versions(), upgrade=identity_upgrade(identity), options=to_flat(cfg))
    teacher = cfg.reconstruct.teacher if cfg.reconstruct.enabled else None
    teacher_dir = resolve_model(teacher, trust_remote_code=cfg.trust_remote_code) if teacher else None
    return Run(
        root=Path(cfg.run_dir),
        model_dir=model_dir,
        num_blocks=sk.num_blocks,
        dtype=dtype,
        teacher_dir=teacher_dir if teacher_dir != model_dir else None,
    )


def calibrate(cfg: PruneConfig, run: Run) -> dict:
    """Sample the calibration windows into calib/tokens.arrow."""
    record = run.tokens.with_suffix(".json")
    done = verify_record(record)
    if done is not None:
        return done
    tok = load_tokenizer(run.model_dir, cfg.trust_remote_code)
    ids = sample_calibration(tok, replace(cfg.calib, nsamples=cfg.windows))  # the first nsamples build Hessians
    write_tokens(run.tokens, ids)
    release_memory()  # tokenizing the corpus leaves a large freed heap behind
    return write_record(record, {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}, [run.tokens])


def capture(cfg: PruneConfig, run: Run, needed: bool = False) -> dict:
    """Inputs of block 0 into acts/block_000 and the layer kwargs into acts/layer_kwargs.

    Skipped when both are on disk, or when block 0 is already pruned (its inputs were
    used and may have been deleted since); `needed=True` insists on acts/block_000.
    """
    kw_record = run.layer_kwargs.with_suffix(".json")
    if verify_record(kw_record) is not None and (
        is_complete(run.acts(0)) or (not needed and verify_record(run.block_record(0)) is not None)
    ):
        return {"captured": False}
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
    return {"captured": True, "samples": samples}


def _load_kwargs(run: Run) -> dict:
    return load_layer_kwargs(run.layer_kwargs)


def _load_pruned(cfg: PruneConfig, run: Run, i: int, dtype: torch.dtype) -> torch.nn.Module:
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


def _forward_to_shards(
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
    err, norm, seen = 0.0, 0.0, 0
    with ShardWriter(dst, acts.dtype, acts.sample_shape, SAMPLES_PER_SHARD) as writer:
        for x in acts.iter_batches(cfg.runtime.batch_size, cfg.runtime.device):
            out = run_block(block, x, kwargs)
            n = min(len(out), count - seen) if targets is not None else 0
            if n > 0:
                y = torch.stack([targets[k] for k in range(seen, seen + n)]).to(out.device, torch.float32)
                err += float((out[:n].float() - y).square().sum())
                norm += float(y.square().sum())
            seen += len(out)
            writer.add(out.to("cpu"))
    return err / max(norm, 1e-30) if targets is not None else None


def ensure_acts(cfg: PruneConfig, run: Run, i: int) -> None:
    """Make acts/block_i complete: rebuild it through pruned blocks from the nearest earlier boundary."""
    if is_complete(run.acts(i)):
        return
    start = next((k for k in range(i - 1, -1, -1) if is_complete(run.acts(k))), None)
    if start is None:
        capture(cfg, run, needed=True)
        start = 0
    dtype, kwargs = run.dtype, _load_kwargs(run)
    for k in range(start, i):
        log.info("rebuilding activations of block %d from block %d", k + 1, k)
        _forward_to_shards(cfg, _load_pruned(cfg, run, k, dtype), run.acts(k), run.acts(k + 1), kwargs)
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
    dtype, kwargs = run.dtype, _load_kwargs(run)
    for k in range(start, i):
        log.info("rebuilding dense activations of block %d from block %d", k + 1, k)
        block = load_block(run.teacher, k, cfg.runtime.device, dtype, cfg.trust_remote_code)
        _forward_to_shards(cfg, block, run.dense_acts(k), run.dense_acts(k + 1), kwargs)
        walked = [run.dense_acts(j) for j in range(start, k + 2) if j or run.teacher_dir]  # acts/block_000 stays
        prune_old(walked, keep_last=cfg.runtime.keep_acts)


def _targets(cfg: PruneConfig, run: Run, i: int, block: torch.nn.Module, kwargs: dict) -> Path:
    """Write the reconstruction targets of block i with its dense weights (`block` before its solve, or the
    teacher's block i); return their folder. dense-stream: the dense block on the dense stream, which is
    also dense/block_{i+1}."""
    dense = block
    if run.teacher_dir is not None:
        dense = load_block(run.teacher, i, cfg.runtime.device, run.dtype, cfg.trust_remote_code)
    if cfg.reconstruct.target == "dense-stream":
        ensure_dense_acts(cfg, run, i)
        if not is_complete(run.dense_acts(i + 1)):
            _forward_to_shards(cfg, dense, run.dense_acts(i), run.dense_acts(i + 1), kwargs)
        return run.dense_acts(i + 1)
    if not is_complete(run.target(i)):
        _forward_to_shards(cfg, dense, run.acts(i), run.target(i), kwargs)
    return run.target(i)


def owl_allocation(cfg: PruneConfig, run: Run) -> list[float]:
    """Per-block sparsities: uniform, or OWL from a dense pass over all blocks."""
    if not cfg.solver.owl:
        return [cfg.solver.sparsity] * run.num_blocks
    done = verify_record(run.owl)
    if done is not None:
        return done["sparsities"]
    ensure_acts(cfg, run, 0)
    dtype, kwargs = run.dtype, _load_kwargs(run)
    x = read_shards(run.acts(0))
    # dense activations of the calibration windows, one boundary in memory
    hidden = torch.cat(list(x.iter_batches(cfg.runtime.batch_size, stop=cfg.calib.nsamples)))
    ratios = []
    for i in range(run.num_blocks):
        block = load_block(run.model_dir, i, cfg.runtime.device, dtype, cfg.trust_remote_code)
        batches = [
            hidden[j : j + cfg.runtime.batch_size].to(cfg.runtime.device)
            for j in range(0, len(hidden), cfg.runtime.batch_size)
        ]
        collector = collect_hessians(block, find_layers(block), batches, kwargs, diagonal=True)
        ratios.append(block_outlier_ratio(block, collector, cfg.solver.owl_threshold))
        hidden = torch.cat([run_block(block, b, kwargs).to("cpu") for b in batches])
    sparsities = owl_sparsities(ratios, cfg.solver.sparsity, cfg.solver.owl_lambda)
    write_record(run.owl, {"ratios": ratios, "sparsities": sparsities}, [])
    return sparsities


def prune_one(cfg: PruneConfig, run: Run, i: int, sparsity: float) -> dict:
    """Prune block i: read acts/block_i, write blocks/block_i.* and acts/block_{i+1}."""
    done = verify_record(run.block_record(i))
    if done is not None:
        return done
    t0, h0 = time.perf_counter(), bytes_hashed()
    ensure_acts(cfg, run, i)
    dtype, kwargs = run.dtype, _load_kwargs(run)
    block = load_block(run.model_dir, i, cfg.runtime.device, dtype, cfg.trust_remote_code)
    acts = read_shards(run.acts(i))
    rc = cfg.reconstruct
    count = (rc.samples or cfg.calib.nsamples) if rc.enabled else 0
    # dense-block targets on the calibration windows come from the Hessians' pass, run to the block's end
    fused = (
        rc.enabled
        and rc.target == "dense-block"
        and run.teacher_dir is None
        and count <= cfg.calib.nsamples
        and not is_complete(run.target(i))
    )
    targets = _targets(cfg, run, i, block, kwargs) if rc.enabled and not fused else None
    prefix = f"{skeleton(run.model_dir, cfg.trust_remote_code).block_prefix(i)}"
    with ShardWriter(run.target(i), dtype, acts.sample_shape, SAMPLES_PER_SHARD) if fused else nullcontext() as writer:
        stats = prune_block(
            block,
            lambda: acts.iter_batches(cfg.runtime.batch_size, cfg.runtime.device, stop=cfg.calib.nsamples),
            kwargs,
            cfg.solver,
            sparsity,
            prefix,
            dense_outputs=(lambda y: writer.add(y.to("cpu"))) if fused else None,
        )
    targets = run.target(i) if fused else targets
    stored = stored_dtypes(run.model_dir, i, cfg.trust_remote_code)

    def forward_next(b: torch.nn.Module, wanted: ShardSet | None = None) -> float | None:
        round_to_stored(b, stored)  # the next block's inputs are what the saved (checkpoint-dtype) block gives
        measure = {} if wanted is None else {"targets": wanted, "count": count}
        return _forward_to_shards(cfg, b, run.acts(i), run.acts(i + 1), kwargs, **measure)

    recon = None
    if targets is None:
        forward_next(block)
    else:
        wanted = read_shards(targets)
        round_to_stored(block, stored)  # training starts from the solved block as it would be saved
        recon = reconstruct_block(
            block,
            acts,
            wanted,
            kwargs,
            rc,
            seed=_seed(cfg, i),
            evaluate=lambda b: forward_next(b, wanted),
            solved_dtypes=stored,
        )
        if recon.kept_solved:
            log.warning(
                "block %d: reconstruction %s (normalised MSE %.4g solved, %.4g trained); it keeps its solved weights",
                i,
                "diverged" if math.isnan(recon.trained) else "did not lower the loss",
                recon.before,
                recon.trained,
            )
            forward_next(block)
    save_block(run.block_file(i), block.state_dict(), stored, prefix)
    payload = {
        "block": i,
        "seconds": time.perf_counter() - t0,
        # boundaries verified and written while pruning it, plus its own file, which write_record hashes next
        "bytes_hashed": bytes_hashed() - h0 + run.block_file(i).stat().st_size,
        "layers": {k: asdict(v) for k, v in stats.items()},
    }
    if recon is not None:
        payload["reconstruct"] = asdict(recon)
    record = write_record(run.block_record(i), payload, [run.block_file(i)])
    prune_old(run.root / "acts", "block_*", keep_last=cfg.runtime.keep_acts)
    prune_old(run.root / "dense", "block_*", keep_last=cfg.runtime.keep_acts)
    shutil.rmtree(run.root / "recon", ignore_errors=True)
    del block
    release_memory()
    return record


def _seed(cfg: PruneConfig, i: int) -> int:
    """Block i's reconstruction seed (its samples' order): from the calibration seed and the block."""
    return cfg.calib.seed * 1_000_003 + i


def assemble_model(cfg: PruneConfig, run: Run) -> dict:
    """Write model/ (an HF checkpoint) from the original non-block weights and the pruned blocks."""
    done = verify_record(run.model_record, quick=True)
    if done is not None and run.model.is_dir():
        return done
    missing = [i for i in range(run.num_blocks) if verify_record(run.block_record(i)) is None]
    if missing:
        raise RuntimeError(f"blocks {missing[:5]} are not pruned yet; rerun the prune command to finish them")
    assemble(run.model_dir, run.root / "blocks", run.model, trust_remote_code=cfg.trust_remote_code)
    release_memory()
    files = sorted(p for p in run.model.iterdir() if p.is_file())
    return write_record(run.model_record, {"blocks": run.num_blocks}, files)


def block_records(run: Run) -> list[dict | None]:
    return [verify_record(run.block_record(i), quick=True) for i in range(run.num_blocks)]


def prune_blocks(cfg: PruneConfig, run: Run, sparsities: list[float]) -> list[dict]:
    """Every block in order (`prune_one`; finished blocks return their records at once)."""
    return [prune_one(cfg, run, i, sparsities[i]) for i in range(run.num_blocks)]


@dataclass(frozen=True)
class OneshotSteps:
    """How each step of a one-shot run runs: plain stage functions, or the Prefect flow's tasks wrapping them."""

    calibrate: Callable[[PruneConfig, Run], dict] = calibrate
    capture: Callable[[PruneConfig, Run], dict] = capture
    allocate: Callable[[PruneConfig, Run], list[float]] = owl_allocation
    prune_blocks: Callable[[PruneConfig, Run, list[float]], list[dict]] = prune_blocks
    assemble: Callable[[PruneConfig, Run], dict] = assemble_model


def run_steps(
    cfg: PruneConfig, steps: OneshotSteps = OneshotSteps(), timings: dict[str, float] | None = None
) -> tuple[Run, list[dict]]:
    """The one-shot order, written once: prepare -> calibrate -> capture (+ OWL) -> blocks -> assemble.

    Returns the run and its block records; each step's wall time goes into ``timings``.
    The caller holds the run directory's `RunLock` (`run_pipeline` and the flow do).
    """
    timings = {} if timings is None else timings
    with timed(timings, "prepare"):
        run = prepare(cfg)
    with timed(timings, "calibrate"):
        steps.calibrate(cfg, run)
    with timed(timings, "capture"):
        steps.capture(cfg, run)  # cheap to check; its outputs may be pruned away later
        sparsities = steps.allocate(cfg, run)
    with timed(timings, "prune"):
        records = steps.prune_blocks(cfg, run, sparsities)
    with timed(timings, "assemble"):
        steps.assemble(cfg, run)
    return run, records


def run_pipeline(cfg: PruneConfig) -> Run:
    """All pruning stages in order, without Prefect (the flow runs the same `run_steps` with its tasks).

    Like the flow, it holds the run directory's `RunLock` throughout (a second process
    on the same run directory gets `RunError`) and first sweeps the temporary files a
    killed run left behind.
    """
    with RunLock(cfg.run_dir):
        sweep_tmp(cfg.run_dir)
        run, _ = run_steps(cfg)
    return run
