"""What a progressive run refuses before any work: the model, its positions, the GPU, a run directory
holding another run, whole-model distillation that cannot fit the device(s), an N:M round whose M does
not divide a layer's width, and a `--nproc` its rounds' prunes or sharded fine-tunes cannot use."""

from __future__ import annotations

from pathlib import Path

from stages.model.checkpoint import check_model, parameter_count
from stages.progressive.config import ProgressiveConfig
from stages.prune.check import check_kernel, check_nm_fits, check_nm_hidden, check_ranks
from stages.run.identity import check_run
from stages.run.memory import device_bytes


def check(cfg: ProgressiveConfig) -> Path:
    """Refuse what the arguments, the dense model's config and the run directory show to be wrong; return
    the dense model's directory. Writes nothing."""
    seqlens = {"seqlen": cfg.calib.seqlen, "eval_seqlen": cfg.eval_seqlen, "finetune_seqlen": cfg.finetune.seqlen}
    if cfg.runtime.export == "compressed-tensors":
        raise ValueError(
            "--export compressed-tensors packs --wbits runs, and progressive rounds do not quantize;"
            " use --export hf or gguf"
        )
    model_dir, config = check_model(cfg.model, cfg.trust_remote_code, cfg.runtime.device, seqlens)
    check_run(cfg.root(), cfg.identity(), upgrade=ProgressiveConfig.upgrade)
    if cfg.finetunes:
        check_distill_fits(cfg, model_dir)
    check_ranks(cfg.prune_config(1))  # --nproc: the rounds' prunes run on data-parallel ranks
    check_kernel(cfg.prune_config(1))
    if cfg.finetunes and cfg.runtime.nproc > 1:  # ... and their fine-tunes on FSDP ranks
        from stages.finetune.sharded import check_sharded

        check_sharded(cfg.finetune_config(1), cfg.runtime, model_dir)
    nm_rounds = [k for k in range(1, cfg.rounds + 1) if ":" in cfg.schedule[k - 1]]
    for k in nm_rounds:
        check_nm_hidden(cfg.prune_config(k), config)
    if nm_rounds:
        from stages.model.blocks import skeleton  # the meta-device model: transformers' modeling code

        sk = skeleton(model_dir, cfg.trust_remote_code)
        for k in nm_rounds:
            check_nm_fits(cfg.prune_config(k), sk)
    return model_dir


DISTILL_BYTES_PER_PARAMETER = 20
"""What whole-model distillation holds per parameter at the least: the float32 student (4), its gradients
(4), Adam's two moments (8) and the teacher (4 in float32; activations come on top)."""


def check_distill_fits(cfg: ProgressiveConfig, model_dir: Path) -> None:
    """Refuse `--recovery distill|both` when the model's parameters alone, at `DISTILL_BYTES_PER_PARAMETER`,
    exceed the device's memory (counted from the safetensors headers, nothing loaded); with `--nproc N` on GPUs
    each holds a 1/N shard (on a CPU the ranks share the machine's memory)."""
    params = parameter_count(model_dir)
    shards = cfg.runtime.nproc if cfg.runtime.device.startswith("cuda") else 1
    need, have = params * DISTILL_BYTES_PER_PARAMETER / shards, device_bytes(cfg.runtime.device)
    if have is not None and need > have:
        per = f" in {shards} shards" if shards > 1 else ""
        raise ValueError(
            f"--recovery {cfg.recovery} distils the whole model: {params / 1e9:.2f}B parameters{per} need at least "
            f"{need / 2**30:.1f} GiB ({DISTILL_BYTES_PER_PARAMETER} bytes each: student, gradients, Adam, teacher) "
            f"and {cfg.runtime.device} has {have / 2**30:.1f} GiB; use --recovery reconstruct (one block in memory)"
            + (", or more GPUs (--nproc)" if cfg.runtime.device.startswith("cuda") else "")
        )
