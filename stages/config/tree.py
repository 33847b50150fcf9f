"""The config tree's one set of rules: leaves, flat names, building from flat values, identity.

Every config of the project is a frozen dataclass whose fields are leaves (str, int,
float, bool, tuples, optional values) or parts (nested config dataclasses). Each leaf
has a *flat name*, unique in its tree: the field name, or `metadata["flat"]` where the
field name alone would be ambiguous (`EvalConfig.seqlen` is `eval_seqlen`). Flat names
are the CLI's options (`--eval-seqlen`), the keys of an older, flat `run.json`, and what
`from_flat` builds a tree from. A field's help is its attribute docstring.

A run's identity is the tree without its `EvalConfig` and `RuntimeConfig` parts (and
without `run_dir`, the place it lives, and the leaves marked ``identity=False``, such as
the solver's kernel): they may change between a run and its resumption; every other
leaf may not.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import Field, asdict, dataclass, field, fields, is_dataclass, replace
from functools import cache
from typing import Any, TypeVar, get_type_hints

NOT_IDENTITY_FIELDS = ("run_dir",)
"""Top-level leaves that are never part of an identity (where a run lives is not what it is)."""


def opt(default: Any, **metadata: Any) -> Any:
    """A leaf with metadata: ``flat`` (its flat name), ``flag`` (CLI flag if not --flat-name),
    ``sep`` (one CLI value split on this separator), ``append`` (a repeatable CLI option), ``identity``
    (False: how a part runs, not what it computes; left out of the run's identity like a runtime part)."""
    return field(default=default, metadata=metadata)


def part(factory: Any, **metadata: Any) -> Any:
    """A nested part; ``cli=(leaf, ...)`` limits which of its leaves a command exposes."""
    return field(default_factory=factory, metadata=metadata)


@dataclass(frozen=True)
class Leaf:
    """One leaf of a tree, as the CLI, the README table and `from_flat` see it."""

    path: tuple[str, ...]
    flat: str
    type: Any
    default: Any
    help: str
    metadata: Mapping[str, Any]


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: ``{field: text}`` (one paragraph)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not is_dataclass(klass):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in zip(body, body[1:], strict=False):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def _is_part(f: Field, hints: dict[str, Any]) -> bool:
    return isinstance(hints[f.name], type) and is_dataclass(hints[f.name])


def leaves(
    cfg: Any, cli: bool = False, prefix: tuple[str, ...] = (), only: tuple[str, ...] | None = None
) -> Iterator[Leaf]:
    """Every leaf of the config instance ``cfg`` (defaults are its values), parts depth first; with
    ``cli``, only those a command exposes (a part's ``cli`` metadata may name a subset)."""
    hints = get_type_hints(type(cfg))
    docs = field_docs(type(cfg))
    for f in fields(cfg):
        if only is not None and f.name not in only:
            continue
        value = getattr(cfg, f.name)
        if _is_part(f, hints):
            yield from leaves(value, cli, (*prefix, f.name), f.metadata.get("cli") if cli else None)
        else:
            yield Leaf(
                (*prefix, f.name),
                f.metadata.get("flat", f.name),
                hints[f.name],
                value,
                docs.get(f.name, ""),
                f.metadata,
            )


def flat_names(cls: type) -> dict[str, tuple[str, ...]]:
    """Flat name -> path of every leaf of ``cls()``; refuses a tree where two leaves share one."""
    out: dict[str, tuple[str, ...]] = {}
    for leaf in leaves(cls()):
        if leaf.flat in out:
            raise TypeError(
                f"{cls.__name__}: leaves {out[leaf.flat]} and {leaf.path} share the flat name {leaf.flat!r}"
            )
        out[leaf.flat] = leaf.path
    return out


def from_flat(base: Any, values: Mapping[str, Any]) -> Any:
    """``base`` (a config instance) with the leaves named in ``values`` (flat names) replaced.

    Unknown names raise ValueError; parts are rebuilt only where a leaf of theirs changes,
    so each part's checks run on its final values.
    """
    known = flat_names(type(base))
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {type(base).__name__}")
    return _rebuild(base, values)


def _rebuild(cfg: Any, values: Mapping[str, Any]) -> Any:
    hints = get_type_hints(type(cfg))
    changes: dict[str, Any] = {}
    for f in fields(cfg):
        if _is_part(f, hints):
            sub = getattr(cfg, f.name)
            new = _rebuild(sub, values)
            if new is not sub:
                changes[f.name] = new
        elif f.metadata.get("flat", f.name) in values:
            changes[f.name] = values[f.metadata.get("flat", f.name)]
    return replace(cfg, **changes) if changes else cfg


def to_flat(cfg: Any) -> dict[str, Any]:
    """``{flat name: value}`` of every leaf of the instance ``cfg``."""
    return {leaf.flat: leaf.default for leaf in leaves(cfg)}


def stored_flat(cls: type, stored: Mapping[str, Any]) -> dict[str, Any]:
    """A stored config dict (nested as `asdict` writes it, or flat as older runs did) as flat names."""
    out: dict[str, Any] = {}
    paths = {path: flat for flat, path in flat_names(cls).items()}

    def walk(obj: Mapping[str, Any], prefix: tuple[str, ...]) -> None:
        for k, v in obj.items():
            path = (*prefix, k)
            if isinstance(v, Mapping) and path not in paths:
                walk(v, path)
            else:
                out[paths.get(path, k)] = v

    walk(stored, ())
    return out


def identity(cfg: Any) -> dict[str, Any]:
    """The run-defining part of ``cfg``: the tree minus evaluation and runtime parts and `run_dir`."""
    from stages.config.parts import EvalConfig, RuntimeConfig

    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, (EvalConfig, RuntimeConfig)) or f.name in NOT_IDENTITY_FIELDS:
            continue
        out[f.name] = _identity_dict(value) if is_dataclass(value) else value
    return out


def _identity_dict(part_value: Any) -> dict[str, Any]:
    """``asdict(part_value)`` without its leaves marked ``identity=False`` (at any depth)."""
    out: dict[str, Any] = {}
    for f in fields(part_value):
        if f.metadata.get("identity", True) is False:
            continue
        value = getattr(part_value, f.name)
        out[f.name] = _identity_dict(value) if is_dataclass(value) else value
    return out


T = TypeVar("T", bound="Tree")


class Tree:
    """What every top-level config (a frozen dataclass of leaves and parts) can do, by the rules above."""

    def identity(self) -> dict[str, Any]:
        """What defines the run's outputs (stored and compared in run.json)."""
        return identity(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def updated(self: T, **flat: Any) -> T:
        """This config with the leaves named by their flat names replaced (``cfg.updated(sparsity=0.6)``)."""
        return from_flat(self, flat)

    @classmethod
    def of(cls: type[T], **flat: Any) -> T:
        """The default config with the leaves named by their flat names set (``PruneConfig.of(nsamples=6)``)."""
        return from_flat(cls(), flat)

    @classmethod
    def from_dict(cls: type[T], stored: Mapping[str, Any]) -> T:
        """The inverse of `to_dict` (a JSON round trip), also for an older flat dict."""
        return from_flat(cls(), cls.legacy(stored_flat(cls, stored)))

    @classmethod
    def upgrade(cls, stored: Mapping[str, Any]) -> dict[str, Any]:
        """The identity a stored run.json config (this tree, or an older flat one) means today."""
        return cls.from_dict(stored).identity()

    @classmethod
    def legacy(cls, flat: dict[str, Any]) -> dict[str, Any]:
        """Flat values of an older version in today's names (none to translate by default)."""
        return flat
