"""Where a progressive round keeps its outputs, and whether it is done (its record verifies)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from stages.data.specs import parse_spec
from stages.progressive.config import ProgressiveConfig
from stages.run.rundir import verify_record


@dataclass
class RoundPaths:
    root: Path

    @property
    def prune(self) -> Path:
        return self.root / "prune"

    @property
    def mask(self) -> Path:
        return self.root / "mask.safetensors"

    @property
    def mask_record(self) -> Path:
        return self.root / "mask.json"

    @property
    def finetune(self) -> Path:
        return self.root / "finetune"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def record(self) -> Path:
        return self.root / "round.json"


def round_done(cfg: ProgressiveConfig, k: int) -> dict | None:
    return verify_record(RoundPaths(cfg.round_dir(k)).record, quick=True)


def first_unfinished(cfg: ProgressiveConfig) -> int | None:
    """The first round whose record does not verify (1-based), or None when the schedule is complete."""
    return next((k for k in range(1, cfg.rounds + 1) if round_done(cfg, k) is None), None)


def eval_key(cfg: ProgressiveConfig, spec: str) -> tuple[str, str]:
    """(label, file key) of an evaluation SPEC: the key names seqlen and windows, so other settings get other files."""
    label = parse_spec(spec).label
    return label, f"{label}-s{cfg.eval_seqlen}-w{cfg.eval.windows or 'all'}"
