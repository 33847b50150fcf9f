"""Training data of the fine-tune stage: fixed-length token windows read in a seeded order.

`prepare_windows` tokenizes the text of a dataset SPEC once (as `stages.data.calibration`
does), cuts the stream into non-overlapping windows of `seqlen` tokens (the remainder
dropped) and stores them with `write_tokens` as an Arrow token file; a later call with
the same SPEC and seqlen reuses the file. `TokenWindows` memory-maps that file and
serves micro-batches by *data position*, the number of windows consumed so far: epoch
`e` visits the windows in the permutation `default_rng([seed, e])`, so the batch at a
position depends on nothing else, and the position alone is the data state a
checkpoint has to keep.
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from transformers import PreTrainedTokenizerBase

from stages.data.calibration import tokenize, write_tokens
from stages.data.specs import load_corpus, parse_spec


def prepare_windows(tokenizer: PreTrainedTokenizerBase, spec: str, seqlen: int, path: Path) -> Path:
    """Write (once) the non-overlapping `seqlen` windows of `spec`'s text to `path`; return `path`."""
    label = str(parse_spec(spec))
    if path.is_file() and _metadata(path) == {"dataset": label, "seqlen": str(seqlen)}:
        return path
    ids = tokenize(tokenizer, load_corpus(spec, "calibration").text)  # (ntokens,)
    nwin = int(ids.shape[0]) // seqlen
    if nwin < 1:
        raise ValueError(
            f"training corpus {label!r} has {ids.shape[0]} tokens, fewer than one window of "
            f"seqlen={seqlen}; use a larger corpus or a smaller seqlen"
        )
    windows = ids[: nwin * seqlen].reshape(nwin, seqlen).numpy()  # (nwin, seqlen)
    return write_tokens(path, windows, metadata={"dataset": label})


def _metadata(path: Path) -> dict[str, str]:
    try:
        with pa.memory_map(str(path), "r") as source:
            meta = pa.ipc.open_file(source).schema.metadata or {}
    except (OSError, pa.ArrowInvalid):
        return {}
    return {k.decode(): v.decode() for k, v in meta.items() if k in (b"dataset", b"seqlen")}


class TokenWindows:
    """The windows of a token file, served by data position in per-epoch seeded permutations."""

    def __init__(self, path: Path, seed: int) -> None:
        self._source = pa.memory_map(str(path), "r")
        table = pa.ipc.open_file(self._source).read_all()
        column = table.column("input_ids").combine_chunks()
        self.seqlen: int = column.type.list_size
        order = np.argsort(table.column("sample").to_numpy(), kind="stable")
        flat = column.flatten().to_numpy(zero_copy_only=False)  # zero-copy from the mmap when unchunked
        self._ids = flat.reshape(-1, self.seqlen)  # (nwin, seqlen) int32
        self._order = None if np.array_equal(order, np.arange(len(order))) else order
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return int(self._ids.shape[0])

    def permutation(self, epoch: int) -> np.ndarray:
        """The order in which epoch `epoch` visits the windows."""
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self)))
        return self._perm[1]

    def batch(self, position: int, size: int) -> torch.Tensor:
        """Windows `position .. position+size-1` of the endless seeded stream: (size, seqlen) int64."""
        rows = []
        for p in range(position, position + size):
            epoch, k = divmod(p, len(self))
            index = int(self.permutation(epoch)[k])
            if self._order is not None:
                index = int(self._order[index])
            rows.append(self._ids[index])
        return torch.from_numpy(np.stack(rows).astype(np.int64))
