"""Typed configuration of a sweep, and its expansion into one-shot runs (grid points).

`SweepConfig` is what `sparsegpt sweep` builds (options generated from its fields), the
`sparsegpt-sweep` flow takes as its parameter and `RUN_ROOT/sweep.json` records. It holds
the same parts as a one-shot run (the settings every point shares) plus the grid: axes
`FIELD=V1,V2,...` over any leaf of `PruneConfig` by its flat name (`method`, `sparsity`,
`nm`, `owl`, `model`, ...). `points` expands the grid into every combination, each a
checked `PruneConfig` whose run directory is `RUN_ROOT/<point name>`; a bad field or value
fails here, naming the axis, before anything is submitted.
"""

from __future__ import annotations

import itertools
import re
import types
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from stages.config import CalibConfig, EvalConfig, PruneConfig, PruneRuntime, ReconstructConfig, SolverConfig
from stages.config.tree import Leaf, Tree, leaves, opt, part

DEPLOYMENT = "sparsegpt-oneshot/sparsegpt-oneshot"
"""The deployment (FLOW/NAME in prefect.yaml) a point runs as on a work pool."""
TRUE, FALSE = ("on", "true", "yes", "1"), ("off", "false", "no", "0")
NONE = ("none", "unset", "")


@dataclass(frozen=True)
class SweepConfig(Tree):
    """A sweep: one-shot runs over the combinations of a grid, sharing every other setting."""

    model: str = opt("smollm2-135m", positional=True)
    """Local HF directory (safetensors), hub id, or smollm2-135m; `--grid model=A,B` sweeps several."""
    run_root: str = opt("runs/sweep", required=True)
    """Folder of the sweep: a run directory per point (RUN_ROOT/<point>), sweep.json and report/; rerun the
    same command to run the points that did not finish."""
    grid: tuple[str, ...] = opt((), append=True, metavar="FIELD=V1,V2")
    """A grid axis: a prune option's name and its values, e.g. method=sparsegpt,wanda or sparsity=0.5,0.6
    (repeat for more axes; the points are every combination)."""
    pool: str | None = None
    """Submit every point as a run of the sparsegpt-oneshot deployment on this Prefect work pool (its workers
    run them in parallel, on any machine); unset runs the points here, one after another, as subflows."""
    deployment: str = DEPLOYMENT
    """With --pool: the one-shot deployment the points run as (FLOW/NAME)."""
    poll_seconds: float = 5.0
    """With --pool: seconds between checks of the submitted runs' states."""
    trust_remote_code: bool = False
    """Allow a model's own Python code from the hub to run."""
    calib: CalibConfig = part(CalibConfig)
    solver: SolverConfig = part(SolverConfig)
    reconstruct: ReconstructConfig = part(ReconstructConfig)
    eval: EvalConfig = part(EvalConfig)
    runtime: PruneRuntime = part(PruneRuntime)

    def __post_init__(self) -> None:
        object.__setattr__(self, "grid", tuple(self.grid))  # a JSON parameter brings a list
        if self.poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be positive, got {self.poll_seconds}")
        if self.eval.out:
            raise ValueError("--out writes one lm-eval file, not one per point; drop it (see RUN_ROOT/report)")
        if self.pool is not None and "/" not in self.deployment:
            raise ValueError(f"--deployment must read FLOW/NAME, e.g. {DEPLOYMENT}, got {self.deployment!r}")

    def base(self) -> PruneConfig:
        """The one-shot config every point starts from (its run directory is set per point), sharing its
        calibration windows and block-0 inputs through the cache (`stages.prune.shared_inputs`)."""
        return PruneConfig(
            model=self.model,
            run_dir=self.run_root,
            trust_remote_code=self.trust_remote_code,
            calib=self.calib,
            solver=self.solver,
            reconstruct=self.reconstruct,
            eval=self.eval,
            runtime=replace(self.runtime, share_inputs=True),  # the points share calibration windows and inputs
        )


