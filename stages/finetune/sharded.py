"""Sharded fine-tuning: the mask-preserving fine-tune on N torch.distributed ranks with FSDP2.

`finetune_sharded` is what `stages.finetune.finetune.finetune` runs when `runtime.nproc > 1`
(`sparsegpt progressive --nproc N` with whole-model distillation): it spawns the ranks on
this machine (gloo on a CPU, nccl with one GPU per rank), relays rank 0's per-step
progress and waits. Each rank loads the student (fp32 master weights) and the frozen dense
teacher sharded by rows (`stages.model.sharded`: one block's full tensors at most, beside
this rank's shards), takes the keep-mask from the student's zeros (sharded like the
weights), and trains its even slice of every step's windows (`stages.finetune.train`).
FSDP averages the gradients over ranks, the pruned weights' gradients are zeroed and the
mask re-applied after AdamW exactly as in one process, so the loss curve is one process's
within float rounding and the mask holds at every step.

`out_dir` has the one-process layout (the same `finetune_config.json` identity, so a
finished fine-tune is found whatever the rank count; `data/`, `model/`, `finetune.json`
with `ranks` and each rank's peak memory), except that checkpoints are distributed
(`stages.finetune.ckpt.save_sharded_checkpoint`). A SIGKILL of any rank stops the others;
the same call resumes from the newest checkpoint, bit-identically on the same rank count.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from stages.finetune.ckpt import HISTORY, latest_checkpoint, load_sharded_checkpoint, save_sharded_checkpoint
from stages.finetune.config import FinetuneConfig, FinetuneRuntime
from stages.finetune.data import TokenWindows, prepare_windows
from stages.finetune.finetune import (
    RESULT_JSON,
    check_seqlen,
    check_teacher,
    enable_checkpointing,
    identity,
    masks_digest,
    pin_identity,
    result_payload,
    run_steps,
    seed_everything,
)
from stages.finetune.loss import derive_masks
from stages.finetune.train import Trainer, build_trainer, load_state_dict, state_dict
from stages.model.models import load_tokenizer
from stages.model.sharded import load_sharded, save_sharded
from stages.run.memory import map_large_allocations
from stages.run.ranks import RankFailed, end_rank, join_group, spawn_ranks
from stages.run.rundir import RunError, verify_record, write_record


@dataclass(frozen=True)
class Job:
    """One sharded fine-tune, as every rank receives it."""

    student_dir: Path
    teacher_dir: Path | None
    out_dir: Path
    cfg: FinetuneConfig
    runtime: FinetuneRuntime
    trust_remote_code: bool
    stop_after: int | None


def check_sharded(cfg: FinetuneConfig, runtime: FinetuneRuntime, teacher_dir: Path | None) -> None:
    """Refuse what sharded ranks cannot run, before any rank starts."""
    nproc, windows = runtime.nproc, cfg.micro_batch_size * cfg.grad_accum
    check_teacher(teacher_dir, cfg)
    if windows < nproc:
        raise ValueError(
            f"--nproc {nproc} splits each step's {windows} windows (micro_batch_size x grad_accum) across the "
            f"ranks; give every step at least {nproc} windows, or use --nproc {windows}"
        )
    if cfg.autocast == "fp16":
        raise ValueError("autocast='fp16' (a loss scaler per process) is not run on sharded ranks; use bf16")
    if runtime.device.startswith("cuda"):
        if runtime.device != "cuda":
            raise ValueError(f"--nproc {nproc} gives each rank its own GPU: use --device cuda, not {runtime.device}")
        if nproc > torch.cuda.device_count():
            raise ValueError(f"--nproc {nproc} needs {nproc} GPUs, torch sees {torch.cuda.device_count()}")


def finetune_sharded(
    student_dir: Path,
    teacher_dir: Path | None,
    out_dir: Path,
    cfg: FinetuneConfig,
    runtime: FinetuneRuntime,
    trust_remote_code: bool = False,
    stop_after: int | None = None,
    on_step: Any = None,
) -> dict:
    """`finetune` on `runtime.nproc` spawned ranks; returns finetune.json's payload, or `{"stopped_at": k, ...}`
    after `stop_after` steps. A failed rank stops the others: `ValueError` for bad input found on a rank,
    `RunError` otherwise (the same call resumes)."""
    import torch.multiprocessing as mp

    check_sharded(cfg, runtime, teacher_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = teacher_dir and Path(teacher_dir)
    job = Job(Path(student_dir), teacher, out_dir, cfg, runtime, trust_remote_code, stop_after)
    progress = mp.get_context("spawn").SimpleQueue()

    def relay() -> None:
        while not progress.empty():
            step, total, losses = progress.get()
            if on_step is not None:
                on_step(step, total, losses)

    try:
        spawn_ranks(rank_main, (job, progress), runtime.nproc, relay)
    except RankFailed as exc:
        exc.reraise_value_error()
        raise RunError(
            f"a fine-tuning rank failed ({exc.message}); rerun the same command to resume from the last checkpoint"
        ) from exc
    relay()
    done = verify_record(out_dir / RESULT_JSON)
    if done is not None:
        return done
    ckpt = latest_checkpoint(out_dir / "ckpt")
    if ckpt is None:
        raise RunError(f"the fine-tuning ranks ended with neither {RESULT_JSON} nor a checkpoint in {out_dir}; rerun")
    history = json.loads((ckpt.folder / HISTORY).read_text(encoding="utf-8"))
    return {"stopped_at": ckpt.step, "seconds": ckpt.seconds, "losses": history}


def rank_main(rank: int, world: int, port: int, job: Job, progress: Any) -> None:
    """One spawned rank of the fine-tune."""
    logging.basicConfig(level=logging.WARNING)
    map_large_allocations()  # else the freed all-gather buffers pile up in the heap (0.9 GiB on SmolLM2)
    device = join_group(rank, world, port, job.runtime.device)
    start = peak_memory(device)["rss"]  # imports and the process group: what every process pays
    try:
        _train(job, rank, world, device, progress, start)
    finally:
        dist.destroy_process_group()
    end_rank()


def _train(job: Job, rank: int, world: int, device: str, progress: Any, start: int) -> None:
    cfg, runtime, out_dir = job.cfg, job.runtime, job.out_dir
    mesh = init_device_mesh(device.split(":")[0], (world,))
    student = load_sharded(job.student_dir, mesh, device, torch.float32, job.trust_remote_code)
    check_seqlen(student, cfg)
    if runtime.gradient_checkpointing:
        enable_checkpointing(student)
    masks = derive_masks(student)
    digest = masks_digest(masks)  # the same digest as one process's: a finished out_dir is found either way
    if rank == 0:
        pin_identity(out_dir, identity(job.student_dir, job.teacher_dir, cfg, digest))
    dist.barrier()
    if verify_record(out_dir / RESULT_JSON, quick=True) is not None:
        return
    tokenizer = load_tokenizer(job.student_dir, job.trust_remote_code)
    path = out_dir / "data" / "tokens.arrow"
    if rank == 0:
        prepare_windows(tokenizer, cfg.dataset, cfg.seqlen, path)
    dist.barrier()
    tokens = prepare_windows(tokenizer, cfg.dataset, cfg.seqlen, path)  # rank 0 wrote it: reused
    teacher = None
    if cfg.needs_teacher:
        dtype = cfg.autocast_dtype or torch.float32
        teacher = load_sharded(job.teacher_dir, mesh, device, dtype, job.trust_remote_code, trainable=False)
    tr = build_trainer(cfg, student, teacher, masks, TokenWindows(tokens, cfg.seed), (rank, world))
    spent = _resume(tr, out_dir)
    step = (lambda i, total, losses: progress.put((i, total, losses))) if rank == 0 else None

    def save(seconds: float) -> None:
        meta = {"step": tr.step, "position": tr.position, "seconds": seconds}
        train_state = state_dict(tr, optimizer=False)
        save_sharded_checkpoint(
            out_dir / "ckpt", tr.student, tr.optimizer, train_state, tr.history, meta, runtime.keep_checkpoints
        )

    seconds = run_steps(tr, runtime, spent, job.stop_after, step, save)
    if tr.step == cfg.total_steps:
        _finish(tr, job, seconds, start)


def _resume(tr: Trainer, out_dir: Path) -> float:
    """Continue from the newest verified checkpoint; return the seconds already spent (0 if none)."""
    ckpt = latest_checkpoint(out_dir / "ckpt")
    if ckpt is None:
        seed_everything(tr.cfg.seed + tr.rank)  # dropout draws differ across ranks
        return 0.0
    if ckpt.step > tr.cfg.total_steps:
        raise ValueError(f"checkpoint {ckpt.folder} is past the {tr.cfg.total_steps}-step budget; use a new out_dir")
    state, history = load_sharded_checkpoint(ckpt, tr.student, tr.optimizer)
    load_state_dict(tr, state)
    tr.step, tr.position, tr.history = ckpt.step, ckpt.position, history
    return ckpt.seconds


def _sparsity(tr: Trainer) -> dict[str, float]:
    """`stages.finetune.finetune._sparsity` over every rank's shards."""
    total = sum(m.numel() for m in tr.masks.values())  # global shapes
    counts = torch.zeros(2, dtype=torch.float64)
    for name, p in tr.masked.items():
        counts[0] += int((p.detach().to_local() == 0).sum())
        counts[1] += int((~tr.masks[name].to_local()).sum())
    dist.all_reduce(counts)
    return {"zeros": counts[0].item() / max(total, 1), "mask": counts[1].item() / max(total, 1)}


