"""The fine-tune stage of a progressive round: train a pruned student with its mask fixed.

`finetune(student_dir, teacher_dir, out_dir, cfg)` loads the pruned student and the
dense teacher (`AutoModelForCausalLM`, safetensors only, fp32 master weights), takes
the sparsity mask of every prunable linear in the decoder blocks from the student's
zeros (or from `masks`), and trains with AdamW on a weighted sum of next-token CE,
logits KL to the teacher and SquareHead block MSE (`stages.finetune.loss`). Pruned
weights stay exactly zero at every step: their gradients are zeroed before the
optimizer step and the mask is re-applied after it. Data are fixed-length windows of
a dataset SPEC, tokenized once into `out_dir/data/tokens.arrow` (`stages.finetune.data`).

Layout of `out_dir`:
```
finetune_config.json   the run identity; a rerun with another config is refused
data/tokens.arrow      training windows
ckpt/step_XXXXXXXX/    resumable checkpoints (stages.finetune.ckpt), removed when done
model/                 the fine-tuned HF checkpoint (save_pretrained) + tokenizer
finetune.json          losses per step, tokens, time, sparsity; done-record, written last
```
A call on an `out_dir` with verified checkpoints resumes from the newest one and gives
bit-identical weights to an uninterrupted run (same device, fixed seed); a call on a
finished `out_dir` returns its record without training.
"""

import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from stages.finetune.ckpt import latest_checkpoint, load_checkpoint, save_checkpoint
from stages.finetune.config import FinetuneConfig, FinetuneRuntime, check_autocast
from stages.finetune.data import TokenWindows, prepare_windows
from stages.finetune.loss import Masks, derive_masks
from stages.finetune.train import Trainer, build_trainer, load_state_dict, state_dict, train_step
from stages.model.checkpoint import validate_model_dir
from stages.model.models import load_config, load_tokenizer, max_positions
from stages.run.identity import config_diff
from stages.run.rundir import atomic_write_json, fsync_dir, fsync_tree, verify_record, write_record

CONFIG_JSON = "finetune_config.json"
RESULT_JSON = "finetune.json"


