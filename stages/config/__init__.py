"""The typed config tree: parts (`parts`), the rules over every tree (`tree`), and the one-shot
and evaluation configs (`prune`). The progressive and fine-tune configs live with their stages."""

from stages.config.parts import (  # noqa: F401
    CalibConfig,
    EvalConfig,
    PruneRuntime,
    ReconstructConfig,
    RuntimeConfig,
    SolverConfig,
    parse_nm,
)
from stages.config.prune import EvaluateConfig, PruneConfig  # noqa: F401
