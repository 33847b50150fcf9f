"""Progressive prune-and-finetune rounds toward high sparsity, over one run directory.

Round k (target s_k of the schedule):

    prune   the previous round's model (round 1: the dense model) to s_k with SparseGPT,
            keeping every weight that is already zero (the mask only grows), with fresh
            calibration windows (seed + k - 1) run through the current model
    mask    the round's mask (True = pruned), bit-packed, from the pruned model's zeros
    finetune with the mask fixed, distilling from the dense teacher (stages.finetune)
    evaluate perplexity before and after fine-tuning
    record  rounds/round_KK/round.json, written last: the round is done

Run directory:
```
RUN_DIR/run.json                       the progressive config's identity (resume refuses another)
RUN_DIR/eval/dense-*.json              the dense model's perplexities, once
RUN_DIR/rounds/round_KK/prune/         a one-shot run directory; its model/ is the pruned model
RUN_DIR/rounds/round_KK/mask.safetensors  + mask.json (record)
RUN_DIR/rounds/round_KK/finetune/      the fine-tune's out_dir; its model/ is the round's model
RUN_DIR/rounds/round_KK/eval/          before/after perplexities
RUN_DIR/rounds/round_KK/round.json     the round's done-record (summary row + checksums)
RUN_DIR/summary.json, summary.md       one row per finished round
```
Every step returns at once when its own record verifies, so a killed run resumes
inside the round it was in: pruning per block, fine-tuning from its last checkpoint.
A call runs at most `rounds_per_run` rounds (a scheduled deployment advances the
schedule a little per run) and reports when nothing is left to do.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sparsegpt import check_sparsity
from stages.config import PruneConfig, parse_nm
from stages.data import parse_spec
from stages.evaluate import perplexity_cached, score_tasks
from stages.finetune_config import SCHEDULES, FinetuneConfig
from stages.models import resolve_model
from stages.task_formats import parse_task_specs
from stages.rundir import RunLock, atomic_path, atomic_write_json, init_run, sweep_tmp, verify_record, write_record

log = logging.getLogger("sparsegpt.progressive")
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
    """Calibration samples per block forward pass while pruning."""
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


# --- masks -------------------------------------------------------------------------------------


def write_mask(path: Path, model_dir: Path, trust_remote_code: bool = False) -> dict:
    """Bit-pack the pruned positions (weight == 0) of every prunable block linear of a checkpoint.

    Keys and shapes are the checkpoint's own (GPT-2's Conv1D weights stay (in, out)).
    Reads one tensor at a time, never the whole model; returns
    ``{"pruned": int, "total": int, "sparsity": float}``.
    """
    from stages.blocks import skeleton
    from stages.models import SafetensorsIndex

    sk = skeleton(model_dir, trust_remote_code)
    index = SafetensorsIndex.open(model_dir)
    names = [f"{sk.block_prefix(i)}{name}.weight" for i in range(sk.num_blocks) for name in sk.layer_names[i]]
    packed, shapes, pruned, total = {}, {}, 0, 0
    for name in names:
        w = index.load([name])[name]
        mask = (w == 0).reshape(-1).numpy()
        packed[name] = torch.from_numpy(np.packbits(mask))
        shapes[name] = list(w.shape)
        pruned += int(mask.sum())
        total += mask.size
    with atomic_path(path) as tmp:
        save_file(packed, str(tmp), metadata={"shapes": json.dumps(shapes), "bits": "1 = pruned"})
    return {"pruned": pruned, "total": total, "sparsity": pruned / max(total, 1)}


def read_mask(path: Path) -> dict[str, torch.Tensor]:
    """The masks written by `write_mask`: bool tensors of each weight's shape, True = pruned."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        shapes = json.loads(f.metadata()["shapes"])
    packed = load_file(str(path))
    out = {}
    for name, shape in shapes.items():
        bits = np.unpackbits(packed[name].numpy(), count=math.prod(shape)).astype(bool)
        out[name] = torch.from_numpy(bits).reshape(shape)
    return out


# --- rounds ------------------------------------------------------------------------------------


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


def prepare(cfg: ProgressiveConfig) -> Path:
    """Resolve the dense model and create or check RUN_DIR/run.json; return the dense model's directory."""
    from stages.oneshot import versions

    dense = cfg.round_model(0)
    init_run(cfg.root(), cfg.identity(), versions())
    return dense


