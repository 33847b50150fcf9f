"""Calibration sampling: random token windows drawn exactly as the SparseGPT reference.

`sample_calibration(tokenizer, cfg)` (a `CalibConfig`) returns an `(nsamples, seqlen)` int64 array whose
windows equal those of the reference `datautils.py` for the same seed: one token stream
(`random.randint(0, ntokens - seqlen - 1)` per sample) or, for C4, a random document
longer than `seqlen` per sample, then a random window inside it. `write_tokens` and
`read_tokens` store the array as an Arrow IPC file (`sample` int32, `input_ids`
fixed_size_list<int32>[seqlen]), written atomically; the pipeline keeps it in
`runs/<name>/calib/tokens.arrow`.
"""

import random
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from stages.data.specs import Corpus, DatasetSpec, load_corpus, parse_spec
from stages.run.rundir import atomic_path

if TYPE_CHECKING:  # a type only: the config layer sits above this one
    from stages.config.parts import CalibConfig

_LONG_WARNING = "sequence-length-is-longer-than-the-specified-maximum"


@contextmanager
def _quiet_long_sequences(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Silence the 'sequence longer than model max length' warning: we cut windows ourselves."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if not isinstance(flags, dict):
        yield
        return
    before = flags.get(_LONG_WARNING)
    flags[_LONG_WARNING] = True
    try:
        yield
    finally:
        if before is None:
            flags.pop(_LONG_WARNING, None)
        else:
            flags[_LONG_WARNING] = before


def tokenize(tokenizer: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    """Token ids of `text` as the reference gets them (`tokenizer(text).input_ids`); 1-D int64."""
    with _quiet_long_sequences(tokenizer):
        ids = tokenizer(text, return_tensors="pt").input_ids  # (1, ntokens)
    return ids[0].to(torch.int64)


def sample_calibration(tokenizer: PreTrainedTokenizerBase, cfg: "CalibConfig") -> np.ndarray:
    """Draw `cfg.nsamples` windows of `cfg.seqlen` tokens: an (nsamples, seqlen) int64 array."""
    corpus = load_corpus(cfg.spec, "calibration")
    if corpus.documents:
        return _sample_documents(tokenizer, corpus, cfg)
    return sample_stream(tokenize(tokenizer, corpus.text), cfg, label=_describe(cfg.spec))


def sample_stream(ids: torch.Tensor, cfg: "CalibConfig", label: str = "corpus") -> np.ndarray:
    """Reference windows from one token stream `ids` (ntokens,); (nsamples, seqlen) int64."""
    ntokens = int(ids.shape[0])
    if ntokens <= cfg.seqlen + 1:
        raise ValueError(
            f"calibration corpus {label} has {ntokens} tokens, too few for windows of "
            f"seqlen={cfg.seqlen} (need more than {cfg.seqlen + 1}). Use a larger corpus "
            f"or a smaller seqlen."
        )
    rng = random.Random(cfg.seed)  # same stream as random.seed(seed); leaves global state alone
    out = np.empty((cfg.nsamples, cfg.seqlen), dtype=np.int64)  # (nsamples, seqlen)
    for s in range(cfg.nsamples):
        i = rng.randint(0, ntokens - cfg.seqlen - 1)
        out[s] = ids[i : i + cfg.seqlen].numpy()
    return out


def _sample_documents(tokenizer: PreTrainedTokenizerBase, corpus: Corpus, cfg: "CalibConfig") -> np.ndarray:
    """C4 reference: per sample pick documents until one has more than seqlen tokens."""
    docs = corpus.rows
    if not docs:
        raise ValueError(f"calibration corpus {_describe(cfg.spec)} has no documents.")
    rng = random.Random(cfg.seed)
    short: set[int] = set()
    out = np.empty((cfg.nsamples, cfg.seqlen), dtype=np.int64)  # (nsamples, seqlen)
    for s in range(cfg.nsamples):
        while True:
            d = rng.randint(0, len(docs) - 1)
            ids = tokenize(tokenizer, docs[d])
            if ids.shape[0] > cfg.seqlen:
                break
            short.add(d)
            if len(short) == len(docs):
                raise ValueError(
                    f"no document of calibration corpus {_describe(cfg.spec)} has more "
                    f"than seqlen={cfg.seqlen} tokens ({len(docs)} documents). Use a smaller "
                    f"seqlen or a corpus with longer documents."
                )
        i = rng.randint(0, int(ids.shape[0]) - cfg.seqlen - 1)
        out[s] = ids[i : i + cfg.seqlen].numpy()
    return out


def write_tokens(path: Path, ids: np.ndarray, metadata: dict[str, str] | None = None) -> Path:
    """Write an (nsamples, seqlen) id array as Arrow IPC, atomically (tmp, fsync, rename)."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] < 1:
        raise ValueError(f"ids must be a 2-D (nsamples, seqlen) array, got shape {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
        raise ValueError(f"token ids must fit in int32, got range [{ids.min()}, {ids.max()}]")
    nsamples, seqlen = ids.shape
    flat = pa.array(ids.astype(np.int32, copy=False).reshape(-1), type=pa.int32())
    table = pa.table(
        {
            "sample": pa.array(np.arange(nsamples, dtype=np.int32)),
            "input_ids": pa.FixedSizeListArray.from_arrays(flat, seqlen),
        }
    )
    meta = {"seqlen": str(seqlen), **(metadata or {})}
    table = table.replace_schema_metadata({k: str(v) for k, v in meta.items()})
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a full disk becomes a one-line RunError
        with pa.ipc.new_file(f, table.schema) as writer:
            writer.write_table(table)
        f.flush()
    return path


def read_tokens(path: Path) -> np.ndarray:
    """Read an array written by `write_tokens`; returns (nsamples, seqlen) int64 in sample order."""
    with pa.memory_map(str(path), "r") as source:
        table = pa.ipc.open_file(source).read_all()
    if "input_ids" not in table.column_names or not pa.types.is_fixed_size_list(table.schema.field("input_ids").type):
        raise ValueError(f"{str(path)!r} is not a calibration token file (no fixed-size input_ids)")
    seqlen = table.schema.field("input_ids").type.list_size
    column = table.column("input_ids").combine_chunks()
    ids = column.flatten().to_numpy().astype(np.int64).reshape(-1, seqlen)
    order = np.argsort(table.column("sample").to_numpy(), kind="stable")
    return ids[order]


def _describe(spec: str | DatasetSpec) -> str:
    return f"{str(parse_spec(spec))!r}"
