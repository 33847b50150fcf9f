"""The parts every run's config is built from: calibration, solver, evaluation, runtime.

Each part is a frozen dataclass that checks itself in `__post_init__` and raises a
ValueError naming the fix. `PruneConfig` (stages.config.prune), `ProgressiveConfig`
(stages.progressive.config) and `EvaluateConfig` compose them; a progressive round's
settings are `dataclasses.replace` calls on them. `EvalConfig` and `RuntimeConfig`
(and its subclasses) never enter a run's identity (`stages.config.tree.identity`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

from sparsegpt.spec import QuantSpec, check_nm, check_sparsity
from stages.config.tree import opt
from stages.data.specs import parse_spec
from stages.data.tasks import parse_task_specs

Method = Literal["sparsegpt", "wanda", "magnitude"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPES = ("auto", "float32", "bfloat16", "float16")
METHODS = ("sparsegpt", "wanda", "magnitude")
Target = Literal["dense-stream", "dense-block"]
EXPORT_FORMATS = ("hf", "compressed-tensors", "gguf")
GGUF_TYPES = ("f16", "q8_0", "q4_0")
GgufType = Literal["f16", "q8_0", "q4_0"]
TARGETS = ("dense-stream", "dense-block")
Kernel = Literal["torch", "triton"]
KERNELS = ("torch", "triton")


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


FLAG_NOTES = {"task_limit": "task_limit (--limit)"}
"""How a check names a leaf whose flag differs from its flat name."""


def _positive(part: object, *names: str, low: int = 1) -> None:
    flat = {f.name: f.metadata.get("flat", f.name) for f in fields(part)}  # type: ignore[arg-type]
    for name in names:
        value = getattr(part, name)
        if value is not None and value < low:
            what = "a positive integer" if low == 1 else f"an integer >= {low}"
            raise ValueError(f"{FLAG_NOTES.get(flat[name], flat[name])} must be {what}, got {value}")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data: the windows whose activations build the Hessians."""

    spec: str = opt("pydoc", flat="calib")
    """Calibration dataset SPEC: wikitext2[=PATH], c4[=PATH], ptb[=PATH], text=PATH, jsonl=PATH[:field],
    parquet=PATH[:field], or pydoc (embedded, no download)."""
    nsamples: int = 128
    """Calibration windows."""
    seqlen: int = 2048
    """Tokens per calibration window."""
    seed: int = 0
    """Seed of the calibration sampling (a progressive round k uses seed + k - 1)."""

    def __post_init__(self) -> None:
        _positive(self, "nsamples")
        _positive(self, "seqlen", low=2)
        parse_spec(self.spec)