def load_model(
    model_dir: Path, device: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM from safetensors (pickles are refused), on `device` in `dtype`."""
    model_dir = validate_model_dir(Path(model_dir), trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device)


def masks_digest(masks: Masks) -> str:
    """sha256 over the names, shapes and bits of `masks` (part of the run identity). Sharded masks (DTensors)
    are gathered one at a time, so every rank must call it."""
    h = hashlib.sha256()
    for name in sorted(masks):
        mask = masks[name].detach()
        mask = (mask.full_tensor() if hasattr(mask, "full_tensor") else mask).to("cpu")
        h.update(f"{name}:{tuple(mask.shape)};".encode())
        h.update(np.packbits(mask.numpy().reshape(-1)).tobytes())
    return h.hexdigest()


def identity(student_dir: Path, teacher_dir: Path | None, cfg: FinetuneConfig, digest: str) -> dict:
    """What `finetune_config.json` holds: the config, the student and teacher folders and the masks' digest."""
    config = cfg.to_dict()  # the runtime (device, checkpointing) is not part of it
    teacher = str(Path(teacher_dir).resolve()) if teacher_dir is not None else None
    return {"config": config, "student": str(Path(student_dir).resolve()), "teacher": teacher, "masks": digest}


def pin_identity(out_dir: Path, ident: dict) -> None:
    """Write the identity on a fresh out_dir; refuse an out_dir started with a different one."""
    path = out_dir / CONFIG_JSON
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        # Older out_dirs also stored trust_remote_code and the fine-tune's runtime fields; only today's fields count.
        old["config"] = {k: v for k, v in old.get("config", {}).items() if k in ident["config"]}
        diff = config_diff(old, ident)
        if diff:
            raise ValueError(
                f"{out_dir} holds a fine-tune with a different configuration ({'; '.join(diff[:5])}); "
                f"rerun with the same configuration to resume, or use a new out_dir"
            )
        return
    atomic_write_json(path, ident)


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each block's activations in the backward pass (non-reentrant: works with FSDP2 too)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers renamed it in 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (a fresh fine-tune starts here)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_seqlen(model: PreTrainedModel, cfg: FinetuneConfig) -> None:
    """Refuse an unset seqlen or one beyond the model's positions."""
    limit = max_positions(model.config)
    if cfg.seqlen is None:
        raise ValueError("the fine-tune's seqlen is unset; give seqlen (--finetune-seqlen)")
    if limit is not None and cfg.seqlen > limit:
        raise ValueError(f"seqlen={cfg.seqlen} exceeds the model's {limit} positions; set seqlen <= {limit}")


def check_teacher(teacher_dir: Path | None, cfg: FinetuneConfig) -> None:
    """Refuse a missing teacher when a distillation term needs one."""
    if cfg.needs_teacher and teacher_dir is None:
        raise ValueError(
            f"kl={cfg.kl} and squarehead={cfg.squarehead} need a dense teacher: pass teacher_dir, "
            f"or set kl=0 and squarehead=0 to train on the language-model loss alone"
        )


def _load_teacher(
    teacher_dir: Path | None, cfg: FinetuneConfig, device: str, trust_remote_code: bool
) -> PreTrainedModel | None:
    check_teacher(teacher_dir, cfg)
    if not cfg.needs_teacher:
        return None
    return load_model(teacher_dir, device, cfg.autocast_dtype or torch.float32, trust_remote_code)


def _checkpoint(tr: Trainer, out_dir: Path, seconds: float, keep: int) -> None:
    meta = {"step": tr.step, "position": tr.position, "seconds": seconds}
    save_checkpoint(out_dir / "ckpt", tr.student, state_dict(tr), tr.history, meta, keep)


def _sparsity(tr: Trainer) -> dict[str, float]:
    """Fraction of exact zeros in the masked parameters, overall and the mask's own fraction."""
    total = sum(m.numel() for m in tr.masks.values())
    zeros = sum(int((p == 0).sum()) for p in tr.masked.values())
    pruned = sum(int((~m).sum()) for m in tr.masks.values())
    return {"zeros": zeros / max(total, 1), "mask": pruned / max(total, 1)}


def result_payload(tr: Trainer, seconds: float, sparsity: dict[str, float]) -> dict:
    """What finetune.json holds besides its files' checksums."""
    return {
        "steps": tr.step,
        "tokens": tr.step * tr.cfg.tokens_per_step,
        "windows": tr.position,
        "seconds": seconds,
        "sparsity": sparsity,
        "final_loss": tr.history[-1]["total"] if tr.history else None,
        "losses": tr.history,
        "config": tr.cfg.to_dict(),
    }


def _finish(tr: Trainer, student_dir: Path, out_dir: Path, seconds: float, trust_remote_code: bool) -> dict:
    """Write model/ (original dtype) and tokenizer, then the finetune.json record; drop checkpoints."""
    sparsity = _sparsity(tr)
    tmp = out_dir / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = getattr(load_config(student_dir, trust_remote_code), "dtype", None)
    student = tr.student.to(dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32)
    student.save_pretrained(tmp)
    load_tokenizer(student_dir, trust_remote_code).save_pretrained(tmp)
    fsync_tree(tmp)
    final = out_dir / "model"
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_dir(out_dir)
    result = result_payload(tr, seconds, sparsity)
    write_record(out_dir / RESULT_JSON, result, sorted(p for p in final.rglob("*") if p.is_file()))
    shutil.rmtree(out_dir / "ckpt", ignore_errors=True)
    return result


def _resume(tr: Trainer, out_dir: Path) -> float:
    """Continue from the newest verified checkpoint; return the seconds already spent (0 if none)."""
    ckpt = latest_checkpoint(out_dir / "ckpt")
    if ckpt is None:
        seed_everything(tr.cfg.seed)
        return 0.0
    if ckpt.step > tr.cfg.total_steps:
        raise ValueError(f"checkpoint {ckpt.folder} is past the {tr.cfg.total_steps}-step budget; use a new out_dir")
    state, history = load_checkpoint(ckpt, tr.student)
    load_state_dict(tr, state)
    tr.step, tr.position, tr.history = ckpt.step, ckpt.position, history
    return ckpt.seconds


def finetune(
    student_dir: Path,
    teacher_dir: Path | None,
    out_dir: Path,
    cfg: FinetuneConfig,
    runtime: FinetuneRuntime | None = None,
    trust_remote_code: bool = False,
    masks: Masks | None = None,
    stop_after: int | None = None,
    on_step: Callable[[int, int, dict], None] | None = None,
) -> dict:
    """Fine-tune the student with its mask fixed; resume from out_dir/ckpt; return the finetune.json payload.

    `masks` (bool per parameter name, True = kept) default to the student's nonzero
    weights in every prunable linear of the decoder blocks; weights outside them are
    zeroed before the first step. `stop_after=k` returns after step k with a checkpoint
    written and `{"stopped_at": k}` (a time-boxed slice; call again to continue).
    `on_step(step, total_steps, losses)` is called after every optimizer step (progress bars).
    `runtime` (device, checkpoint interval) may change between a call and its resumption; `runtime.nproc > 1`
    trains on that many FSDP ranks (`stages.finetune.sharded`).
    """
    out_dir = Path(out_dir)
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1 or None, got {stop_after}")
    runtime = runtime or FinetuneRuntime()
    if runtime.nproc > 1:
        from stages.finetune.sharded import finetune_sharded

        if masks is not None:
            raise ValueError("sharded ranks take the masks from the student's zeros; pass masks=None with nproc > 1")
        return finetune_sharded(student_dir, teacher_dir, out_dir, cfg, runtime, trust_remote_code, stop_after, on_step)
    check_autocast(cfg, runtime.device)
    student = load_model(student_dir, runtime.device, trust_remote_code=trust_remote_code)
    check_seqlen(student, cfg)
    if runtime.gradient_checkpointing:
        enable_checkpointing(student)
    masks = derive_masks(student) if masks is None else masks
    pin_identity(out_dir, identity(student_dir, teacher_dir, cfg, masks_digest(masks)))
    done = verify_record(out_dir / RESULT_JSON, quick=True)
    if done is not None:
        return done
    tokenizer = load_tokenizer(student_dir, trust_remote_code)
    tokens = prepare_windows(tokenizer, cfg.dataset, cfg.seqlen, out_dir / "data" / "tokens.arrow")
    teacher = _load_teacher(teacher_dir, cfg, runtime.device, trust_remote_code)
    tr = build_trainer(cfg, student, teacher, masks, TokenWindows(tokens, cfg.seed))
    spent = _resume(tr, out_dir)
    save = lambda seconds: _checkpoint(tr, out_dir, seconds, runtime.keep_checkpoints)  # noqa: E731
    seconds = run_steps(tr, runtime, spent, stop_after, on_step, save)
    if tr.step < cfg.total_steps:
        return {"stopped_at": tr.step, "seconds": seconds, "losses": tr.history}
    return _finish(tr, student_dir, out_dir, seconds, trust_remote_code)


def run_steps(
    tr: Trainer,
    runtime: FinetuneRuntime,
    spent: float,
    stop_after: int | None,
    on_step: Callable[[int, int, dict], None] | None,
    save: Callable[[float], None],
) -> float:
    """Train up to the budget (or `stop_after`), `save(seconds)` every `checkpoint_every` steps and on a stop
    short of the budget; return the training seconds so far (`spent` included)."""
    total = tr.cfg.total_steps
    start = time.perf_counter()
    target = total if stop_after is None else min(stop_after, total)
    saved = tr.step
    while tr.step < target:
        train_step(tr)
        if on_step is not None:
            on_step(tr.step, total, tr.history[-1])
        every = runtime.checkpoint_every
        if every and tr.step % every == 0 and tr.step < total:
            save(spent + time.perf_counter() - start)
            saved = tr.step
    seconds = spent + time.perf_counter() - start
    if tr.step < total and saved != tr.step:
        save(seconds)
    return seconds
