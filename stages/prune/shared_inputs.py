"""Calibration windows and block 0's inputs shared across run directories (the points of a sweep).

Every point of a sweep over one model samples the same calibration windows and captures the
same inputs of block 0 (4 GiB for a 70B model at 128 x 2048 in bf16). A run whose
`runtime.share_inputs` is on (`sparsegpt sweep` turns it on for its points) stores them
under `$SPARSEGPT_CALIB_CACHE` (default `$SPARSEGPT_CACHE/calib`) and every run with the
cache on (`--no-cache` turns it off) reads them from there. Two entries, each a folder that
mirrors the run directory's own paths: `tokens-<key>` (`calib/tokens.arrow` and its record),
keyed by the checkpoint's digest, its tokenizer files, the calibration SPEC (a local file's
size and mtime), seed, windows and seqlen; and `inputs-<key>` (`acts/block_000/` and
`acts/layer_kwargs.*`), keyed also by the compute dtype, the device's kind and the batch size.

Files are hard-linked both ways (copied across file systems), so an entry costs no disk while
the run that made it keeps its files, and holds one boundary once the run has deleted its
own; delete the folder to free it. An entry is built under a temporary name and renamed, its
`entry.json` (the files' sizes; their own records hold the checksums) written last, under the
entry's lock: workers that start together capture once. A run's own records (`calib/tokens.json`, the boundary's
manifest) come with the links, so resuming never depends on the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from stages.config import PruneConfig
from stages.data.specs import parse_spec
from stages.model.checkpoint import checkpoint_digest
from stages.model.embedded import cache_root
from stages.run.rundir import RunError, atomic_write_json, link_or_copy
from stages.run.shared import warn_once

ENTRY_JSON = "entry.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def calib_cache_dir() -> Path:
    """`$SPARSEGPT_CALIB_CACHE`, else `$SPARSEGPT_CACHE/calib` (the test suite points it at a fresh folder)."""
    return Path(os.environ.get("SPARSEGPT_CALIB_CACHE") or cache_root() / "calib").expanduser()


def _digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _tokenizer_digest(model_dir: Path) -> str:
    h = hashlib.sha256()
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + b"\0" + (model_dir / name).read_bytes())
    return h.hexdigest()[:16]


def calib_key(cfg: PruneConfig, model_dir: Path) -> dict[str, Any]:
    """What shapes the calibration windows of ``cfg`` drawn with ``model_dir``'s tokenizer."""
    path = parse_spec(cfg.calib.spec).path
    stamp = [path.stat().st_size, path.stat().st_mtime_ns] if path is not None and Path(path).is_file() else None
    c = cfg.calib
    return {
        "model": checkpoint_digest(model_dir),
        "tokenizer": _tokenizer_digest(model_dir),
        "spec": c.spec,
        "file": stamp,
        "seed": c.seed,
        "windows": cfg.windows,
        "seqlen": c.seqlen,
    }


def tokens_entry(cfg: PruneConfig, model_dir: Path) -> Path | None:
    """The shared entry of the calibration windows, or None with the cache off."""
    if not cfg.runtime.cache:
        return None
    return calib_cache_dir() / f"tokens-{_digest(calib_key(cfg, model_dir))}"


def inputs_entry(cfg: PruneConfig, model_dir: Path, dtype: torch.dtype) -> Path | None:
    """The shared entry of block 0's inputs and the layer kwargs, or None with the cache off."""
    if not cfg.runtime.cache:
        return None
    key = {
        **calib_key(cfg, model_dir),
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.device(cfg.runtime.device).type,
        "batch_size": cfg.runtime.batch_size,
    }
    return calib_cache_dir() / f"inputs-{_digest(key)}"


def _complete(entry: Path) -> dict[str, int] | None:
    """{name: bytes} of an entry whose entry.json is there and whose files have their sizes, else None."""
    try:
        sizes = json.loads((entry / ENTRY_JSON).read_text(encoding="utf-8"))["files"]
        if all((entry / n).stat().st_size == b for n, b in sizes.items()):
            return sizes
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def fetch(entry: Path | None, root: Path) -> bool:
    """Link the files of a complete entry into the run directory ``root`` (records last); False if none."""
    if entry is None:
        return False
    sizes = _complete(entry)
    if sizes is None:
        return False
    names = sorted(sizes, key=lambda n: (n.endswith(".json"), n))  # a record only after its files
    for name in names:
        dst = root / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        link_or_copy(entry / name, dst)
    return True


def store(entry: Path | None, root: Path, files: list[Path]) -> None:
    """Make ``files`` (inside the run directory ``root``) the entry ``entry``; a cache folder that cannot be
    written is warned about once and skipped (the run has its own files)."""
    if entry is None or _complete(entry) is not None:
        return
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(entry, ignore_errors=True)  # an entry without its record is incomplete
        names = [f.relative_to(root).as_posix() for f in files]
        for f, name in zip(files, names, strict=True):
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(f, tmp / name)
        # sizes only: the files' own records (tokens.json, the boundary's manifest) hold their checksums
        atomic_write_json(tmp / ENTRY_JSON, {"files": {n: (tmp / n).stat().st_size for n in names}})
        os.replace(tmp, entry)
    except (OSError, RunError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        warn_once(entry.parent, f"cannot write the calibration cache {entry.parent} ({exc})")
