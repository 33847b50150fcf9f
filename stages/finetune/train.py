"""The training state and one optimizer step of the mask-preserving fine-tune.

`Trainer` holds what changes while training (student, optional frozen teacher, masks,
AdamW, its `LambdaLR` schedule, the fp16 gradient scaler, the data position and the
loss history); `build_trainer` wires it from loaded models and a `FinetuneConfig`, and
`train_step` runs one optimizer step: `grad_accum` micro-batches of forward (teacher
under no_grad), loss and backward, then masked gradients, clipping, AdamW, the mask
re-applied to the weights, and the schedule advanced. On sharded ranks (`rank`, `world`:
`stages.finetune.sharded`) each rank takes an even slice of the step's windows, in
micro-batches, each loss weighted by its share of the step's windows, and the logged
losses are summed over ranks: the same step as one process. `state_dict` / `load_state_dict`
give the training state a checkpoint stores. Used by `stages.finetune.finetune`.
"""

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from stages.finetune.ckpt import rng_state, set_rng_state
from stages.finetune.config import FinetuneConfig, lr_factor
from stages.finetune.data import TokenWindows
from stages.finetune.loss import (
    BlockOutputs,
    Masks,
    apply_masks,
    check_masks,
    distill_losses,
    mask_gradients,
)


@dataclass
class Trainer:
    """Mutable training state of one fine-tune (built by `build_trainer`)."""

    cfg: FinetuneConfig
    """The configuration."""
    student: nn.Module
    """The model being trained (fp32 master weights), in train mode."""
    teacher: nn.Module | None
    """The frozen dense teacher, in eval mode; None when no distillation term is on."""
    masks: Masks
    """Keep-masks by student parameter name (True = kept)."""
    masked: dict[str, nn.Parameter]
    """The student parameters the masks apply to."""
    data: TokenWindows
    """The training windows."""
    optimizer: torch.optim.AdamW
    """AdamW over the student's parameters."""
    scheduler: LambdaLR
    """Warmup + decay schedule (`lr_factor`)."""
    scaler: torch.amp.GradScaler
    """Loss scaler, enabled for fp16 autocast only."""
    position: int = 0
    """Data position: windows consumed so far."""
    step: int = 0
    """Optimizer steps done."""
    history: list[dict[str, float]] = field(default_factory=list)
    """Per step: step, lr, total and each active loss term, grad_norm (when clipping)."""
    captures: tuple[BlockOutputs, BlockOutputs] | None = None
    """Block-output hooks on (student, teacher) when squarehead is on."""
    rank: int = 0
    """This process's rank among the ranks that train the (sharded) student together."""
    world: int = 1
    """How many ranks train it (1: one process)."""


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only; norms, biases and other vectors get no weight decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_trainer(
    cfg: FinetuneConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    masks: Masks,
    data: TokenWindows,
    ranks: tuple[int, int] = (0, 1),
) -> Trainer:
    """Wire optimizer, schedule, scaler and hooks; zero the pruned weights once."""
    masks = {k: v.to(next(student.parameters()).device) for k, v in masks.items()}
    masked = check_masks(student, masks)
    apply_masks(masked, masks)
    student.train()
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(_param_groups(student, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scheduler = LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
    device_type = next(student.parameters()).device.type
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.autocast == "fp16")
    captures = None
    if cfg.squarehead > 0 and teacher is not None:
        captures = (BlockOutputs(student), BlockOutputs(teacher))
    return Trainer(
        cfg,
        student,
        teacher,
        masks,
        masked,
        data,
        optimizer,
        scheduler,
        scaler,
        captures=captures,
        rank=ranks[0],
        world=ranks[1],
    )


def _autocast(cfg: FinetuneConfig, device_type: str) -> Any:
    dtype = cfg.autocast_dtype
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def _forward(tr: Trainer, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Losses of one micro-batch (student with grad, teacher without)."""
    cfg = tr.cfg
    teacher_out = None
    if tr.teacher is not None:
        with torch.no_grad(), _autocast(cfg, ids.device.type):
            t_logits = tr.teacher(input_ids=ids, use_cache=False).logits
        t_blocks = tr.captures[1].take() if tr.captures else []
        teacher_out = (t_logits, t_blocks)
    with _autocast(cfg, ids.device.type):
        s_logits = tr.student(input_ids=ids, use_cache=False).logits
    s_blocks = tr.captures[0].take() if tr.captures else []
    weights = (cfg.lm, cfg.kl, cfg.squarehead)
    return distill_losses(weights, cfg.temperature, ids, (s_logits, s_blocks), teacher_out)


def micro_batches(cfg: FinetuneConfig, rank: int, world: int) -> list[tuple[int, int]]:
    """This rank's (offset, windows) micro-batches of one step: an even slice of the step's windows, in
    micro-batches of at most `micro_batch_size` (one process: the `grad_accum` micro-batches)."""
    per_step = cfg.micro_batch_size * cfg.grad_accum
    lo, hi = rank * per_step // world, (rank + 1) * per_step // world
    return [(a, min(a + cfg.micro_batch_size, hi) - a) for a in range(lo, hi, cfg.micro_batch_size)]


def _sum_over_ranks(sums: dict[str, float]) -> dict[str, float]:
    import torch.distributed as dist

    names = sorted(sums)
    total = torch.tensor([sums[n] for n in names], dtype=torch.float64)
    dist.all_reduce(total)
    return dict(zip(names, total.tolist(), strict=True))


def train_step(tr: Trainer) -> dict[str, float]:
    """One optimizer step over the step's windows; appends to and returns the history entry."""
    cfg = tr.cfg
    device = next(tr.student.parameters()).device
    lr = tr.optimizer.param_groups[0]["lr"]
    tr.optimizer.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    per_step = cfg.micro_batch_size * cfg.grad_accum
    for offset, n in micro_batches(cfg, tr.rank, tr.world):
        ids = tr.data.batch(tr.position + offset, n).to(device)  # (n, seqlen)
        terms = _forward(tr, ids)
        share = per_step / (n * tr.world)  # one process: grad_accum; sharded gradients are averaged over ranks
        tr.scaler.scale(terms["total"] / share).backward()
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) / (per_step / n)
    tr.position += per_step
    if tr.world > 1:
        sums = _sum_over_ranks(sums)
    tr.scaler.unscale_(tr.optimizer)
    mask_gradients(tr.masked, tr.masks)
    entry = {"step": tr.step + 1, "lr": lr, **sums}
    if cfg.max_grad_norm is not None:
        norm = torch.nn.utils.clip_grad_norm_(tr.student.parameters(), cfg.max_grad_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # a DTensor on sharded ranks
        entry["grad_norm"] = float(norm)
    tr.scaler.step(tr.optimizer)
    tr.scaler.update()
    apply_masks(tr.masked, tr.masks)
    tr.scheduler.step()
    tr.step += 1
    tr.history.append(entry)
    return entry


def state_dict(tr: Trainer, optimizer: bool = True) -> dict[str, Any]:
    """Optimizer (unless sharded ranks store it elsewhere), scheduler, scaler and RNG states (what `torch.save`
    writes into train_state.pt)."""
    state = {"scheduler": tr.scheduler.state_dict(), "scaler": tr.scaler.state_dict(), "rng": rng_state()}
    return {"optimizer": tr.optimizer.state_dict(), **state} if optimizer else state


def load_state_dict(tr: Trainer, state: dict[str, Any]) -> None:
    """Restore what `state_dict` returned (weights, and a sharded optimizer, are loaded separately)."""
    if "optimizer" in state:
        tr.optimizer.load_state_dict(state["optimizer"])
    tr.scheduler.load_state_dict(state["scheduler"])
    tr.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    apply_masks(tr.masked, tr.masks)
