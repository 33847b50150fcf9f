"""Typed configuration of a one-shot pruning run.

`PruneConfig` is the single description of a run: the CLI builds it from options,
the Prefect flow takes it as its parameter, and `run.json` stores it. Fields listed
in `NOT_IDENTITY` (evaluation and execution settings) may change between a run and
its resumption; every other field is part of the run's identity.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from sparsegpt import QuantSpec, check_nm, check_sparsity
from stages.data import parse_spec
from stages.task_formats import parse_task_specs

METHODS = ("sparsegpt", "wanda", "magnitude")
NOT_IDENTITY = ("run_dir", "eval", "eval_seqlen", "eval_windows", "eval_batch_size", "tasks", "task_limit", "device",
                "keep_acts", "batch_size", "progress")


ADDED_LATER = {"keep_pruned": False}
"""Identity fields newer than some run directories, with the value those runs implicitly had."""


def parse_nm(text: str | None) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``; ``None`` or ``""`` -> ``(0, 0)`` (unstructured)."""
    if not text:
        return 0, 0
    try:
        n, m = (int(x) for x in text.split(":"))
    except ValueError:
        raise ValueError(f"N:M must look like 2:4 or 4:8, got {text!r}") from None
    check_nm(n, m, cols=m)
    return n, m


@dataclass(frozen=True)
class PruneConfig:
    """A one-shot pruning run: model, method, calibration, solver and evaluation settings."""

    model: str = "smollm2-135m"
    """Local HF directory (safetensors), hub id, or ``smollm2-135m`` (the embedded default)."""
    run_dir: str = "runs/default"
    """Where every output and checkpoint of the run lives."""
    method: str = "sparsegpt"
    """``sparsegpt``, ``wanda`` or ``magnitude``."""
    sparsity: float = 0.5
    """Unstructured target per linear layer, in [0, 1); ignored when ``nm`` is set."""
    nm: str | None = None
    """Semi-structured pattern such as ``2:4``; ``None`` for unstructured."""
    wbits: int = 16
    """Joint quantization to this many bits (2-8, SparseGPT only); 16 means none."""
    calib: str = "pydoc"
    """Calibration dataset SPEC (``wikitext2``, ``c4=PATH``, ``text=PATH``, ``pydoc``, ...)."""
    nsamples: int = 128
    """Calibration windows."""
    seqlen: int = 2048
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration sampling."""
    blocksize: int = 128
    """Columns per block of the SparseGPT solve."""
    percdamp: float = 0.01
    """Dampening, as a fraction of the mean Hessian diagonal."""
    damp_retries: int = 3
    """Tenfold damping increases allowed (each logged) before a singular Hessian fails."""
    owl: bool = False
    """Allocate per-layer sparsity with OWL instead of uniformly."""
    owl_lambda: float = 0.08
    """OWL's spread λ (layer sparsities span 2λ)."""
    owl_threshold: float = 5.0
    """OWL's outlier threshold M (scores above M × mean are outliers)."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from the hub to run."""
    eval: tuple[str, ...] = ()
    """Evaluation dataset SPECs; empty for none."""
    eval_seqlen: int | None = None
    """Tokens per evaluation window; defaults to ``seqlen``."""
    eval_windows: int | None = None
    """Evaluate only the first N windows (quick runs on a CPU)."""
    eval_batch_size: int = 4
    """Windows (perplexity) or task rows (zero-shot) per forward pass during evaluation."""
    tasks: tuple[str, ...] = ()
    """Zero-shot task SPECs (``piqa=PATH``, ``arc_easy=PATH``, ... or a bare hub NAME) scored on the
    dense and the pruned model; empty for none."""
    task_limit: int | None = None
    """Score only the first N items of each task (quick runs on a CPU)."""
    device: str = "cpu"
    """``cpu`` or ``cuda``: where blocks, Hessians and solves run."""
    batch_size: int = 8
    """Calibration samples per block forward pass, and per Hessian update, so it moves results in
    the last bits (SmolLM2 2:4: 83.28 at 8, 83.77 at 2). On a CPU, 2 runs as fast as 8 and holds a
    quarter of the forward's intermediates (SmolLM2, 512 tokens: +44 MiB instead of +162 MiB)."""
    keep_acts: int = 2
    """Activation boundaries kept on disk (older ones are deleted as the run proceeds)."""
    progress: bool = True
    """Show progress bars."""
    keep_pruned: bool = False
    """Weights that are exactly zero stay pruned and count toward the target (the mask only
    grows): how a progressive round prunes the previous round's sparse model. SparseGPT only."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_sparsity(self.sparsity)
        n, m = parse_nm(self.nm)
        if m and self.method == "sparsegpt":
            check_nm(n, m, cols=m, blocksize=self.blocksize)  # N:M groups must not straddle solve blocks
        if self.wbits != 16:
            QuantSpec(self.wbits)
            if self.method != "sparsegpt":
                raise ValueError("--wbits (joint quantization) works with --method sparsegpt only")
        if self.keep_pruned and (self.method != "sparsegpt" or self.owl):
            raise ValueError("keep_pruned (a mask that only grows) works with method sparsegpt without OWL only")
        for name in ("nsamples", "seqlen", "blocksize", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        if self.eval_seqlen is not None and self.eval_seqlen < 2:
            raise ValueError(f"eval_seqlen must be at least 2, got {self.eval_seqlen}")
        if self.eval_windows is not None and self.eval_windows < 1:
            raise ValueError(f"eval_windows must be a positive integer, got {self.eval_windows}")
        if self.task_limit is not None and self.task_limit < 1:
            raise ValueError(f"task_limit (--limit) must be a positive integer, got {self.task_limit}")
        if self.percdamp < 0 or self.damp_retries < 0 or self.keep_acts < 2:
            raise ValueError("percdamp and damp_retries must be >= 0 and keep_acts >= 2")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda (or cuda:N), got {self.device!r}")
        for spec in (self.calib, *self.eval):
            parse_spec(spec)
        parse_task_specs(self.tasks)
        object.__setattr__(self, "eval", tuple(self.eval))
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @property
    def prune_nm(self) -> tuple[int, int]:
        return parse_nm(self.nm)

    @property
    def quant(self) -> QuantSpec | None:
        return QuantSpec(self.wbits) if self.wbits != 16 else None

    @property
    def target(self) -> float:
        """The sparsity every pruned layer ends at (N/M for semi-structured)."""
        n, m = self.prune_nm
        return n / m if m else self.sparsity

    def identity(self) -> dict:
        """The fields that define the run's outputs (stored and compared in run.json).

        Fields added after runs were first written (`ADDED_LATER`) appear only when they
        differ from their default, so older run directories still resume.
        """
        return {k: v for k, v in asdict(self).items()
                if k not in NOT_IDENTITY and not (k in ADDED_LATER and v == ADDED_LATER[k])}

    def to_dict(self) -> dict:
        return asdict(self)
