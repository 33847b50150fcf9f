"""What `sparsegpt eval` refuses before any work: nothing to evaluate, the model, its positions, the GPU."""

from __future__ import annotations

from pathlib import Path

from stages.config import EvaluateConfig
from stages.model.checkpoint import check_model


def check(cfg: EvaluateConfig) -> Path:
    """Refuse a request with nothing to evaluate, a model that does not resolve, an evaluation window
    beyond the model's positions, a GPU that is not there; return the model's directory. Writes nothing."""
    cfg.check()
    model_dir, _ = check_model(cfg.model, cfg.trust_remote_code, cfg.runtime.device, {"eval_seqlen": cfg.eval_seqlen})
    return model_dir
