"""The dense model's evaluation, shared across run directories.

Every one-shot run evaluates the dense model it started from, and every progressive run
does it once more; for a 70B model that is hours of the same work. A dense evaluation is
therefore also stored under `$SPARSEGPT_EVAL_CACHE` (default `$SPARSEGPT_CACHE/eval`, i.e.
`~/.cache/sparsegpt/eval`),
keyed by what shapes it: the checkpoint's digest (`checkpoint_digest`), the SPEC text and,
for a local file, its size and mtime, the window length and count (or the task limit), the
compute dtype and the device's kind. A run directory still gets its own record (a copy),
so a run stays complete if the cache is deleted. Writes are atomic, and an entry is read,
computed and written under its own `flock` (`stages.run.shared.entry_lock`): workers of a sweep that need the
same dense evaluation at once compute it once, the others wait and read it. `--no-cache`
(`RuntimeConfig.cache = False`) neither reads nor writes it. Pruned models are never
stored there: each belongs to one run. An entry that fails verification is computed
again (a warning); a cache folder that cannot be written is skipped (a warning, once).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from stages.data.specs import parse_spec
from stages.data.tasks import parse_task_specs
from stages.model.checkpoint import checkpoint_digest
from stages.model.embedded import cache_root
from stages.run.rundir import RunError, verify_record, write_record

log = logging.getLogger("sparsegpt.evaluate")
_unwritable: set[Path] = set()


def _file_stamp(path: Path | None) -> list[int] | None:
    if path is None or not Path(path).is_file():
        return None
    st = Path(path).stat()
    return [st.st_size, st.st_mtime_ns]


def shared_record(kind: str, model_dir: Path, spec: str, **settings: Any) -> Path:
    """Where the shared record of one dense evaluation lives (`kind`: "ppl" or "task")."""
    path = parse_spec(spec).path if kind == "ppl" else parse_task_specs([spec])[0].path
    key = {"kind": kind, "model": checkpoint_digest(model_dir), "spec": spec, "file": _file_stamp(path), **settings}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return eval_cache_dir() / f"{kind}-{digest}.json"


def eval_cache_dir() -> Path:
    """`$SPARSEGPT_EVAL_CACHE`, else `$SPARSEGPT_CACHE/eval` (the test suite points it at a fresh folder per test)."""
    return Path(os.environ.get("SPARSEGPT_EVAL_CACHE") or cache_root() / "eval").expanduser()


def read_shared(path: Path) -> dict | None:
    """A shared record's payload, or None (missing, or failing verification: then a warning)."""
    done = verify_record(path)
    if done is None and path.exists():
        log.warning("the shared dense evaluation %s failed verification; it is computed again", path)
    return done


def write_shared(path: Path, payload: dict) -> None:
    """Store a shared record; a cache folder that cannot be written is warned about once and skipped."""
    try:
        write_record(path, payload, [])
    except (OSError, RunError) as exc:
        if path.parent not in _unwritable:
            _unwritable.add(path.parent)
            log.warning(
                "cannot write the dense-evaluation cache %s (%s); running without it (--no-cache skips it)",
                path.parent,
                exc,
            )
