"""Arrows point one way: flows -> stages -> sparsegpt, and inside stages/ each subpackage imports
only those below it in data-flow order. Imports under `if TYPE_CHECKING:` are types, not arrows."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ORDER = ["config", "run", "data", "model", "report", "prune", "finetune", "evaluate", "progressive", "export", "sweep"]
"""stages/ subpackages, lowest first (config.tree and config.parts import only run-free helpers of data)."""
ALLOWED_UP = {("config", "data")}
"""The config parts check dataset and task SPECs with the data layer's parsers (stages.data.specs, .tasks)."""


def imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names]
    return out


def test_top_level_layers():
    for pkg, banned in (
        ("sparsegpt", ("stages", "flows", "prefect", "transformers", "datasets", "pyarrow")),
        ("stages", ("flows", "prefect")),
    ):
        for path in (REPO / pkg).rglob("*.py"):
            bad = [m for m in imports(path) if m.split(".")[0] in banned]
            assert not bad, f"{path.relative_to(REPO)} imports {bad}: {pkg}/ must not depend on them"


def test_stage_subpackages_import_only_lower_ones():
    assert sorted(ORDER) == sorted(p.name for p in (REPO / "stages").iterdir() if (p / "__init__.py").is_file())
    for path in (REPO / "stages").rglob("*.py"):
        parts = path.relative_to(REPO / "stages").parts
        if len(parts) == 1:
            continue  # stages/__init__.py
        src = parts[0]
        for module in imports(path):
            names = module.split(".")
            if names[0] != "stages" or len(names) < 2 or names[1] == src:
                continue
            dst = names[1]
            ok = ORDER.index(dst) < ORDER.index(src) or (src, dst) in ALLOWED_UP
            assert ok, f"stages/{'/'.join(parts)} imports {module}: {src} may only import {ORDER[: ORDER.index(src)]}"


def test_every_package_is_in_the_wheel():
    """pyproject lists packages explicitly (data/ ships under another name): a folder with an __init__.py
    that is not listed is missing from a regular (non-editable) install."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.parent.relative_to(REPO).parts)
        for top in ("sparsegpt", "flows", "stages")
        for p in (REPO / top).rglob("__init__.py")
    }
    assert found <= listed, f"missing from pyproject.toml's [tool.setuptools] packages: {sorted(found - listed)}"