def peak_memory(device: str) -> dict[str, int]:
    """This process's peak resident set (bytes) and, on a GPU, its peak allocated GPU memory."""
    out = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if device.startswith("cuda"):
        out["cuda"] = torch.cuda.max_memory_allocated()
    return out


def _finish(tr: Trainer, job: Job, seconds: float, start: int) -> None:
    """Write model/ (the student's names and dtypes), then rank 0's finetune.json record (each rank's peaks, and
    its peak RSS before loading anything, `rss_start`); drop checkpoints."""
    out_dir = job.out_dir
    sparsity = _sparsity(tr)
    save_sharded(tr.student, job.student_dir, out_dir / "model", job.trust_remote_code)
    device = str(next(tr.student.parameters()).device)
    peaks: list[dict | None] = [None] * tr.world
    dist.all_gather_object(peaks, {**peak_memory(device), "rss_start": start})
    if tr.rank == 0:
        parameters = sum(p.numel() for p in tr.student.parameters())
        result = {**result_payload(tr, seconds, sparsity), "ranks": tr.world, "parameters": parameters, "peak": peaks}
        files = sorted(p for p in (out_dir / "model").rglob("*") if p.is_file())
        write_record(out_dir / RESULT_JSON, result, files)
        shutil.rmtree(out_dir / "ckpt", ignore_errors=True)
    dist.barrier()