def mask_round(cfg: ProgressiveConfig, k: int, pruned_model: Path) -> dict:
    """Round k's mask from the pruned model's zeros (mask.safetensors + mask.json record)."""
    paths = RoundPaths(cfg.round_dir(k))
    done = verify_record(paths.mask_record)
    if done is not None:
        return done
    stats = write_mask(paths.mask, pruned_model, cfg.trust_remote_code)
    return write_record(paths.mask_record, stats, [paths.mask])


def finetune_round(
    cfg: ProgressiveConfig, k: int, teacher: Path, on_step: Callable[[int, int, dict], None] | None = None
) -> dict:
    """Fine-tune round k's pruned model with its mask fixed (resumes from the last checkpoint)."""
    from stages.finetune import finetune

    paths = RoundPaths(cfg.round_dir(k))
    if not cfg.tokens_per_round:
        return {"tokens": 0, "seconds": 0.0, "steps": 0}
    fcfg = cfg.finetune_config(k)
    with tqdm(total=fcfg.total_steps, desc=f"round {k} finetune", unit="step", disable=not cfg.progress) as bar:

        def step(i: int, total: int, losses: dict) -> None:
            bar.n = i
            bar.set_postfix(loss=f"{losses['total']:.4f}", refresh=False)
            bar.refresh()
            if on_step is not None:
                on_step(i, total, losses)

        _share_tokens(cfg, fcfg, paths.finetune / "data" / "tokens.arrow", teacher)
        # The fine-tune keeps the student's zeros as its mask: exactly mask.safetensors, keyed by parameter name.
        return finetune(paths.prune / "model", teacher, paths.finetune, fcfg, on_step=step)


def _share_tokens(cfg: ProgressiveConfig, fcfg: FinetuneConfig, dst: Path, model_dir: Path) -> None:
    """Tokenize the fine-tuning data once per run (RUN_DIR/data/) and hard-link it into the round's fine-tune.

    `prepare_windows` reuses a token file whose metadata names the same SPEC and seqlen,
    so every round reads the same windows (in its own seeded order) without re-tokenizing.
    """
    import os

    from stages.finetune_data import prepare_windows
    from stages.models import load_tokenizer

    if dst.is_file():
        return
    shared = prepare_windows(load_tokenizer(model_dir, cfg.trust_remote_code), fcfg.dataset, fcfg.seqlen,
                             cfg.root() / "data" / f"finetune-s{fcfg.seqlen}.arrow")  # fmt: skip
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(shared, dst)
    except OSError:  # another file system: a copy through a temporary name
        with atomic_path(dst) as tmp:
            shutil.copyfile(shared, tmp)


def _eval_key(cfg: ProgressiveConfig, spec: str) -> tuple[str, str]:
    label = parse_spec(spec).label
    return label, f"{label}-s{cfg.eval_seqlen or cfg.seqlen}-w{cfg.eval_windows or 'all'}"


def _perplexities(cfg: ProgressiveConfig, model_dir: Path, folder: Path, tag: str, k: int) -> dict[str, dict]:
    from stages.oneshot import compute_dtype

    pcfg = cfg.prune_config(max(k, 1), model_dir)
    out = {}
    for spec in cfg.eval:
        label, key = _eval_key(cfg, spec)
        out[label] = perplexity_cached(
            model_dir, spec, cfg.eval_seqlen or cfg.seqlen, cfg.eval_windows, folder / f"{tag}-{key}.json",
            pcfg, compute_dtype(pcfg, model_dir), f"{tag} {label}",
        )  # fmt: skip
    return out


def dense_perplexity(cfg: ProgressiveConfig) -> dict[str, dict]:
    """The dense model's perplexity on every eval SPEC (cached in RUN_DIR/eval/)."""
    return _perplexities(cfg, cfg.round_model(0), cfg.root() / "eval", "dense", 0)


def evaluate_round(cfg: ProgressiveConfig, k: int) -> dict:
    """Perplexity of round k's model before and after fine-tuning (cached in rounds/round_k/eval/)."""
    paths = RoundPaths(cfg.round_dir(k))
    before = _perplexities(cfg, paths.prune / "model", paths.eval, "before", k)
    after = _perplexities(cfg, cfg.round_model(k), paths.eval, "after", k) if cfg.tokens_per_round else before
    return {"before": before, "after": after}


