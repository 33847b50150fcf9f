"""Spawning torch.distributed ranks on this machine and joining their process group.

`spawn_ranks(fn, args, world, poll)` starts `fn(rank, world, port, *args)` in `world`
spawned processes, calls `poll()` about once a second while they run (progress,
records appearing), and raises `RankFailed` naming the first failure when a rank dies or
raises (the others are terminated: a run directory written by records-last stays
resumable). `join_group(rank, world, port, device)` is what a rank calls first: it binds
its GPU (one per rank) and joins the group on gloo (CPU) or nccl (GPU). Used by the
data-parallel prune (`stages.prune.parallel`) and the sharded fine-tune (`stages.finetune.sharded`).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from stages.run.exit import exit_now

TIMEOUT = timedelta(hours=2)
"""How long a rank waits in a collective for the others (rank 0's calibration and capture under torchrun, a
boundary rebuilt after a crash); a rank that dies is noticed at once, not after this."""


class RankFailed(RuntimeError):
    """A spawned rank raised or died; `message` is its error's last line (e.g. "ValueError: ...")."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def reraise_value_error(self) -> None:
        """Raise a rank's `ValueError` (bad input found on a rank) as the one-line ValueError it was."""
        kind, _, text = self.message.partition(": ")
        if kind == "ValueError" and text:
            raise ValueError(text) from self


def free_port() -> int:
    """A free TCP port on the loopback interface (the spawned group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_device(device: str, local_rank: int) -> str:
    """This rank's device: its own GPU (`cuda:LOCAL_RANK`, made current) or the CPU."""
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        return f"cuda:{local_rank}"
    return "cpu"


def join_group(rank: int, world: int, port: int, device: str) -> str:
    """Join the spawned group at 127.0.0.1:`port` (nccl on a GPU, gloo on the CPU); return this rank's device.
    On a CPU the ranks share the machine's cores evenly."""
    device = rank_device(device, rank)
    if device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // world))
    backend = "nccl" if device != "cpu" else "gloo"
    address = f"tcp://127.0.0.1:{port}"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=world, timeout=TIMEOUT)
    return device


def end_rank() -> None:
    """End a spawned rank whose work is done and whose process group is destroyed: status 0, without the
    interpreter's teardown, in which torch's gloo teardown aborted the process now and then (SIGABRT: 3
    of 9 runs of tests/stages/finetune/test_sharded.py's two-rank test, 3 architectures each, on a 2-core
    CPU), failing a run whose results were written. A rank that raises exits the usual way."""
    exit_now(0)


def spawn_ranks(fn: Callable, args: tuple, world: int, poll: Callable[[], None] | None = None) -> None:
    """Run `fn(rank, world, port, *args)` on `world` spawned ranks and wait; `poll()` runs between checks.
    Raises `RankFailed` with the failing rank's last error line; the other ranks are terminated."""
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=(world, free_port(), *args), nprocs=world, join=False, start_method="spawn")
    try:
        finished = False
        while not finished:
            try:
                finished = ctx.join(timeout=1.0)
            except (mp.ProcessRaisedException, mp.ProcessExitedException) as exc:
                raise RankFailed(str(exc).strip().splitlines()[-1]) from exc
            if poll is not None:
                poll()
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
