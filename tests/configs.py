"""The one-shot config most tests start from: a tiny model, pydoc calibration of 6 x 32 tokens,
16-column solve blocks, no progress bars. Tests pass what they change as flat names."""

from pathlib import Path

from stages.config import PruneConfig


def tiny_prune(model_dir: Path, run_dir: Path, **flat: object) -> PruneConfig:
    base = dict(
        model=str(model_dir), run_dir=str(run_dir), calib="pydoc", nsamples=6, seqlen=32, blocksize=16, progress=False
    )
    return PruneConfig.of(**{**base, **flat})