def finish_round(cfg: ProgressiveConfig, k: int, mask: dict, tuned: dict, evals: dict, seconds: dict) -> dict:
    """Write round k's record (last), drop its intermediate blocks and activations, update the summary."""
    paths = RoundPaths(cfg.round_dir(k))
    model = cfg.round_model(k)
    row = {
        "round": k,
        "target": target_of(cfg.schedule[k - 1]),
        "pattern": cfg.schedule[k - 1],
        "sparsity": mask["sparsity"],
        "ppl_before": {label: m["ppl"] for label, m in evals["before"].items()},
        "ppl_after": {label: m["ppl"] for label, m in evals["after"].items()},
        "tokens": int(tuned.get("tokens", 0)),
        "steps": int(tuned.get("steps", 0)),
        "final_loss": tuned.get("final_loss"),
        "seconds": sum(seconds.values()),
        "stage_seconds": seconds,
        "model": str(model),
    }
    record = write_record(paths.record, row, [paths.mask, *sorted(p for p in model.iterdir() if p.is_file())])
    for sub in ("acts", "blocks"):  # the round's model is written; its block files and activations are not needed
        shutil.rmtree(paths.prune / sub, ignore_errors=True)
    write_summary(cfg)
    return record


def final_tasks(cfg: ProgressiveConfig, step: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Zero-shot task scores of the dense and the final model (RUN_DIR/eval/tasks-*.json), once the schedule is complete."""
    from stages.oneshot import compute_dtype

    if not cfg.tasks or round_done(cfg, cfg.rounds) is None:
        return {}
    pcfg = cfg.prune_config(cfg.rounds)
    out: dict[str, dict] = {}
    for which, model_dir in (("dense", cfg.round_model(0)), ("final", cfg.round_model(cfg.rounds))):
        n = cfg.task_limit or "all"
        scores = score_tasks(
            model_dir, list(cfg.tasks), cfg.task_limit, device=cfg.device, dtype=compute_dtype(pcfg, model_dir),
            batch_size=cfg.eval_batch_size, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress,
            cache=lambda name, which=which: cfg.root() / "eval" / f"tasks-{which}-{name}-n{n}.json",
            step=(lambda name, which=which: step(f"{which} {name}")) if step is not None else None,
        )  # fmt: skip
        for name, res in scores.items():
            out.setdefault(name, {})[which] = res
    return out


def summary(cfg: ProgressiveConfig) -> dict:
    """Dense perplexities and one row per finished round, in schedule order."""
    dense = {}
    for spec in cfg.eval:
        label, key = _eval_key(cfg, spec)
        rec = verify_record(cfg.root() / "eval" / f"dense-{key}.json")
        if rec is not None:
            dense[label] = {k: rec[k] for k in ("ppl", "windows", "seqlen")}
    rounds = []
    for k in range(1, cfg.rounds + 1):
        rec = round_done(cfg, k)
        if rec is not None:
            rounds.append({key: v for key, v in rec.items() if key != "files"})
    tasks: dict[str, dict] = {}
    for name in (t.name for t in parse_task_specs(cfg.tasks)):
        for which in ("dense", "final"):
            rec = verify_record(cfg.root() / "eval" / f"tasks-{which}-{name}-n{cfg.task_limit or 'all'}.json")
            if rec is not None:
                tasks.setdefault(name, {})[which] = {k: v for k, v in rec.items() if k != "files"}
    return {"schedule": list(cfg.schedule), "dense": dense, "rounds": rounds, "complete": len(rounds) == cfg.rounds,
            "tasks": tasks}


def summary_markdown(s: dict) -> str:
    """The round-by-round table: target, achieved sparsity, perplexity before/after fine-tuning, tokens, time."""
    labels = list(s["dense"]) or sorted({label for r in s["rounds"] for label in r["ppl_after"]})
    head = ["round", "target", "sparsity"] + [f"{lab} ppl before -> after FT" for lab in labels] + ["tokens", "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if s["dense"]:
        lines.append("| dense | 0 | 0 | " + " | ".join(f"{s['dense'][lab]['ppl']:.2f}" for lab in labels) + " | | |")
    for r in s["rounds"]:
        cells = [f"{r['ppl_before'][lab]:.2f} -> {r['ppl_after'][lab]:.2f}" for lab in labels]
        lines.append(f"| {r['round']} | {r['pattern']} | {r['sparsity']:.4f} | " + " | ".join(cells)
                     + f" | {r['tokens']} | {r['seconds']:.0f} s |")
    if s.get("tasks"):
        lines += ["", "| task | items | metric | dense | final |", "|---|---|---|---|---|"]
        for name, m in s["tasks"].items():
            if "dense" in m and "final" in m:
                lines += [f"| {name} | {m['final']['n']} | {k} | {m['dense'][k]:.4f} | {m['final'][k]:.4f} |"
                          for k in ("acc", "acc_norm", "ppl") if k in m["final"]]
    done = len(s["rounds"])
    lines.append(f"\n{done} of {len(s['schedule'])} rounds done" + (" (schedule complete)" if s["complete"] else ""))
    return "\n".join(lines)


def write_summary(cfg: ProgressiveConfig) -> dict:
    s = summary(cfg)
    atomic_write_json(cfg.root() / "summary.json", s)
    with atomic_path(cfg.root() / "summary.md") as tmp:
        tmp.write_text(summary_markdown(s) + "\n", encoding="utf-8")
    return s


@dataclass
class Progress:
    """What one call did: the rounds it finished and whether any are left."""

    done_now: list[int] = field(default_factory=list)
    remaining: int = 0
    message: str = ""
    summary: dict = field(default_factory=dict)


def rounds_to_run(cfg: ProgressiveConfig) -> list[int]:
    """The rounds this call runs: from the first unfinished one, at most ``rounds_per_run``."""
    first = first_unfinished(cfg)
    if first is None:
        return []
    last = cfg.rounds if cfg.rounds_per_run is None else min(cfg.rounds, first + cfg.rounds_per_run - 1)
    return list(range(first, last + 1))


def progress_message(cfg: ProgressiveConfig, done_now: list[int]) -> str:
    left = cfg.rounds - sum(round_done(cfg, k) is not None for k in range(1, cfg.rounds + 1))
    if not done_now:
        return f"schedule complete: all {cfg.rounds} rounds of {cfg.run_dir} are done; nothing to do"
    span = f"round {done_now[0]}" if len(done_now) == 1 else f"rounds {done_now[0]}-{done_now[-1]}"
    return f"finished {span} of {cfg.rounds}; " + (f"{left} left, run again to continue" if left else "schedule complete")


def _run_pipeline(pcfg: PruneConfig) -> object:
    from stages.oneshot import run_pipeline

    return run_pipeline(pcfg)


@dataclass(frozen=True)
class RoundSteps:
    """How each step of a round runs: plain stage functions, or the Prefect flow's tasks wrapping them."""

    prune: Callable[[PruneConfig], object] = _run_pipeline
    mask: Callable[[ProgressiveConfig, int, Path], dict] = mask_round
    finetune: Callable[[ProgressiveConfig, int, Path], dict] = finetune_round
    evaluate: Callable[[ProgressiveConfig, int], dict] = evaluate_round


def run_round(cfg: ProgressiveConfig, k: int, dense: Path, steps: RoundSteps = RoundSteps()) -> dict:
    """Every step of round k in order (each skips when its record verifies); return the round's record."""
    done = round_done(cfg, k)
    if done is not None:
        return done
    if k > 1 and round_done(cfg, k - 1) is None:
        raise RuntimeError(f"round {k - 1} is not finished; rounds run in order")
    previous = cfg.round_model(k - 1) if k > 1 else dense
    seconds = {}
    t = time.perf_counter()
    steps.prune(cfg.prune_config(k, previous))
    mask = steps.mask(cfg, k, RoundPaths(cfg.round_dir(k)).prune / "model")
    seconds["prune"] = time.perf_counter() - t
    log.info("round %d: pruned to %.4f (target %s)", k, mask["sparsity"], cfg.schedule[k - 1])
    t = time.perf_counter()
    tuned = steps.finetune(cfg, k, dense)
    seconds["finetune"] = time.perf_counter() - t
    t = time.perf_counter()
    evals = steps.evaluate(cfg, k)
    seconds["evaluate"] = time.perf_counter() - t
    return finish_round(cfg, k, mask, tuned, evals, seconds)


def run_progressive(cfg: ProgressiveConfig) -> Progress:
    """Advance the schedule by at most ``rounds_per_run`` rounds, without Prefect (the flow does the same)."""
    with RunLock(cfg.run_dir):
        sweep_tmp(cfg.run_dir)
        dense = prepare(cfg)
        todo = rounds_to_run(cfg)
        if todo:
            dense_perplexity(cfg)
        for k in todo:
            run_round(cfg, k, dense)
        final_tasks(cfg)
        s = write_summary(cfg)
    return Progress(done_now=todo, remaining=cfg.rounds - len(s["rounds"]), message=progress_message(cfg, todo), summary=s)
