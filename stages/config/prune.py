"""The configs of one-shot pruning and of evaluating any model, composed of the parts.

`PruneConfig` is the single description of a one-shot run: the CLI builds it from
options generated from its fields, the Prefect flow takes it as its typed parameter,
and `run.json` stores it. `EvaluateConfig` is the same for `sparsegpt eval`.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.config.parts import CalibConfig, EvalConfig, PruneRuntime, ReconstructConfig, RuntimeConfig, SolverConfig
from stages.config.tree import Tree, opt, part


@dataclass(frozen=True)
class PruneConfig(Tree):
    """A one-shot pruning run: model, calibration, solver, evaluation and runtime settings."""

    model: str = opt("smollm2-135m", positional=True)
    """Local HF directory (safetensors), hub id, or smollm2-135m (the embedded default)."""
    run_dir: str = opt("runs/default", required=True)
    """Run directory; rerun the same command to resume."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from the hub to run."""
    calib: CalibConfig = part(CalibConfig)
    solver: SolverConfig = part(SolverConfig)
    reconstruct: ReconstructConfig = part(ReconstructConfig)
    eval: EvalConfig = part(EvalConfig)
    runtime: PruneRuntime = part(PruneRuntime)

    def __post_init__(self) -> None:
        if self.reconstruct.enabled and self.solver.wbits != 16:
            raise ValueError("--reconstruct trains the weights off --wbits' quantization grid; drop one of the two")
        if self.solver.kernel == "triton" and not self.runtime.device.startswith("cuda"):
            raise ValueError("--kernel triton runs on a GPU: add --device cuda, or use --kernel torch")

    @property
    def eval_seqlen(self) -> int:
        """Tokens per evaluation window: `eval.seqlen`, else the calibration seqlen."""
        return self.eval.seqlen or self.calib.seqlen

    @property
    def windows(self) -> int:
        """Calibration windows drawn: `--nsamples`, or more when reconstruction asks for more."""
        extra = self.reconstruct.samples if self.reconstruct.enabled else None
        return max(self.calib.nsamples, extra or 0)


@dataclass(frozen=True)
class EvaluateConfig(Tree):
    """Perplexity and zero-shot scores of any checkpoint (`sparsegpt eval`)."""

    model: str = opt("smollm2-135m", positional=True)
    """Local HF directory (safetensors), hub id, or smollm2-135m (the embedded default)."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from the hub to run."""
    eval: EvalConfig = part(EvalConfig)
    runtime: RuntimeConfig = part(RuntimeConfig)

    def check(self) -> EvaluateConfig:
        """Refuse a request with nothing to evaluate (the default instance is one); return self."""
        if not self.eval:
            raise ValueError("nothing to evaluate: give at least one --eval SPEC or --tasks SPEC[,SPEC...]")
        return self

    @property
    def eval_seqlen(self) -> int:
        return self.eval.seqlen or 2048
