"""What a prune asks for, checked without torch: sparsity, N:M, the quantization spec.

Plain Python, so that the command line refuses bad arguments before importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass


def check_sparsity(sparsity: float) -> None:
    """Raise unless ``0 <= sparsity < 1``."""
    if not (isinstance(sparsity, (int, float)) and 0 <= sparsity < 1):
        raise ValueError(f"sparsity must be a fraction in [0, 1) (e.g. 0.5), got {sparsity!r}")


def check_nm(prune_n: int, prune_m: int, cols: int, blocksize: int | None = None) -> None:
    """Raise unless ``(prune_n, prune_m)`` is ``(0, 0)`` or a valid N:M for ``cols`` columns."""
    if prune_n == 0 and prune_m == 0:
        return
    if not (isinstance(prune_n, int) and isinstance(prune_m, int) and 0 < prune_n < prune_m):
        raise ValueError(f"N:M sparsity needs integers 0 < N < M (e.g. 2:4 or 4:8), got {prune_n}:{prune_m}")
    if cols % prune_m:
        raise ValueError(
            f"N:M sparsity {prune_n}:{prune_m} needs the input width ({cols}) to be a multiple of "
            f"M={prune_m}; choose an M that divides {cols}"
        )
    if blocksize is not None and blocksize % prune_m:
        raise ValueError(
            f"blocksize ({blocksize}) must be a multiple of M={prune_m} so that N:M groups "
            "do not straddle blocks; e.g. use blocksize 128"
        )


@dataclass(frozen=True)
class QuantSpec:
    """How surviving weights are quantized during the solve."""

    bits: int = 4
    """Bits per weight, 2-8: ``2**bits`` levels per output channel (or group)."""
    groupsize: int = 0
    """Input columns per grid; 0 means one grid per output channel."""

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 8):
            raise ValueError(f"wbits must be an integer in 2..8, got {self.bits!r}")
        if not (isinstance(self.groupsize, int) and self.groupsize >= 0):
            raise ValueError(f"groupsize must be 0 (per channel) or a positive integer, got {self.groupsize!r}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1