@dataclass(frozen=True)
class Point:
    """One grid point: its name (and folder under RUN_ROOT), its axis values and its one-shot config."""

    name: str
    values: dict[str, Any]
    cfg: PruneConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def _optional(kind: Any) -> tuple[Any, bool]:
    """``int | None`` -> ``(int, True)``; other types -> ``(type, False)``."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return kind, False


def parse_value(leaf: Leaf, text: str) -> Any:
    """A grid value given as text, typed as the leaf ``leaf`` types it; ValueError naming the axis."""
    kind, optional = _optional(leaf.type)
    word = text.strip()
    if optional and word.lower() in NONE:
        return None
    if get_origin(kind) is Literal:
        if word not in get_args(kind):
            raise ValueError(f"--grid {leaf.flat}: {word!r} is not one of {', '.join(map(str, get_args(kind)))}")
        return word
    if kind is bool:
        if word.lower() not in TRUE + FALSE:
            raise ValueError(f"--grid {leaf.flat}: {word!r} is not on/off (or true/false)")
        return word.lower() in TRUE
    if kind in (int, float):
        try:
            return kind(word)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise ValueError(f"--grid {leaf.flat}: {word!r} is not {what}") from None
    if kind is str:
        return word
    raise ValueError(f"--grid {leaf.flat}: a list-valued option cannot be swept; set it once for all points")


def axes(cfg: SweepConfig) -> list[tuple[Leaf, tuple[Any, ...]]]:
    """The grid's axes in the order given: (leaf of PruneConfig, its typed values)."""
    if not cfg.grid:
        raise ValueError("a sweep needs at least one --grid FIELD=V1,V2 (e.g. --grid sparsity=0.5,0.6)")
    known = {leaf.flat: leaf for leaf in leaves(PruneConfig()) if leaf.flat != "run_dir"}
    out: list[tuple[Leaf, tuple[Any, ...]]] = []
    for entry in cfg.grid:
        field, sep, values = entry.partition("=")
        field = field.strip().removeprefix("--").replace("-", "_")
        if not sep or not values.strip():
            raise ValueError(f"--grid {entry!r} must read FIELD=V1,V2 (e.g. sparsity=0.5,0.6)")
        if field not in known:
            raise ValueError(f"--grid {field}: no such prune option; sweepable: {', '.join(sorted(known))}")
        if field in {leaf.flat for leaf, _ in out}:
            raise ValueError(f"--grid {field} is given twice; put all its values in one --grid {field}=V1,V2")
        typed = tuple(parse_value(known[field], v) for v in values.split(","))
        if len(set(typed)) < len(typed):
            raise ValueError(f"--grid {field}: a value is repeated in {values!r}")
        out.append((known[field], typed))
    return out


def slug(value: Any) -> str:
    """A value as part of a folder name: a model path by its last part, ':' and other odd characters as '-'."""
    text = Path(str(value)).name if isinstance(value, str) and "/" in value else str(value)
    if isinstance(value, bool):
        text = "on" if value else "off"
    if value is None:
        text = "none"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "none"


def points(cfg: SweepConfig) -> list[Point]:
    """Every combination of the grid as a checked one-shot config under RUN_ROOT; ValueError names the point."""
    root = Path(cfg.run_root).expanduser().resolve()  # absolute: workers on other machines see the same path
    grid, base, out = axes(cfg), cfg.base(), []
    for combo in itertools.product(*(values for _, values in grid)):
        values = {leaf.flat: v for (leaf, _), v in zip(grid, combo, strict=True)}
        name = "_".join(f"{k}={slug(v)}" for k, v in values.items())
        try:
            point = base.updated(**values, run_dir=str(root / name))
        except ValueError as exc:
            raise ValueError(f"grid point {name}: {exc}") from None
        out.append(Point(name, values, point))
    names = [p.name for p in out]
    if len(set(names)) < len(names):
        raise ValueError("two grid points share a folder name (values differing only in odd characters); rename one")
    return out
