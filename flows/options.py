"""Command-line options generated from the config tree, and the README's option tables.

Every leaf of a config (`stages.config.tree.leaves`) becomes one option: its flat name
gives the flag (`eval_seqlen` -> `--eval-seqlen`, or the leaf's `flag` metadata), its
type the parsing (`Literal` choices, `int | None`, booleans as `--flag` or `--no-flag`,
tuples as repeatable or comma-separated values), its attribute docstring the help and
the config's own default the default. Options take no argparse default: only what the
user typed reaches `from_flat`, so defaults live in the dataclasses alone.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Mapping
from typing import Any, Literal, Union, get_args, get_origin

from stages.config.tree import Leaf, from_flat, leaves


def _base(kind: Any) -> Any:
    """``int | None`` -> ``int``; other types unchanged."""
    if get_origin(kind) in (Union, types.UnionType):
        args = [a for a in get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def flag_of(leaf: Leaf) -> str:
    """The option string of a leaf: ``--no-progress`` for a True boolean, else ``--flat-name`` (or its ``flag``)."""
    flag = leaf.metadata.get("flag", "--" + leaf.flat.replace("_", "-"))
    if _base(leaf.type) is bool and leaf.default is True:
        return "--no-" + flag.removeprefix("--")
    return flag


def _add(parser: argparse.ArgumentParser, leaf: Leaf, aliases: tuple[str, ...]) -> None:
    kind, help_ = _base(leaf.type), leaf.help
    if kind is not bool and not leaf.metadata.get("positional") and not leaf.metadata.get("required"):
        help_ += f" (default: {_shown(leaf.default)})"
    if leaf.metadata.get("positional"):
        parser.add_argument(leaf.flat, help=help_)
        return
    opts: dict[str, Any] = {"dest": leaf.flat, "default": argparse.SUPPRESS, "help": help_}
    if kind is bool:
        opts["action"] = "store_false" if leaf.default else "store_true"
    elif get_origin(kind) is tuple:
        opts["action"] = "append" if leaf.metadata.get("append") else "store"
        opts["metavar"] = leaf.metadata.get("metavar", "VALUE") + (
            leaf.metadata["sep"] + "..." if "sep" in leaf.metadata else ""
        )
    elif get_origin(kind) is Literal:
        opts["choices"] = get_args(kind)
    else:
        opts["type"] = kind
    if leaf.metadata.get("required"):
        opts["required"] = True
    parser.add_argument(flag_of(leaf), *aliases, **opts)


def add_options(
    parser: argparse.ArgumentParser, cfg: Any, aliases: Mapping[str, tuple[str, ...]] | None = None
) -> None:
    """One option per CLI leaf of the config instance ``cfg`` (its values are the defaults shown)."""
    for leaf in leaves(cfg, cli=True):
        _add(parser, leaf, (aliases or {}).get(leaf.flat, ()))


def build(cfg: Any, args: argparse.Namespace) -> Any:
    """``cfg`` with the options the user gave (flat names in ``args``) applied; the config's checks run."""
    given = vars(args)
    values: dict[str, Any] = {}
    for leaf in leaves(cfg, cli=True):
        if leaf.flat not in given:
            continue
        value, sep = given[leaf.flat], leaf.metadata.get("sep")
        if sep:
            parts = value if isinstance(value, list) else [value]
            value = tuple(s.strip() for p in parts for s in p.split(sep) if s.strip())
        elif isinstance(value, list):
            value = tuple(value)
        values[leaf.flat] = value
    return from_flat(cfg, values)


def _shown(value: Any) -> str:
    if value is None or value == ():
        return "unset"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def options_markdown(cfg: Any) -> str:
    """The README's table of a command's options: flag, default, meaning."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for leaf in leaves(cfg, cli=True):
        name = leaf.flat.upper() if leaf.metadata.get("positional") else f"`{flag_of(leaf)}`"
        required = leaf.metadata.get("required") or leaf.metadata.get("positional")
        default = "required" if required else _shown(leaf.default)
        if _base(leaf.type) is bool:
            default = "off" if not leaf.default else "on"
        rows.append(f"| {name} | {default} | {leaf.help.replace('|', chr(92) + '|')} |")
    return "\n".join(rows)


COMMANDS = ("prune", "eval", "progressive", "sweep")


def command_config(command: str) -> Any:
    """The default config instance behind a command's options."""
    from stages.config import EvaluateConfig, PruneConfig
    from stages.progressive.config import ProgressiveConfig
    from stages.sweep.config import SweepConfig

    configs = {"prune": PruneConfig, "eval": EvaluateConfig, "progressive": ProgressiveConfig, "sweep": SweepConfig}
    return configs[command]()


def readme_tables() -> str:
    """The README's "Options" tables, one per command (`python -m flows.options` prints them)."""
    parts = []
    for command in COMMANDS:
        parts += [
            f"<!-- options:{command} -->",
            f"`sparsegpt {command}`:",
            "",
            options_markdown(command_config(command)),
            f"<!-- /options:{command} -->",
            "",
        ]
    return "\n".join(parts).rstrip() + "\n"


if __name__ == "__main__":
    print(readme_tables(), end="")