@dataclass(frozen=True)
class SolverConfig:
    """What to prune and how: method, target, pattern, quantization, the solve's numerics, OWL."""

    method: Method = "sparsegpt"
    """Pruning method: sparsegpt (the OBS solve), wanda or magnitude."""
    sparsity: float = 0.5
    """Unstructured target per linear layer, in [0, 1); ignored when --nm is set."""
    nm: str | None = None
    """Semi-structured N:M pattern such as 2:4; unset for unstructured."""
    wbits: int = 16
    """Joint quantization to this many bits (2-8, sparsegpt only); 16 means none."""
    blocksize: int = 128
    """Columns per block of the SparseGPT solve."""
    percdamp: float = 0.01
    """Dampening, as a fraction of the mean Hessian diagonal."""
    damp_retries: int = 3
    """Tenfold damping increases allowed (each logged) before a singular Hessian fails."""
    owl: bool = False
    """Allocate per-block sparsity with OWL (outlier-weighed) instead of uniformly."""
    owl_lambda: float = 0.08
    """OWL's spread lambda (block sparsities span 2 lambda)."""
    owl_threshold: float = 5.0
    """OWL's outlier threshold M (scores above M x mean are outliers)."""
    sequential: bool = False
    """Solve a block's layers in forward order, each against its inputs from the pruned layers before it,
    in one forward pass per block (the default: every layer against the dense block's inputs, two passes)."""
    kernel: Kernel = opt("torch", identity=False)
    """The solve's column loop: torch (any device) or triton (one fused kernel per block of columns, CUDA
    with the triton package; equal to float32 rounding, so N:M choices move only at near ties; no --wbits).
    Not part of a run's identity: a run may resume with the other one."""
    keep_pruned: bool = False
    """Weights that are exactly zero stay pruned and count toward the target (the mask only grows):
    how a progressive round prunes the previous round's model. sparsegpt only, without OWL."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        check_sparsity(self.sparsity)
        n, m = parse_nm(self.nm)
        _positive(self, "blocksize")
        if m and self.method == "sparsegpt":
            check_nm(n, m, cols=m, blocksize=self.blocksize)  # N:M groups must not straddle solve blocks
        if self.wbits != 16:
            QuantSpec(self.wbits)
            if self.method != "sparsegpt":
                raise ValueError("--wbits (joint quantization) works with --method sparsegpt only")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.kernel == "triton" and (self.method != "sparsegpt" or self.wbits != 16):
            raise ValueError("--kernel triton runs the SparseGPT solve without --wbits; use --kernel torch")
        if self.keep_pruned and (self.method != "sparsegpt" or self.owl):
            raise ValueError("keep_pruned (a mask that only grows) works with method sparsegpt without OWL only")
        if self.percdamp < 0 or self.damp_retries < 0:
            raise ValueError("percdamp and damp_retries must be >= 0")

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

    @property
    def label(self) -> str:
        """``sparsegpt 50%`` or ``sparsegpt 2:4``, for tables."""
        return f"{self.method} {self.nm or f'{self.target:.0%}'}"


@dataclass(frozen=True)
class ReconstructConfig:
    """Block-wise reconstruction (EBFT): after each block's solve, Adam on its surviving weights and norms,
    the mask fixed, so that its outputs match the dense model's (`stages.prune.reconstruct`)."""

    enabled: bool = opt(False, flat="reconstruct")
    """After each block's solve, train its surviving weights toward the dense model's block outputs."""
    epochs: int = opt(1, flat="reconstruct_epochs")
    """Passes over the reconstruction samples per block."""
    lr: float = opt(3e-3, flat="reconstruct_lr")
    """Adam's learning rate (decays linearly to zero over the block's steps)."""
    target: Target = opt("dense-stream", flat="reconstruct_target")
    """dense-stream: the dense model's block outputs on its own inputs (a second activation stream on disk;
    corrects the error carried in from earlier blocks); dense-block: the dense block on the pruned model's
    inputs."""
    samples: int | None = opt(None, flat="reconstruct_samples")
    """Windows to reconstruct on: the calibration windows, or the first N drawn the same way (more than
    --nsamples draws more; the Hessians still use the first --nsamples)."""
    batch_size: int = opt(2, flat="reconstruct_batch_size")
    """Windows per training step."""
    teacher: str | None = opt(None, flat="reconstruct_teacher")
    """The dense model whose blocks give the targets (same depth and width): default the model being pruned,
    before its solve. A progressive round sets the run's dense model."""

    def __post_init__(self) -> None:
        _positive(self, "epochs", "samples", "batch_size")
        if not self.lr > 0:
            raise ValueError(f"reconstruct_lr must be a positive learning rate (e.g. 1e-4), got {self.lr}")
        if self.target not in TARGETS:
            raise ValueError(f"reconstruct_target must be one of {', '.join(TARGETS)}, got {self.target!r}")


