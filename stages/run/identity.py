"""A run's identity in run.json: written by the first run, compared key by key by every resumption.

`init_run` creates `RUN_DIR/run.json` (the config's identity, its hash, versions and the
options by flat name) or, through `check_run`, refuses a run directory created with
another identity, listing the differences. `config_hash` and `config_diff` work on any
JSON-able mapping (nested or flat).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from stages.run.rundir import LOCK_NAME, RUN_JSON, RunError, atomic_write_json


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _identity(config: Mapping[str, Any], ignore: Iterable[str]) -> dict[str, Any]:
    skip = set(ignore)
    return {k: v for k, v in config.items() if k not in skip}


def config_hash(config: Mapping[str, Any], ignore: Iterable[str] = ()) -> str:
    """sha256 of the canonical JSON of `config` without the `ignore` keys."""
    return hashlib.sha256(_canonical(_identity(config, ignore)).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, str]:
    """Canonical JSON of each leaf, keyed by dotted path (nested dicts only)."""
    if isinstance(obj, Mapping) and obj:
        out: dict[str, str] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: _canonical(obj)}


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Lines `key: old (run dir) != new (this command)` for every differing key."""
    a, b = _flatten(json.loads(_canonical(old))), _flatten(json.loads(_canonical(new)))
    missing = "<absent>"
    return [
        f"{k}: {a.get(k, missing)} (run dir) != {b.get(k, missing)} (this command)"
        for k in sorted(a.keys() | b.keys())
        if a.get(k) != b.get(k)
    ]


OWN_NAMES = {LOCK_NAME, ".prefect"}
"""What a run directory may hold before its run.json exists: the lock and Prefect's result store."""


def check_run(
    run_dir: Path | str,
    config: Mapping[str, Any],
    ignore: Iterable[str] = (),
    upgrade: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
) -> bool:
    """Whether `run_dir` already holds this run (True) or no run yet (False); writes nothing.

    `upgrade` maps a stored config (written by this or an older version, e.g. a flat
    one) onto today's identity before the comparison; a stored config it cannot read is
    compared as it is. A run directory created with a different config raises
    `RunError` listing the differences key by key; so does a directory that exists, is not empty and holds
    no run.json (it may be the parent of other runs, whose temporary files a sweep would delete).
    """
    run_dir = Path(run_dir)
    path = run_dir / RUN_JSON
    if not path.exists():
        foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in OWN_NAMES) if run_dir.is_dir() else []
        if foreign:
            raise RunError(
                f"run dir {run_dir} is not empty and holds no {RUN_JSON} (it has {', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); it may be the parent of other runs: "
                "pass a new or empty --run-dir"
            )
        return False
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["config"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunError(
            f"{path} is unreadable ({exc}); it was not written by this tool or was edited by hand: use a new --run-dir"
        ) from exc
    if upgrade is not None:
        try:
            stored = upgrade(stored)
        except (ValueError, TypeError):
            pass  # compared as stored: the differences below name what changed
    if config_hash(stored, ignore) == config_hash(config, ignore):
        return True
    diff = config_diff(_identity(stored, ignore), _identity(config, ignore))
    raise RunError(
        f"run dir {run_dir} holds a run with different options: {'; '.join(diff)}. "
        "Use a new --run-dir, or rerun with the run dir's options to resume it"
    )


def init_run(
    run_dir: Path | str,
    config: Mapping[str, Any],
    versions: Mapping[str, Any],
    ignore: Iterable[str] = (),
    upgrade: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    options: Mapping[str, Any] | None = None,
) -> None:
    """Create `run.json` for a new run, or check that a resumed run has the same config (`check_run`).

    Keys in `ignore` are stored but not part of the run's identity. `options` (every
    option by its flat name, for `status` and reports) is stored as written by the
    first run. Call it while holding the run's `RunLock`.
    """
    ignore = sorted(set(ignore))
    if check_run(run_dir, config, ignore, upgrade):
        return
    atomic_write_json(
        Path(run_dir) / RUN_JSON,
        {
            "config": dict(config),
            **({"options": dict(options)} if options is not None else {}),
            "config_hash": config_hash(config, ignore),
            "ignored_keys": ignore,
            "versions": dict(versions),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    )
