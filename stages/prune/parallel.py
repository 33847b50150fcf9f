"""Data-parallel pruning over torch.distributed ranks (`--nproc N`): one block at a time, every rank on it.

The calibration windows of a boundary are split across ranks in whole shards (`partition`),
so each rank reads its own shards of `acts/block_i` and writes its own of `acts/block_{i+1}`,
with the names and contents one process would give them. Per block: each rank runs the
dense block over its windows and accumulates its partial Hessians (one per distinct input);
one all-reduce of the sums (mean times count) and the counts gives every rank the same
Hessians; the layer solves are split across ranks by cost (`assign`: largest first, onto
the least loaded rank) and each solved weight is broadcast from its rank; every rank then
runs the pruned block over its windows. Rank 0 alone writes the boundary's manifest (over
every rank's shards), the block's files and its record, which is written last, exactly as
in one process: a run resumes at the first unfinished block with any number of ranks.

`prune_blocks_parallel` spawns the ranks on this machine (gloo on a CPU, nccl with one GPU
per rank) and waits; a rank that dies stops the others (`torch.multiprocessing`), and the
run directory stays resumable. Default mode only: `--sequential` and `--reconstruct` are
refused with `--nproc` (`stages.prune.check.check_ranks`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from stages.config import PruneConfig
from stages.model.blocks import (
    find_layers,
    get_weight,
    load_block,
    round_to_stored,
    run_block,
    set_weight,
    skeleton,
    stored_dtypes,
)
from stages.prune.oneshot import save_block_files
from stages.prune.pruning import LayerStats, SharedFactor, collect_hessians, prune_layer
from stages.prune.streams import SAMPLES_PER_SHARD, Run, ensure_acts, load_kwargs
from stages.run.memory import release_grown_memory
from stages.run.ranks import TIMEOUT, RankFailed, end_rank, join_group, rank_device, spawn_ranks
from stages.run.rundir import RunError, bytes_hashed, prune_old, verify_record, write_record
from stages.run.shards import ShardSet, ShardWriter, discard, read_shards, write_manifest
from stages.run.timing import timed
from stages.run.transfer import device_batches

log = logging.getLogger("sparsegpt.pipeline")


def partition(nsamples: int, world: int, per_shard: int = SAMPLES_PER_SHARD) -> list[tuple[int, int]]:
    """Each rank's windows ``[lo, hi)``: whole shards, as even as they split, in rank order."""
    shards = -(-nsamples // per_shard)
    if world > shards:
        raise ValueError(f"{world} ranks need {world} shards of {per_shard} windows, there are {shards}")
    cuts = [k * shards // world * per_shard for k in range(world)] + [nsamples]
    return [(min(cuts[r], nsamples), min(cuts[r + 1], nsamples)) for r in range(world)]


def solve_cost(layer: nn.Module, method: str) -> int:
    """A layer's solve cost in multiply-adds: out x in^2 for the OBS solve, out x in for the baselines."""
    out, inp = get_weight(layer).shape
    return out * inp * inp if method == "sparsegpt" else out * inp


def assign(costs: dict[str, int], world: int) -> dict[str, int]:
    """Layer -> rank: largest cost first, each onto the least loaded rank (ties: lower rank)."""
    load, owner = [0] * world, {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(world), key=lambda k: (load[k], k))
        owner[name] = r
        load[r] += costs[name]
    return owner


def all_reduce_hessians(H: dict[str, torch.Tensor], n: dict[str, int]) -> None:
    """Every rank's mean Hessians (over its n windows' tokens) into the mean over all ranks, in place."""
    for name in sorted(H):
        count = torch.tensor([float(n[name])], dtype=torch.float64, device=H[name].device)
        total = H[name] * n[name]
        dist.all_reduce(total)
        dist.all_reduce(count)
        H[name] = total / float(count)
        n[name] = int(count.item())


def broadcast_weight(layer: nn.Module, src: int) -> None:
    """The weight solved on rank ``src`` into every rank's layer (sent as bytes: any dtype, any backend)."""
    W = get_weight(layer).detach().contiguous()  # (out, in)
    dist.broadcast(W.view(torch.uint8), src=src)
    set_weight(layer, W)


@torch.no_grad()
def prune_block_ranks(
    block: nn.Module,
    batches: Callable[[], Iterator[torch.Tensor]],
    layer_kwargs: dict,
    cfg: PruneConfig,
    sparsity: float,
    prefix: str,
    seconds: dict[str, float],
) -> dict[str, LayerStats]:
    """`stages.prune.pruning.prune_block` on this rank's windows, with the Hessians all-reduced and the solves
    split across ranks; every rank returns the same weights in ``block`` and the same stats. This rank's wall
    time per part goes into ``seconds`` (hessians, all_reduce, solve, broadcast)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    layers = find_layers(block)
    with timed(seconds, "hessians"):  # the dense block's forward over this rank's windows
        collector = collect_hessians(block, layers, batches(), layer_kwargs)
    with timed(seconds, "all_reduce"):
        all_reduce_hessians(collector.H, collector.n)
    owner = assign({name: solve_cost(layer, cfg.solver.method) for name, layer in layers.items()}, world)
    factors = SharedFactor()  # this rank's consecutive layers that share a Hessian factor it once
    with timed(seconds, "solve"):
        mine = {
            name: prune_layer(layer, collector.hessian(name), cfg.solver, sparsity, f"{prefix}{name}", factors)
            for name, layer in layers.items()
            if owner[name] == rank
        }
    collector.H.clear()
    with timed(seconds, "broadcast"):  # includes waiting for the rank with the most solve work
        for name, layer in layers.items():
            broadcast_weight(layer, owner[name])
        gathered: list[dict[str, LayerStats] | None] = [None] * world
        dist.all_gather_object(gathered, mine)
    stats = {k: v for part in gathered for k, v in (part or {}).items()}
    return {name: stats[name] for name in layers}


def _rows(acts: ShardSet, lo: int, hi: int, batch_size: int, device: str) -> Iterator[torch.Tensor]:
    return device_batches((acts._rows(a, min(a + batch_size, hi)) for a in range(lo, hi, batch_size)), device)


def prune_one_ranks(cfg: PruneConfig, run: Run, i: int, sparsity: float, device: str) -> None:
    """Block i on every rank (all call it); rank 0 writes the next boundary's manifest, the block, its record."""
    rank, world = dist.get_rank(), dist.get_world_size()
    t0, h0, seconds = time.perf_counter(), bytes_hashed(), {}
    with timed(seconds, "read"):
        if rank == 0:
            ensure_acts(cfg, run, i)  # a boundary lost in a crash is rebuilt once, here
            discard(run.acts(i + 1))
        dist.barrier()
        acts = read_shards(run.acts(i), verify=rank == 0)
        lo, hi = partition(len(acts), world)[rank]
        kwargs, bs = load_kwargs(run), cfg.runtime.batch_size
        block = load_block(run.model_dir, i, device, run.dtype, cfg.trust_remote_code)
        stored = stored_dtypes(run.model_dir, i, cfg.trust_remote_code)
        prefix = skeleton(run.model_dir, cfg.trust_remote_code).block_prefix(i)
    solve_hi = min(hi, cfg.calib.nsamples)
    batches = lambda: _rows(acts, lo, solve_hi, bs, device)  # noqa: E731
    stats = prune_block_ranks(block, batches, kwargs, cfg, sparsity, prefix, seconds)
    round_to_stored(block, stored)  # the next block's inputs are what the saved block gives
    with timed(seconds, "forward"):  # the pruned block over this rank's windows, written as its shards
        writer = ShardWriter(run.acts(i + 1), acts.dtype, acts.sample_shape, SAMPLES_PER_SHARD, lo, discard=False)
        for x in _rows(acts, lo, hi, bs, device):
            writer.add(run_block(block, x, kwargs))
        shards: list[dict | None] = [None] * world
        dist.all_gather_object(shards, writer.close(manifest=False))
    if rank == 0:
        with timed(seconds, "write"):  # the boundary's manifest (hashing every shard once) and the block
            every = [s for part in shards for s in (part or {"shards": []})["shards"]]
            write_manifest(run.acts(i + 1), acts.dtype, acts.sample_shape, SAMPLES_PER_SHARD, every)
            files = save_block_files(run, i, block, stats, stored, prefix)
        payload = {
            "block": i,
            "seconds": time.perf_counter() - t0,
            "bytes_hashed": bytes_hashed() - h0 + sum(f.stat().st_size for f in files),
            "ranks": world,
            "rank0_seconds": seconds,  # where rank 0's time went (bench_parallel reads it)
            "layers": {k: v.record() for k, v in stats.items()},
        }
        write_record(run.block_record(i), payload, files)
        prune_old(run.root / "acts", "block_*", keep_last=cfg.runtime.keep_acts)
    del block
    release_grown_memory()
    dist.barrier()  # the record is written before any rank looks at the next block


Done = Callable[[int], None] | None


def _blocks(cfg: PruneConfig, run: Run, sparsities: list[float], device: str, done: Done) -> None:
    """Every unfinished block in order, on every rank of the current process group."""
    for i in range(run.num_blocks):
        if verify_record(run.block_record(i), quick=True) is None:
            prune_one_ranks(cfg, run, i, sparsities[i], device)
        if done is not None:
            done(i)


def rank_main(rank: int, world: int, port: int, cfg: PruneConfig, run: Run, sparsities: list[float]) -> None:
    """One spawned rank's whole prune: every unfinished block in order (`prune_blocks_parallel` spawns it)."""
    logging.basicConfig(level=logging.WARNING)
    device = join_group(rank, world, port, cfg.runtime.device)
    try:
        _blocks(cfg, run, sparsities, device, None)
    finally:
        dist.destroy_process_group()
    end_rank()


def launched() -> bool:
    """Whether this process is one rank of a `torchrun` launch (WORLD_SIZE > 1 in its environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _join_launch(cfg: PruneConfig) -> str:
    device = rank_device(cfg.runtime.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device != "cpu" else "gloo", init_method="env://", timeout=TIMEOUT)
    return device


def follow(cfg: PruneConfig) -> None:
    """A torchrun rank other than 0: join the group, take the run from rank 0 (which runs the flow, its checks,
    calibration and capture), prune every block with it, and leave. Writes nothing of its own but its shards."""
    device = _join_launch(cfg)
    try:
        got: list = [None]
        dist.broadcast_object_list(got, src=0)
        cfg, run, sparsities = got[0]
        _blocks(cfg, run, sparsities, device, None)
    finally:
        dist.destroy_process_group()


def _lead(cfg: PruneConfig, run: Run, sparsities: list[float], done: Callable[[int], None] | None) -> None:
    """Rank 0 of a torchrun launch: hand the run to the other ranks, then prune with them in this process."""
    device = _join_launch(cfg)
    try:
        dist.broadcast_object_list([(cfg, run, sparsities)], src=0)
        _blocks(cfg, run, sparsities, device, done)
    finally:
        dist.destroy_process_group()


def prune_blocks_parallel(
    cfg: PruneConfig, run: Run, sparsities: list[float], done: Callable[[int], None] | None = None
) -> list[dict]:
    """Spawn ``cfg.runtime.nproc`` ranks on this machine and wait for every block's record; ``done(i)`` is called
    as each block's record appears. A rank that fails stops the others and raises `RunError` (rerun to resume).
    Under torchrun (`launched`) this process is rank 0 of the launch's ranks and prunes with them instead."""
    world, seen = cfg.runtime.nproc, 0

    def advance() -> None:  # report every block whose record is there, in order
        nonlocal seen
        while seen < run.num_blocks and verify_record(run.block_record(seen), quick=True) is not None:
            if done is not None:
                done(seen)
            seen += 1

    if launched():  # torchrun started the ranks: this is rank 0 (the others run `follow`)
        _lead(cfg, run, sparsities, done)
        seen = run.num_blocks
    advance()
    if seen < run.num_blocks:
        try:
            spawn_ranks(rank_main, (cfg, run, sparsities), world, advance)
        except RankFailed as exc:
            raise RunError(
                f"a pruning rank failed ({exc.message}); rerun the same command to resume at the first unfinished block"
            ) from exc
    records = [verify_record(run.block_record(i)) for i in range(run.num_blocks)]
    missing = [i for i, r in enumerate(records) if r is None]
    if missing:
        raise RunError(f"blocks {missing[:5]} have no record after the ranks ended; rerun the same command")
    return records  # type: ignore[return-value]
