"""Rotated values: the cache quantizes each value token turned by an orthonormal Hadamard matrix.

Why. Values are quantized per token over the D channels of a head, on the token's extreme, so a
few large channels set every channel's step. A Hadamard rotation spreads each channel over all
of them, so the extremes shrink against the rest (QuaRot's observation; experiments/kv_probe:
the values' attention error 5.0e-3 -> 3.6e-3). Attention is linear in the values, so the cache
can hold V R and turn the result back: softmax(...) (V R) R^T = softmax(...) V.

How. R is block-diagonal: Sylvester Hadamard blocks of the largest power of two dividing D,
scaled to be orthonormal (R R^T = I). A sealed value token is multiplied by R before it is
quantized; decoded values are multiplied by R^T before they are returned (the reference), or,
on the kernel path, the float segment is multiplied by R, attention runs in the rotated frame
and its output is multiplied by R^T (kv/attention.py). Nothing is stored.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def value_rotation(D: int, device: str = "cpu") -> torch.Tensor:
    """(D, D) float32 orthonormal block-Hadamard matrix (blocks of the largest power of two dividing
    D) on `device`; one shared tensor per (D, device), never written to."""
    if D < 2:
        raise ValueError(f"value rotation needs a head dim of at least 2, got {D}")
    b = D & -D                                     # largest power of two dividing D
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*([h / b ** 0.5] * (D // b))).to(device=device, dtype=torch.float32)


def turn(x: torch.Tensor, R: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x (..., D) @ R (inverse: @ R^T) in float32, returned in float32."""
    return torch.matmul(x.float(), R.T if inverse else R)
