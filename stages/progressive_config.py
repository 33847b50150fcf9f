"""Typed configuration of a progressive run: the schedule of rounds and each round's prune and fine-tune settings.

`ProgressiveConfig` is what the CLI builds, the Prefect flow takes as its parameter and
`run.json` pins; `prune_config(k)` and `finetune_config(k)` derive round k's
`PruneConfig` and `FinetuneConfig` from it, so every round is checked before any work.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sparsegpt import check_sparsity
from stages.config import PruneConfig, parse_nm
from stages.data import parse_spec
from stages.finetune_config import SCHEDULES, FinetuneConfig
from stages.models import resolve_model
from stages.task_formats import parse_task_specs

DISTILL = ("kl", "squarehead")
NOT_IDENTITY = (
    "run_dir", "rounds_per_run", "eval", "eval_seqlen", "eval_windows", "eval_batch_size", "tasks", "task_limit",
    "device", "batch_size", "keep_acts", "progress", "checkpoint_every",
)  # fmt: skip


def parse_schedule(entries: tuple[str | float, ...] | str) -> tuple[str, ...]:
    """``"0.5,0.6"`` or ``[0.5, "0.6"]`` -> ``("0.5", "0.6")``; N:M entries (``"2:8,4:8"``) stay patterns.

    Targets must rise round by round. N:M rounds may only follow N:M rounds of the
    same M (a mask that only grows keeps its groups), and then every round is N:M.
    """
    items = entries.split(",") if isinstance(entries, str) else list(entries)
    out: list[str] = []
    for item in items:
        text = str(item).strip()
        if not text:
            continue
        if ":" in text:
            n, m = parse_nm(text)
            out.append(f"{n}:{m}")
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"schedule entry {text!r} is neither a sparsity like 0.7 nor an N:M pattern like 2:4") from None
            check_sparsity(value)
            out.append(repr(value))
    if not out:
        raise ValueError("the schedule is empty; give rising targets such as --schedule 0.5,0.6,0.7,0.8")
    kinds = {":" in t for t in out}
    if len(kinds) > 1:
        raise ValueError(f"schedule {','.join(out)} mixes sparsities and N:M patterns; use one kind, e.g. 1:4,2:4")
    targets = [target_of(t) for t in out]
    if any(b <= a for a, b in zip(targets, targets[1:])):
        raise ValueError(f"schedule targets must rise round by round (the mask only grows), got {','.join(out)}")
    if ":" in out[0] and len({parse_nm(t)[1] for t in out}) > 1:
        raise ValueError(f"N:M rounds must share one M so that groups stay aligned, got {','.join(out)}")
    return tuple(out)


def target_of(entry: str) -> float:
    """The fraction of weights a schedule entry prunes (N/M for a pattern)."""
    if ":" in entry:
        n, m = parse_nm(entry)
        return n / m
    return float(entry)


@dataclass(frozen=True)
class ProgressiveConfig:
    """A progressive run: a schedule of rounds, each pruning further and fine-tuning with the mask fixed."""

    model: str = "smollm2-135m"
    """The dense model: local HF directory, hub id, or ``smollm2-135m``; also the distillation teacher."""
    run_dir: str = "runs/progressive"
    """Where every round's outputs and checkpoints live."""
    schedule: tuple[str | float, ...] = ("0.5", "0.6", "0.7", "0.8")
    """Rising per-round targets: sparsities, or N:M patterns of one M (``1:4,2:4``)."""
    calib: str = "pydoc"
    """Calibration SPEC of every round's pruning."""
    nsamples: int = 128
    """Calibration windows per round."""
    seqlen: int = 2048
    """Tokens per calibration window (and the default fine-tuning window)."""
    seed: int = 0
    """Round k samples its calibration windows with seed + k - 1."""
    blocksize: int = 128
    """Columns per block of the SparseGPT solve."""
    percdamp: float = 0.01
    """Dampening, as a fraction of the mean Hessian diagonal."""
    damp_retries: int = 3
    """Tenfold damping increases allowed before a singular Hessian fails."""
    finetune_data: str = "pydoc"
    """Fine-tuning dataset SPEC (``c4`` streams from the hub; ``c4=PATH``, ``text=PATH``, ``pydoc``, ...)."""
    tokens_per_round: int = 65536
    """Fine-tuning budget of each round in tokens; 0 prunes progressively without fine-tuning."""
    finetune_seqlen: int | None = None
    """Tokens per fine-tuning window; defaults to ``seqlen``."""
    micro_batch_size: int = 4
    """Windows per forward/backward pass."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak AdamW learning rate."""
    warmup_steps: int = 0
    """Linear warm-up steps of each round (capped at the round's steps)."""
    lr_schedule: str = "cosine"
    """Decay after warm-up: ``cosine`` or ``linear``."""
    min_lr_ratio: float = 0.1
    """Floor of the decay as a fraction of ``lr``."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices only)."""
    distill: tuple[str, ...] = ("kl",)
    """Distillation losses from the dense teacher: ``kl`` (logits) and/or ``squarehead`` (per block)."""
    lm_weight: float = 1.0
    """Weight of the next-token loss on the fine-tuning text."""
    temperature: float = 1.0
    """Temperature of the logits KL."""
    finetune_seed: int = 0
    """Round k fine-tunes with seed finetune_seed + k - 1 (its data order and initial RNG)."""
    checkpoint_every: int = 50
    """Fine-tuning checkpoint interval in optimizer steps."""
    autocast: str = "none"
    """``bf16``/``fp16`` mixed precision for fine-tuning on a GPU."""
    rounds_per_run: int | None = None
    """Advance at most this many rounds per call (scheduled runs); None runs to the end."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from the hub to run."""
    eval: tuple[str, ...] = ()
    """Evaluation SPECs, measured on the dense model once and on every round before/after fine-tuning."""
    eval_seqlen: int | None = None
    """Tokens per evaluation window; defaults to ``seqlen``."""
    eval_windows: int | None = None
    """Evaluate only the first N windows."""
    eval_batch_size: int = 4
    """Windows per forward pass during evaluation (and items per batch of task scoring)."""
    tasks: tuple[str, ...] = ()
    """Zero-shot task SPECs (``piqa=PATH``, ...), scored on the dense and the final model once the schedule is complete."""
    task_limit: int | None = None
    """Score only the first N items of every task."""
    device: str = "cpu"
    """``cpu`` or ``cuda``."""
    batch_size: int = 8
    """Calibration samples per block forward pass while pruning (see `PruneConfig.batch_size`)."""
    keep_acts: int = 2
    """Activation boundaries kept on disk while a round prunes."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        object.__setattr__(self, "distill", tuple(self.distill))
        object.__setattr__(self, "eval", tuple(self.eval))
        bad = [d for d in self.distill if d not in DISTILL]
        if bad:
            raise ValueError(f"unknown distillation loss {bad[0]!r}; choose from {', '.join(DISTILL)} (comma-separated)")
        if self.tokens_per_round < 0:
            raise ValueError(f"tokens_per_round must be >= 0 (0 = no fine-tuning), got {self.tokens_per_round}")
        if self.rounds_per_run is not None and self.rounds_per_run < 1:
            raise ValueError(f"rounds_per_run must be a positive integer (or None for all), got {self.rounds_per_run}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {self.lr_schedule!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        for k in range(1, len(self.schedule) + 1):  # every round's settings are checked before any work
            self.prune_config(k)
        if self.tokens_per_round:
            self.finetune_config(1)
        for spec in self.eval:
            parse_spec(spec)
        object.__setattr__(self, "tasks", tuple(self.tasks))
        parse_task_specs(self.tasks)
        if self.task_limit is not None and self.task_limit < 1:
            raise ValueError(f"task_limit must be a positive integer, got {self.task_limit}")

    @property
    def rounds(self) -> int:
        return len(self.schedule)

    def root(self) -> Path:
        return Path(self.run_dir)

    def round_dir(self, k: int) -> Path:
        return self.root() / "rounds" / f"round_{k:02d}"

    def round_model(self, k: int) -> Path:
        """The model a finished round k hands on (round 0: the dense model's directory)."""
        if k == 0:
            return resolve_model(self.model, trust_remote_code=self.trust_remote_code)
        sub = "finetune" if self.tokens_per_round else "prune"
        return self.round_dir(k) / sub / "model"

    def prune_config(self, k: int, previous: Path | None = None) -> PruneConfig:
        """Round k's one-shot pruning of ``previous`` (the last round's model) into rounds/round_k/prune."""
        entry = self.schedule[k - 1]
        nm = entry if ":" in entry else None
        return PruneConfig(
            model=str(previous) if previous is not None else self.model, run_dir=str(self.round_dir(k) / "prune"),
            method="sparsegpt", sparsity=0.5 if nm else float(entry), nm=nm, calib=self.calib, nsamples=self.nsamples,
            seqlen=self.seqlen, seed=self.seed + k - 1, blocksize=self.blocksize, percdamp=self.percdamp,
            damp_retries=self.damp_retries, trust_remote_code=self.trust_remote_code, eval=(),
            eval_seqlen=self.eval_seqlen, eval_windows=self.eval_windows, eval_batch_size=self.eval_batch_size,
            device=self.device, batch_size=self.batch_size, keep_acts=self.keep_acts, progress=self.progress,
            keep_pruned=k > 1,
        )  # fmt: skip

    def finetune_config(self, k: int) -> FinetuneConfig:
        """Round k's fine-tune (budget ``tokens_per_round``, seed finetune_seed + k - 1)."""
        cfg = FinetuneConfig(
            dataset=self.finetune_data, tokens=max(self.tokens_per_round, 1), seqlen=self.finetune_seqlen or self.seqlen,
            micro_batch_size=self.micro_batch_size, grad_accum=self.grad_accum, lr=self.lr, schedule=self.lr_schedule,
            min_lr_ratio=self.min_lr_ratio, weight_decay=self.weight_decay, lm=self.lm_weight,
            kl=1.0 if "kl" in self.distill else 0.0, squarehead=1.0 if "squarehead" in self.distill else 0.0,
            temperature=self.temperature, seed=self.finetune_seed + k - 1, checkpoint_every=self.checkpoint_every,
            device=self.device, autocast=self.autocast, trust_remote_code=self.trust_remote_code,
        )  # fmt: skip
        return replace(cfg, warmup_steps=min(self.warmup_steps, cfg.total_steps))

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in NOT_IDENTITY}

    def to_dict(self) -> dict:
        return asdict(self)