@dataclass(frozen=True)
class EvalConfig:
    """What to evaluate: perplexity SPECs and zero-shot tasks (never part of a run's identity)."""

    specs: tuple[str, ...] = opt((), flat="eval", append=True, metavar="SPEC")
    """Evaluation dataset SPEC (repeatable); unset or none: no perplexity."""
    seqlen: int | None = opt(None, flat="eval_seqlen")
    """Tokens per evaluation window; defaults to the calibration seqlen (2048 for sparsegpt eval)."""
    windows: int | None = opt(None, flat="eval_windows")
    """Evaluate only the first N windows (quick runs on a CPU)."""
    batch_size: int = opt(4, flat="eval_batch_size")
    """Windows (perplexity) or task rows (zero-shot) per forward pass during evaluation."""
    tasks: tuple[str, ...] = opt((), append=True, sep=",", metavar="SPEC")
    """Zero-shot tasks: lambada|piqa|arc_easy|arc_challenge|hellaswag|winogrande|boolq|storycloze[=PATH],
    comma-separated (repeatable); a bare NAME loads the hub copy."""
    task_limit: int | None = opt(None, flag="--limit")
    """Score only the first N items of each task (quick runs on a CPU)."""
    out: str | None = opt(None, metavar="PATH")
    """Also write the scores in lm-evaluation-harness's results layout to PATH (a prune: the pruned model's;
    the dense model's beside it as NAME.dense.json)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "specs", tuple(s for s in self.specs if s.strip().lower() != "none"))
        object.__setattr__(self, "tasks", tuple(self.tasks))
        _positive(self, "windows", "batch_size", "task_limit")
        _positive(self, "seqlen", low=2)
        for spec in self.specs:
            parse_spec(spec)
        parse_task_specs(self.tasks)

    def __bool__(self) -> bool:
        return bool(self.specs or self.tasks)


@dataclass(frozen=True)
class RuntimeConfig:
    """Where and how a run executes (never part of its identity)."""

    device: str = "cpu"
    """Torch device of blocks, Hessians and solves: cpu, cuda or cuda:N."""
    dtype: Dtype = "auto"
    """Compute dtype of the blocks' forwards and of evaluation: auto is float32 on a CPU and the checkpoint's
    half precision on a GPU; Hessians and solves stay float32. A run's compute dtype is part of its identity."""
    progress: bool = True
    """Show progress bars."""
    cache: bool = True
    """Reuse and store the dense model's evaluation across run directories under $SPARSEGPT_CACHE/eval
    (keyed by the checkpoint's digest, SPEC, windows, dtype and device kind); a prune also reuses the
    calibration inputs other runs shared (`--share-inputs`). Off: neither read nor written."""

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda (or cuda:N), got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass(frozen=True)
class PruneRuntime(RuntimeConfig):
    """Runtime settings of a pruning run."""

    batch_size: int = 8
    """Calibration samples per block forward pass, and per Hessian update, so it moves results in the last
    bits (SmolLM2 2:4: 83.28 at 8, 83.77 at 2). On a CPU, 2 runs as fast as 8 and holds a quarter of the
    forward's intermediates (SmolLM2, 512 tokens: +44 MiB instead of +162 MiB)."""
    keep_acts: int = 2
    """Activation boundaries kept on disk (older ones are deleted as the run proceeds)."""
    nproc: int = 1
    """Data-parallel ranks (torch.distributed, gloo on a CPU, nccl with one GPU each) that prune each block
    together: calibration windows split across ranks, Hessians all-reduced, the layer solves split by cost.
    Not part of a run's identity: a run may resume with another count."""
    share_inputs: bool = False
    """Also store the calibration windows and block 0's inputs under $SPARSEGPT_CACHE/calib for other runs of
    the same model and calibration (hard links; `sparsegpt sweep` turns it on for its points). Any run with
    the cache on reads them from there."""
    export: str | None = opt(None, metavar="FORMAT")
    """At the end of the run, export it as `sparsegpt export --format FORMAT` does (hf,
    compressed-tensors, gguf) into RUN_DIR/export-FORMAT (a progressive run: its final model, hf or gguf)."""
    gguf_type: GgufType = "f16"
    """Matrix type of a GGUF export: f16, q8_0 or q4_0."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self, "batch_size", "nproc")
        _positive(self, "keep_acts", low=2)
        if self.export is not None and self.export not in EXPORT_FORMATS:
            raise ValueError(f"--export must be one of {', '.join(EXPORT_FORMATS)}, got {self.export!r}")
        if self.gguf_type not in GGUF_TYPES:
            raise ValueError(f"--gguf-type must be one of {', '.join(GGUF_TYPES)}, got {self.gguf_type!r}")
