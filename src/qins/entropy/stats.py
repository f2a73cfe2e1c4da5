"""Order-0 statistics of a symbol stream: histogram, entropy, the ideal coded size.

Symbols are the unpacked codes of a quantized tensor, one uint8 per code (alphabet 2^bits),
or the bytes of a float tensor (alphabet 256). Everything here is pure numpy on the CPU.
"""
from __future__ import annotations

import numpy as np


def histogram(symbols: np.ndarray, alphabet: int = 256) -> np.ndarray:
    """(alphabet,) int64 counts of each symbol value in a uint8 array."""
    if symbols.dtype != np.uint8:
        raise TypeError(f"symbols must be uint8, got {symbols.dtype}")
    counts = np.bincount(symbols.reshape(-1), minlength=alphabet)
    if counts.shape[0] > alphabet:
        raise ValueError(f"symbol {int(symbols.max())} outside the alphabet of {alphabet}")
    return counts.astype(np.int64)


def entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol of a histogram (0 for an empty one)."""
    n = int(counts.sum())
    if n == 0:
        return 0.0
    p = counts[counts > 0] / n
    return float(-(p * np.log2(p)).sum())


def ideal_bytes(counts: np.ndarray) -> float:
    """Bytes an ideal order-0 coder needs for the stream (no table): n * H0 / 8."""
    return int(counts.sum()) * entropy_bits(counts) / 8.0
