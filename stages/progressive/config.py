"""Typed configuration of a progressive run: the schedule of rounds and the parts every round uses.

`ProgressiveConfig` is what the CLI builds (options generated from its fields), the
Prefect flow takes as its parameter and `run.json` pins. It is composed of the same
parts as a one-shot run (`CalibConfig`, `SolverConfig`, `EvalConfig`) plus a
`FinetuneConfig` and a `ProgressiveRuntime`; `prune_config(k)` and `finetune_config(k)`
are `replace()` calls on them for round k, checked for every round before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from sparsegpt.spec import check_sparsity
from stages.config import (
    CalibConfig,
    EvalConfig,
    PruneConfig,
    PruneRuntime,
    ReconstructConfig,
    SolverConfig,
    parse_nm,
)
from stages.config.tree import Tree, opt, part
from stages.finetune.config import FinetuneConfig, FinetuneRuntime, check_autocast

SOLVER_OPTIONS = ("blocksize", "percdamp", "damp_retries", "sequential", "kernel")
"""The solver leaves a progressive run exposes: every round prunes with SparseGPT, keeping earlier zeros."""
FINETUNE_OPTIONS = (
    "dataset",
    "tokens",
    "seqlen",
    "micro_batch_size",
    "grad_accum",
    "lr",
    "warmup_steps",
    "schedule",
    "min_lr_ratio",
    "weight_decay",
    "lm",
    "kl",
    "temperature",
    "squarehead",
    "seed",
    "autocast",
)
"""The fine-tune leaves a progressive run exposes (the budget is tokens per round)."""
RECONSTRUCT_OPTIONS = ("epochs", "lr", "target", "samples", "batch_size")
"""The reconstruction leaves a progressive run exposes (`--recovery` turns it on, the dense model is the teacher)."""
Recovery = Literal["distill", "reconstruct", "both"]
RECOVERIES = ("distill", "reconstruct", "both")


def round_dir(root: Path, k: int) -> Path:
    """Round k's folder inside a progressive run directory."""
    return Path(root) / "rounds" / f"round_{k:02d}"


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
                raise ValueError(
                    f"schedule entry {text!r} is neither a sparsity like 0.7 nor an N:M pattern like 2:4"
                ) from None
            check_sparsity(value)
            out.append(repr(value))
    if not out:
        raise ValueError("the schedule is empty; give rising targets such as --schedule 0.5,0.6,0.7,0.8")
    kinds = {":" in t for t in out}
    if len(kinds) > 1:
        raise ValueError(f"schedule {','.join(out)} mixes sparsities and N:M patterns; use one kind, e.g. 1:4,2:4")
    targets = [target_of(t) for t in out]
    if any(b <= a for a, b in zip(targets, targets[1:], strict=False)):
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
class ProgressiveRuntime(PruneRuntime, FinetuneRuntime):
    """Runtime settings of a progressive run (never part of its identity)."""

    checkpoint_every: int = 50
    """Fine-tuning checkpoint interval in optimizer steps; 0 writes none before the end."""
    nproc: int = 1
    """Ranks (torch.distributed, gloo on a CPU, nccl with one GPU each) of every round: its prune runs
    data-parallel (calibration windows split, Hessians all-reduced, solves split by cost) and its whole-model
    fine-tune runs sharded with FSDP2 (weights, gradients and AdamW state split by rows). Not part of the run's
    identity."""
    rounds_per_run: int | None = None
    """Advance at most this many rounds per call (scheduled runs); unset runs to the end."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rounds_per_run is not None and self.rounds_per_run < 1:
            raise ValueError(f"rounds_per_run must be a positive integer (or None for all), got {self.rounds_per_run}")


@dataclass(frozen=True)
class ProgressiveConfig(Tree):
    """A progressive run: a schedule of rounds, each pruning further and fine-tuning with the mask fixed."""

    model: str = opt("smollm2-135m", positional=True)
    """The dense model: local HF directory, hub id, or smollm2-135m; also the distillation teacher."""
    run_dir: str = opt("runs/progressive", required=True)
    """Run directory; rerun the same command to continue the schedule."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from the hub to run."""
    schedule: tuple[str | float, ...] = opt(("0.5", "0.6", "0.7", "0.8"), sep=",", metavar="TARGET")
    """Rising per-round targets: sparsities (0.5,0.6,0.7,0.8), or N:M patterns of one M (1:4,2:4)."""
    recovery: Recovery = "distill"
    """How each round recovers after its solve: distill (whole-model distillation from the dense model, the
    student, its teacher and Adam's state in memory), reconstruct (block-wise reconstruction toward the dense
    model inside the prune, one block in memory), or both (reconstruct, then distill)."""
    calib: CalibConfig = part(CalibConfig)
    solver: SolverConfig = part(SolverConfig, cli=SOLVER_OPTIONS)
    reconstruct: ReconstructConfig = part(ReconstructConfig, cli=RECONSTRUCT_OPTIONS)
    finetune: FinetuneConfig = part(FinetuneConfig, cli=FINETUNE_OPTIONS)
    eval: EvalConfig = part(EvalConfig, cli=("specs", "seqlen", "windows", "batch_size", "tasks", "task_limit"))
    runtime: ProgressiveRuntime = part(ProgressiveRuntime)

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", parse_schedule(self.schedule))
        if self.solver.method != "sparsegpt" or self.solver.wbits != 16 or self.solver.owl or self.solver.nm:
            raise ValueError(
                "progressive rounds prune with sparsegpt, unquantized, without OWL; targets come from "
                "--schedule (or --nm)"
            )
        if self.recovery not in RECOVERIES:
            raise ValueError(f"recovery must be one of {', '.join(RECOVERIES)}, got {self.recovery!r}")
        if self.reconstruct.enabled or self.reconstruct.teacher:
            raise ValueError("a progressive run reconstructs with --recovery reconstruct|both, toward its dense model")
        if self.finetune.steps is not None:
            raise ValueError("a progressive run's fine-tuning budget is --tokens-per-round, not a step count")
        check_autocast(self.finetune, self.runtime.device)
        for k in range(1, len(self.schedule) + 1):  # every round's settings are checked before any work
            self.prune_config(k)
            self.finetune_config(k)

    @property
    def rounds(self) -> int:
        return len(self.schedule)

    @property
    def finetunes(self) -> bool:
        """Whether rounds fine-tune at all (distillation recovery, tokens per round > 0)."""
        return self.recovery != "reconstruct" and bool(self.finetune.tokens)

    @property
    def reconstructs(self) -> bool:
        """Whether rounds reconstruct block by block inside their prune."""
        return self.recovery != "distill"

    def root(self) -> Path:
        return Path(self.run_dir)

    def round_dir(self, k: int) -> Path:
        return round_dir(self.root(), k)

    def round_model(self, k: int) -> Path:
        """The model a finished round k hands on (round 0: the dense model's directory)."""
        if k == 0:
            from stages.model.checkpoint import resolve_model

            return resolve_model(self.model, trust_remote_code=self.trust_remote_code)
        sub = "finetune" if self.finetunes else "prune"
        return self.round_dir(k) / sub / "model"

    def prune_config(self, k: int, previous: Path | None = None) -> PruneConfig:
        """Round k's one-shot pruning of ``previous`` (the last round's model) into rounds/round_k/prune."""
        entry = self.schedule[k - 1]
        nm = entry if ":" in entry else None
        solver = replace(self.solver, sparsity=0.5 if nm else float(entry), nm=nm, keep_pruned=k > 1)
        return PruneConfig(
            model=str(previous) if previous is not None else self.model,
            run_dir=str(self.round_dir(k) / "prune"),
            trust_remote_code=self.trust_remote_code,
            calib=replace(self.calib, seed=self.calib.seed + k - 1),
            solver=solver,
            reconstruct=replace(self.reconstruct, enabled=True, teacher=self.model)
            if self.reconstructs
            else self.reconstruct,
            eval=EvalConfig(seqlen=self.eval.seqlen, windows=self.eval.windows, batch_size=self.eval.batch_size),
            runtime=PruneRuntime(
                device=self.runtime.device,
                dtype=self.runtime.dtype,
                progress=self.runtime.progress,
                batch_size=self.runtime.batch_size,
                keep_acts=self.runtime.keep_acts,
                nproc=self.runtime.nproc,
                share_inputs=self.runtime.share_inputs,
            ),
        )

    def finetune_config(self, k: int) -> FinetuneConfig:
        """Round k's fine-tune: seed + k - 1, the calibration seqlen unless set, warm-up capped at its steps."""
        cfg = self.finetune
        seqlen = cfg.seqlen or self.calib.seqlen
        tokens = max(cfg.tokens, 1)  # a round without fine-tuning is still checked as one
        steps = math.ceil(tokens / (cfg.micro_batch_size * cfg.grad_accum * seqlen))
        return replace(
            cfg, seqlen=seqlen, seed=cfg.seed + k - 1, tokens=tokens, warmup_steps=min(cfg.warmup_steps, steps)
        )

    @property
    def eval_seqlen(self) -> int:
        return self.eval.seqlen or self.calib.seqlen

    @classmethod
    def legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """Older runs named their distillation losses (``distill: ["kl"]``) instead of weighting them."""
        if "distill" in flat:
            distill = flat.pop("distill")
            flat.update(kl_weight=float("kl" in distill), squarehead_weight=float("squarehead" in distill))
        return flat
