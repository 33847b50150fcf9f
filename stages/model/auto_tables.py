"""transformers' model-type tables (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, `CONFIG_MAPPING_NAMES`, ...) read
from its source files without running them: importing `transformers.models.auto` imports torch and every
config class (seconds), and the checks every command runs first need only these literals
(`stages.model.checkpoint.validate_model_dir`).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from functools import cache
from pathlib import Path


@cache
def transformers_names(name: str) -> dict[str, str]:
    """A model-type table of `transformers.models.auto` (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`,
    `CONFIG_MAPPING_NAMES`) read from transformers' source: its literal assignment and the literal updates
    after it, in import order. Importing it would import torch and every config class (seconds). Falls back
    to that import when the source holds a statement on it that is not a literal (another layout)."""
    table: dict[str, str] | None = None
    try:
        for module in _AUTO_MODULES:
            for node in _auto_source(module):
                table = _apply_literal(node, name, table)
    except (IndexError, OSError, SyntaxError, ValueError, TypeError):
        table = None
    if table is not None:
        return table
    auto = importlib.import_module("transformers.models.auto.modeling_auto")
    return dict(getattr(auto, name))


_AUTO_MODULES = ("auto_mappings", "configuration_auto", "modeling_auto")
"""The files of `transformers.models.auto` whose model-type tables `transformers_names` reads, in the
order transformers imports them."""


@cache
def _auto_source(module: str) -> list[ast.stmt]:
    """The top-level statements of `transformers.models.auto.<module>`, parsed, not run."""
    spec = importlib.util.find_spec("transformers")
    folder = list(spec.submodule_search_locations or [])[0] if spec is not None else ""
    return ast.parse((Path(folder) / "models" / "auto" / f"{module}.py").read_text(encoding="utf-8")).body


def _apply_literal(node: ast.stmt, name: str, table: dict[str, str] | None) -> dict[str, str] | None:
    """`table` after the top-level statement `node`: `name = OrderedDict([...])` (or a dict literal),
    `name = OrderedDict(**{...}, **name)`, `name.update({...})`; ValueError for another statement on it."""
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
        value = node.value
        if not isinstance(value, ast.Call):
            return dict(ast.literal_eval(value))
        out: dict[str, str] = dict(ast.literal_eval(value.args[0])) if value.args else {}
        for kw in value.keywords:
            if kw.arg is not None:
                raise ValueError(f"{name}: keyword {kw.arg}")
            same = getattr(kw.value, "id", None) == name
            out.update((table or {}) if same else ast.literal_eval(kw.value))
        return out
    call = node.value if isinstance(node, ast.Expr) else None
    if isinstance(call, ast.Call) and getattr(call.func, "attr", None) == "update":
        if getattr(call.func.value, "id", None) == name:
            return {**(table or {}), **ast.literal_eval(call.args[0])}
    return table
