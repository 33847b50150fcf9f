"""The one-shot pipeline's stages over a run directory.

Each stage is a plain function `stage(cfg, run) -> small dict` that reads and writes
files under the run directory and returns at once when its done-record verifies,
so a crashed run resumes at the first unfinished piece of work:

    prepare -> calibrate -> capture -> [owl] -> prune_one(i) for each block -> assemble

(`run_steps`, written once; `OneshotSteps` says how each step runs, so the Prefect flow
passes its tasks and `run_pipeline` the plain functions).

A block is done when `blocks/block_XXX.json` (written last, with the checksum of
`block_XXX.safetensors`) verifies. Activations live in `acts/block_XXX/` as Arrow
shards (`stages.prune.streams`); only the last `keep_acts` boundaries are kept, and a
missing boundary is rebuilt from the nearest earlier one through the already-pruned blocks.

With `--reconstruct`, `prune_one` trains the block after its solve toward targets on
disk (`stages.prune.reconstruct`; the boundaries and target streams: `stages.prune.streams`).
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

import torch

from sparsegpt import owl_sparsities
from stages.config import PruneConfig
from stages.config.tree import to_flat
from stages.data.calibration import sample_calibration, write_tokens
from stages.model.assemble import assemble
from stages.model.blocks import (
    find_layers,
    load_block,
    round_to_stored,
    run_block,
    save_block,
    save_grids,
    skeleton,
    stored_dtypes,
)
from stages.model.checkpoint import resolve_model
from stages.model.models import load_tokenizer
from stages.prune import shared_inputs, streams
from stages.prune.check import check, identity_upgrade, run_identity, world_size
from stages.prune.pruning import block_outlier_ratio, collect_hessians, prune_block
from stages.prune.reconstruct import reconstruct_block
from stages.prune.sequential import NotSequential, prune_block_sequential
from stages.prune.streams import Run, capture, ensure_acts, load_kwargs, reconstruction_targets
from stages.run.identity import init_run
from stages.run.memory import keep_freed_memory, release_grown_memory, release_memory
from stages.run.rundir import RunLock, bytes_hashed, prune_old, sweep_tmp, verify_record, write_record
from stages.run.shards import ShardSet, ShardWriter, is_complete, read_shards
from stages.run.shared import entry_lock
from stages.run.timing import timed
from stages.run.transfer import HostSink, device_batches

log = logging.getLogger("sparsegpt.pipeline")


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
    """Sample the calibration windows into calib/tokens.arrow (or link them from the shared cache)."""
    record = run.tokens.with_suffix(".json")
    done = verify_record(record)
    if done is not None:
        return done
    entry = shared_inputs.tokens_entry(cfg, run.model_dir)
    with entry_lock(entry):
        if shared_inputs.fetch(entry, run.root) and (done := verify_record(record)) is not None:
            return done
        tok = load_tokenizer(run.model_dir, cfg.trust_remote_code)
        ids = sample_calibration(tok, replace(cfg.calib, nsamples=cfg.windows))  # the first nsamples: Hessians
        write_tokens(run.tokens, ids)
        release_memory()  # tokenizing the corpus leaves a large freed heap behind
        out = write_record(record, {"nsamples": int(ids.shape[0]), "seqlen": int(ids.shape[1])}, [run.tokens])
        if cfg.runtime.share_inputs:
            shared_inputs.store(entry, run.root, [run.tokens, record])
    return out


def owl_allocation(cfg: PruneConfig, run: Run) -> list[float]:
    """Per-block sparsities: uniform, or OWL from a dense pass over all blocks."""
    if not cfg.solver.owl:
        return [cfg.solver.sparsity] * run.num_blocks
    done = verify_record(run.owl)
    if done is not None:
        return done["sparsities"]
    ensure_acts(cfg, run, 0)
    dtype, kwargs = run.dtype, load_kwargs(run)
    x = read_shards(run.acts(0))
    # dense activations of the calibration windows, one boundary in memory
    hidden = torch.cat(list(x.iter_batches(cfg.runtime.batch_size, stop=cfg.calib.nsamples)))
    ratios = []
    for i in range(run.num_blocks):
        block = load_block(run.model_dir, i, cfg.runtime.device, dtype, cfg.trust_remote_code)
        size = cfg.runtime.batch_size
        batches = list(device_batches((hidden[j : j + size] for j in range(0, len(hidden), size)), cfg.runtime.device))
        collector = collect_hessians(block, find_layers(block), batches, kwargs, diagonal=True)
        ratios.append(block_outlier_ratio(block, collector, cfg.solver.owl_threshold))
        outputs: list[torch.Tensor] = []
        with HostSink(outputs.append) as to_host:
            for b in batches:
                to_host(run_block(block, b, kwargs))
        hidden = torch.cat(outputs)
    sparsities = owl_sparsities(ratios, cfg.solver.sparsity, cfg.solver.owl_lambda)
    write_record(run.owl, {"ratios": ratios, "sparsities": sparsities}, [])
    return sparsities


def prune_one(cfg: PruneConfig, run: Run, i: int, sparsity: float) -> dict:
    """Prune block i: read acts/block_i, write blocks/block_i.* and acts/block_{i+1}."""
    done = verify_record(run.block_record(i))
    if done is not None:
        return done
    t0, h0 = time.perf_counter(), bytes_hashed()
    keep_freed_memory()  # each batch reuses the pages the last one freed
    ensure_acts(cfg, run, i)
    dtype, kwargs = run.dtype, load_kwargs(run)
    block = load_block(run.model_dir, i, cfg.runtime.device, dtype, cfg.trust_remote_code)
    acts = read_shards(run.acts(i))
    rc = cfg.reconstruct
    count = (rc.samples or cfg.calib.nsamples) if rc.enabled else 0
    # dense-block targets on the calibration windows come from the Hessians' pass, run to the block's end
    fused = (
        rc.enabled
        and not cfg.solver.sequential
        and rc.target == "dense-block"
        and run.teacher_dir is None
        and count <= cfg.calib.nsamples
        and not is_complete(run.target(i))
    )
    targets = reconstruction_targets(cfg, run, i, block, kwargs) if rc.enabled and not fused else None
    stored = stored_dtypes(run.model_dir, i, cfg.trust_remote_code)
    prefix = skeleton(run.model_dir, cfg.trust_remote_code).block_prefix(i)
    solve = (block, acts, kwargs, sparsity, prefix, stored)
    block, stats, written = _solve(cfg, run, i, *solve, fused=fused, forward=targets is None)
    targets = run.target(i) if fused else targets

    def forward_next(b: torch.nn.Module, wanted: ShardSet | None = None) -> float | None:
        round_to_stored(b, stored)  # the next block's inputs are what the saved (checkpoint-dtype) block gives
        measure = {} if wanted is None else {"targets": wanted, "count": count}
        return streams.forward_to_shards(cfg, b, run.acts(i), run.acts(i + 1), kwargs, **measure)

    recon = None
    if targets is None:
        if not written:
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
    files = save_block_files(run, i, block, stats, stored, prefix)
    payload = {
        "block": i,
        "seconds": time.perf_counter() - t0,
        # boundaries verified and written while pruning it, plus its own file, which write_record hashes next
        "bytes_hashed": bytes_hashed() - h0 + sum(f.stat().st_size for f in files),
        "layers": {k: v.record() for k, v in stats.items()},
    }
    if recon is not None:
        payload["reconstruct"] = asdict(recon)
    record = write_record(run.block_record(i), payload, files)
    prune_old(run.root / "acts", "block_*", keep_last=cfg.runtime.keep_acts)
    prune_old(run.root / "dense", "block_*", keep_last=cfg.runtime.keep_acts)
    shutil.rmtree(run.root / "recon", ignore_errors=True)
    del block
    release_grown_memory()  # what the blocks leave behind goes back when it grows: memory stays flat in depth
    return record


def save_block_files(
    run: Run, i: int, block: torch.nn.Module, stats: dict, stored: dict[str, torch.dtype], prefix: str
) -> list[Path]:
    """blocks/block_i.safetensors in the checkpoint's dtypes and, with joint quantization, its grids; returns
    the files its record lists."""
    save_block(run.block_file(i), block.state_dict(), stored, prefix)
    files = [run.block_file(i)]
    grids = {f"{prefix}{name}": st.grid for name, st in stats.items() if st.grid is not None}
    if grids:
        save_grids(run.grid_file(i), grids)
        files.append(run.grid_file(i))
    return files


def _solve(
    cfg: PruneConfig,
    run: Run,
    i: int,
    block: torch.nn.Module,
    acts: ShardSet,
    kwargs: dict,
    sparsity: float,
    prefix: str,
    stored: dict[str, torch.dtype],
    fused: bool,
    forward: bool,
) -> tuple[torch.nn.Module, dict, bool]:
    """Prune block i's layers; return the block, its layer stats and whether acts/block_{i+1} was written.

    `--sequential` writes the next boundary from its own pass when ``forward`` asks for it; a block it
    cannot split is reloaded dense and pruned the default way. ``fused`` writes the dense block's
    outputs (dense-block targets) from the Hessians' pass.
    """

    def batches():
        return acts.iter_batches(cfg.runtime.batch_size, cfg.runtime.device, stop=cfg.calib.nsamples)

    def writer(path: Path) -> ShardWriter:
        return ShardWriter(path, run.dtype, acts.sample_shape, streams.SAMPLES_PER_SHARD)

    if cfg.solver.sequential:
        args = (block, batches(), kwargs, cfg.solver, sparsity, prefix, stored)
        forward = forward and cfg.windows == cfg.calib.nsamples
        try:
            if not forward:
                return block, prune_block_sequential(*args), False
            with writer(run.acts(i + 1)) as out:
                return block, prune_block_sequential(*args, outputs=out.add), True
        except NotSequential as e:
            log.warning("block %d: %s; it is pruned the default way (two passes)", i, e)
            block = load_block(run.model_dir, i, cfg.runtime.device, run.dtype, cfg.trust_remote_code)
    with writer(run.target(i)) if fused else nullcontext() as out:
        dense_outputs = out.add if fused else None
        stats = prune_block(block, batches, kwargs, cfg.solver, sparsity, prefix, dense_outputs=dense_outputs)
    return block, stats, False


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
    """Every block in order (`prune_one`; finished blocks return their records at once), or with
    `--nproc N` on N data-parallel ranks (`stages.prune.parallel`)."""
    if world_size(cfg) > 1:
        from stages.prune.parallel import prune_blocks_parallel

        return prune_blocks_parallel(cfg, run, sparsities)
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
