"""The one-shot config most tests start from: a tiny model, pydoc calibration of 6 x 32 tokens,
16-column solve blocks, no progress bars. Tests pass what they change as flat names. And the tensors a
finished run's model holds (`run_weights`), which tests compare across runs."""

from pathlib import Path

import torch
from safetensors.torch import load_file

from stages.config import PruneConfig


def tiny_prune(model_dir: Path, run_dir: Path, **flat: object) -> PruneConfig:
    base = dict(
        model=str(model_dir), run_dir=str(run_dir), calib="pydoc", nsamples=6, seqlen=32, blocksize=16, progress=False
    )
    return PruneConfig.of(**{**base, **flat})


def run_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of RUN_DIR/model, by name."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted((Path(run_dir) / "model").glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
