"""Typed configuration of the mask-preserving fine-tune stage and its learning-rate schedule.

`FinetuneConfig` is what defines a fine-tune's result (its identity in
`finetune_config.json`): the training budget (optimizer steps or tokens), the data (a
dataset SPEC cut into windows of `seqlen` tokens), AdamW and its schedule (linear
warmup, then cosine or linear decay to a floor), the distillation weights
(language-model CE, logits KL to the dense teacher, SquareHead block MSE of Kurtic et
al. 2023) and mixed precision. `FinetuneRuntime` holds what may change on a resume:
the device and the checkpoint interval. Every check runs in `__post_init__` and raises
a `ValueError` that names the fix. Flat names (`tokens_per_round`, `lr_schedule`, ...)
are the options of `sparsegpt progressive`, where this config is a part. `lr_factor` is
the schedule as a pure function of the step, used through `torch.optim.lr_scheduler.LambdaLR`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal

from stages.config.parts import RuntimeConfig
from stages.config.tree import opt
from stages.data.specs import parse_spec

if TYPE_CHECKING:
    import torch

Schedule = Literal["cosine", "linear"]
Autocast = Literal["none", "bf16", "fp16"]
SCHEDULES = ("cosine", "linear")
AUTOCASTS = ("none", "bf16", "fp16")


@dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune a pruned student with its sparsity mask fixed."""

    dataset: str = opt("pydoc", flat="finetune_data")
    """Fine-tuning dataset SPEC (c4 streams from the hub; c4=PATH, text=PATH, pydoc, ...)."""
    steps: int | None = opt(None, flat="finetune_steps")
    """Optimizer steps to run; when set, it is the budget instead of tokens."""
    tokens: int = opt(65536, flat="tokens_per_round")
    """Token budget (a progressive run's, per round): steps = ceil(tokens / tokens per step); 0 means no
    fine-tuning (a progressive run that only prunes)."""
    seqlen: int | None = opt(None, flat="finetune_seqlen")
    """Tokens per training window (non-overlapping windows of the tokenized corpus); in a progressive run,
    unset means the calibration seqlen."""
    micro_batch_size: int = 4
    """Windows per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimizer step."""
    lr: float = 1e-4
    """Peak learning rate of AdamW."""
    warmup_steps: int = 0
    """Steps of linear warmup from lr/warmup_steps up to lr (a progressive round caps it at its steps)."""
    schedule: Schedule = opt("cosine", flat="lr_schedule")
    """Decay after warmup: cosine or linear, down to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of lr, in [0, 1]."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to matrices only (not norms, biases)."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this; unset disables clipping."""
    lm: float = opt(1.0, flat="lm_weight")
    """Weight of the next-token cross-entropy on the training text."""
    kl: float = opt(1.0, flat="kl_weight")
    """Weight of T^2 * KL(softmax(teacher/T) || softmax(student/T)) over every position (distillation from
    the dense model)."""
    temperature: float = 1.0
    """Distillation temperature T of the logits KL."""
    squarehead: float = opt(0.0, flat="squarehead_weight")
    """Weight of the SquareHead loss: sum over blocks of MSE(student, teacher) / mean(teacher^2)."""
    seed: int = opt(0, flat="finetune_seed")
    """Seeds torch, Python and NumPy and the data order (a progressive round k uses seed + k - 1)."""
    autocast: Autocast = "none"
    """Mixed precision on a GPU: bf16 or fp16 (with a gradient scaler); none on a CPU."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        self._check_budget()
        self._check_optimizer()
        self._check_losses()
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {AUTOCASTS}, got {self.autocast!r}")
        parse_spec(self.dataset)

    def _check_budget(self) -> None:
        for name, low in (("steps", 1), ("tokens", 0), ("seqlen", 2), ("micro_batch_size", 1), ("grad_accum", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        known = self.steps is not None or self.seqlen is not None  # else a progressive round sets seqlen, then checks
        if self.warmup_steps < 0 or (known and self.warmup_steps > self.total_steps):
            raise ValueError(
                f"warmup_steps must be in [0, total steps = {self.total_steps}], got {self.warmup_steps}; "
                f"lower warmup_steps or raise the budget"
            )

    def _check_optimizer(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1] (a fraction of lr), got {self.min_lr_ratio}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), e.g. (0.9, 0.95), got {self.betas}")
        if not self.eps > 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, or None to disable clipping, got {self.max_grad_norm}")

    def _check_losses(self) -> None:
        for name in ("lm", "kl", "squarehead"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"loss weight {name} must be a finite number >= 0, got {value}")
        if self.lm == self.kl == self.squarehead == 0:
            raise ValueError("all loss weights are 0: set lm, kl or squarehead to a positive weight")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (1.0 = plain softmax), got {self.temperature}")

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step: micro_batch_size * grad_accum * seqlen."""
        if self.seqlen is None:
            raise ValueError("finetune seqlen is unset; give --finetune-seqlen (or a calibration seqlen)")
        return self.micro_batch_size * self.grad_accum * self.seqlen

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole fine-tune (from `steps` or from the `tokens` budget)."""
        if self.steps is not None:
            return self.steps
        return math.ceil(self.tokens / self.tokens_per_step)

    @property
    def needs_teacher(self) -> bool:
        """Whether a dense teacher is needed (kl or squarehead weight > 0)."""
        return self.kl > 0 or self.squarehead > 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The autocast dtype, or None for full fp32."""
        import torch

        return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.autocast]

    def to_dict(self) -> dict:
        """Plain JSON-able dict (the identity stored in out_dir/finetune_config.json)."""
        out = asdict(self)
        out["betas"] = list(self.betas)
        return out


@dataclass(frozen=True)
class FinetuneRuntime(RuntimeConfig):
    """What may change when a fine-tune resumes: device, progress, checkpointing."""

    checkpoint_every: int = 100
    """Fine-tuning checkpoint interval in optimizer steps; 0 writes none before the end."""
    keep_checkpoints: int = 2
    """How many of the newest fine-tuning checkpoints to keep."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass instead of keeping them: activation memory of
    one block instead of all, about a third more compute, the same result."""
    nproc: int = 1
    """Ranks (torch.distributed, gloo on a CPU, nccl with one GPU each) that fine-tune together with FSDP2:
    weights, gradients and AdamW state sharded by rows, each step's windows split across ranks. Not part of
    the fine-tune's identity; a resume on the same count is bit-identical."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = only at the end), got {self.checkpoint_every}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")


def check_autocast(cfg: FinetuneConfig, device: str) -> None:
    """Refuse mixed precision on a CPU (it needs a GPU)."""
    if device.split(":")[0] == "cpu" and cfg.autocast != "none":
        raise ValueError(f"autocast={cfg.autocast!r} needs a GPU; on device 'cpu' set autocast='none'")


def lr_factor(step: int, cfg: FinetuneConfig) -> float:
    """Multiplier of `cfg.lr` at optimizer step `step` (0-based): warmup, then decay to the floor."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)
