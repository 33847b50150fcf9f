"""What a progressive run refuses before any work: the model, its positions, the GPU, a run directory
holding another run, and an N:M round whose M does not divide a layer's width."""

from __future__ import annotations

from pathlib import Path

from stages.model.checkpoint import check_model
from stages.progressive.config import ProgressiveConfig
from stages.prune.check import check_nm_fits, check_nm_hidden
from stages.run.identity import check_run


def check(cfg: ProgressiveConfig) -> Path:
    """Refuse what the arguments, the dense model's config and the run directory show to be wrong; return
    the dense model's directory. Writes nothing."""
    seqlens = {"seqlen": cfg.calib.seqlen, "eval_seqlen": cfg.eval_seqlen, "finetune_seqlen": cfg.finetune.seqlen}
    model_dir, config = check_model(cfg.model, cfg.trust_remote_code, cfg.runtime.device, seqlens)
    check_run(cfg.root(), cfg.identity(), upgrade=ProgressiveConfig.upgrade)
    nm_rounds = [k for k in range(1, cfg.rounds + 1) if ":" in cfg.schedule[k - 1]]
    for k in nm_rounds:
        check_nm_hidden(cfg.prune_config(k), config)
    if nm_rounds:
        from stages.model.blocks import skeleton  # the meta-device model: transformers' modeling code

        sk = skeleton(model_dir, cfg.trust_remote_code)
        for k in nm_rounds:
            check_nm_fits(cfg.prune_config(k), sk)
    return model_dir
