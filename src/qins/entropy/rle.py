"""Run-length coding of a uint8 symbol stream (KV pages: runs of equal codes).

    blob = u32 runs | value[runs] u8 | length[runs] u8      a run longer than 255 is split

`encode` / `decode` are exact inverses; `rle_bytes` is the blob size without building it.
RLE pays only where runs average well over 2 symbols (policy.py measures it per stream).
"""
from __future__ import annotations

import struct

import numpy as np

from .coders import CoderError


def _runs(sym: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if sym.size == 0:
        return np.zeros(0, np.uint8), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], sym[1:] != sym[:-1]]))
    lengths = np.diff(np.append(starts, sym.size))
    return sym[starts], lengths


def rle_bytes(sym: np.ndarray) -> int:
    """Size of encode(sym) in bytes."""
    _, lengths = _runs(sym)
    return 4 + 2 * int((-(-lengths // 255)).sum())


def encode(sym: np.ndarray) -> bytes:
    if sym.dtype != np.uint8 or sym.ndim != 1:
        raise TypeError("rle.encode expects a 1-D uint8 array")
    values, lengths = _runs(sym)
    pieces = -(-lengths // 255)                              # runs split into <= 255
    v = np.repeat(values, pieces)
    ln = np.full(v.size, 255, dtype=np.int64)
    last = np.cumsum(pieces) - 1
    ln[last] = lengths - 255 * (pieces - 1)
    return struct.pack("<I", v.size) + v.tobytes() + ln.astype(np.uint8).tobytes()


def decode(blob: bytes, n: int) -> np.ndarray:
    if len(blob) < 4:
        raise CoderError("rle blob too short")
    (k,) = struct.unpack_from("<I", blob)
    if len(blob) != 4 + 2 * k:
        raise CoderError(f"rle blob of {len(blob)} bytes does not hold {k} runs")
    v = np.frombuffer(blob, np.uint8, k, 4)
    ln = np.frombuffer(blob, np.uint8, k, 4 + k).astype(np.int64)
    if (ln == 0).any() or int(ln.sum()) != n:
        raise CoderError(f"rle runs cover {int(ln.sum())} symbols, expected {n}")
    return np.repeat(v, ln)
