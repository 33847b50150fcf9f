"""Perplexity on non-overlapping windows, computed as the SparseGPT reference does.

`eval_windows(tokenizer, spec, seqlen)` tokenizes the evaluation text of a dataset SPEC
once and cuts it into `ntokens // seqlen` windows (remainder dropped; C4 first keeps
256 * seqlen tokens). `perplexity(forward, windows)` runs any callable mapping a
`(b, seqlen)` LongTensor to logits `(b, seqlen, vocab)` (a whole HF model through
`causal_lm_forward`, or a block-by-block runner), takes the shifted causal LM loss per
window in fp32, and returns `exp(sum(loss * seqlen) / (nwin * seqlen))`.
"""

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from stages.data.calibration import tokenize
from stages.data.specs import DatasetSpec, load_corpus, parse_spec

Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Perplexity:
    """Result of one perplexity evaluation."""

    ppl: float
    """exp of the mean next-token loss over all windows."""
    windows: int
    """Number of windows evaluated."""
    seqlen: int
    """Tokens per window."""

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict for metrics.json: {"ppl", "windows", "seqlen"}."""
        return asdict(self)


def eval_windows(
    tokenizer: PreTrainedTokenizerBase,
    spec: str | DatasetSpec,
    seqlen: int,
    max_windows: int | None = None,
) -> torch.Tensor:
    """Non-overlapping eval windows of `spec`: (nwin, seqlen) int64; the first `max_windows`."""
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    spec = parse_spec(spec)
    corpus = load_corpus(spec, "evaluation")
    ids = tokenize(tokenizer, corpus.text)  # (ntokens,)
    if corpus.max_tokens_per_seqlen is not None:
        ids = ids[: corpus.max_tokens_per_seqlen * seqlen]
    nwin = ids.shape[0] // seqlen
    if nwin == 0:
        raise ValueError(
            f"evaluation corpus {str(spec)!r} has {ids.shape[0]} tokens, fewer than one "
            f"window of seqlen={seqlen}. Use a larger corpus or a smaller seqlen."
        )
    if max_windows is not None:
        nwin = min(nwin, max_windows)
    return ids[: nwin * seqlen].reshape(nwin, seqlen).contiguous()


def window_losses(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss per window, fp32: logits (b, seqlen, vocab), ids (b, seqlen) -> (b,)."""
    shift_logits = logits[:, :-1, :].float()  # (b, seqlen-1, vocab)
    shift_labels = ids[:, 1:].to(logits.device)  # (b, seqlen-1)
    loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none")
    return loss.view(shift_labels.shape).mean(dim=1)


def perplexity(
    forward: Forward,
    windows: torch.Tensor,
    batch_size: int = 1,
    progress: bool = False,
    desc: str = "perplexity",
) -> Perplexity:
    """Perplexity of `forward` (ids (b, seqlen) -> logits (b, seqlen, vocab)) over `windows`."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty (nwin, seqlen) tensor, got {tuple(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    nwin, seqlen = windows.shape
    total_nll = 0.0
    with torch.inference_mode(), tqdm(total=nwin, desc=desc, disable=not progress) as bar:
        for start in range(0, nwin, batch_size):
            batch = windows[start : start + batch_size]  # (b, seqlen)
            logits = forward(batch)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 3 or logits.shape[:2] != batch.shape:
                got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
                raise ValueError(
                    f"forward must return logits of shape (b, seqlen, vocab) = "
                    f"({batch.shape[0]}, {seqlen}, vocab), got {got}; wrap an HF model "
                    f"with causal_lm_forward(model)."
                )
            total_nll += float((window_losses(logits, batch).double() * seqlen).sum())
            bar.update(batch.shape[0])
    return Perplexity(ppl=math.exp(total_nll / (nwin * seqlen)), windows=nwin, seqlen=seqlen)


def causal_lm_forward(model: torch.nn.Module, device: torch.device | str | None = None) -> Forward:
    """Adapt a Hugging Face causal LM to `Forward`: moves ids to `device` and returns `.logits`."""
    target = torch.device(device) if device is not None else next(model.parameters()).device

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids.to(target), use_cache=False).logits

    return forward


def evaluate_perplexity(
    forward: Forward,
    tokenizer: PreTrainedTokenizerBase,
    spec: str | DatasetSpec,
    seqlen: int,
    batch_size: int = 1,
    max_windows: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """`eval_windows` then `perplexity`, labelled with the spec for the progress bar."""
    windows = eval_windows(tokenizer, spec, seqlen, max_windows=max_windows)
    label = parse_spec(spec).label
    return perplexity(forward, windows, batch_size=batch_size, progress=progress, desc=f"ppl {label}")
