"""The code grid: groups along the input dimension, nearest levels, table lookup.

A leaf below calibration, GPTQ and decoding. A row of I columns is cut into
G = max(1, I // g) groups of g columns; the last group also takes the remainder I mod g
(so g <= last < 2g), and the stored overhead per weight never exceeds the nominal 16/g bits.
"""
from __future__ import annotations

import torch


def n_groups(in_features: int, group_size: int) -> int:
    return max(1, in_features // group_size)


def group_reduce(t: torch.Tensor, group_size: int, op: str) -> torch.Tensor:
    """(R, I) -> (R, G) with op in 'amax', 'amin', 'sum' over each group's columns."""
    R, I = t.shape
    G = n_groups(I, group_size)
    cut = (G - 1) * group_size
    fn = {"amax": torch.amax, "amin": torch.amin, "sum": torch.sum}[op]
    last = fn(t[:, cut:], dim=1, keepdim=True)
    if G == 1:
        return last
    return torch.cat([fn(t[:, :cut].reshape(R, G - 1, group_size), dim=2), last], dim=1)


def expand_groups(p: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """(R, G) per-group values -> (R, I) per-column values.

    Built from views and one concatenation: no host sync, so it runs inside a CUDA graph.
    """
    R, G = p.shape
    last = p[:, G - 1:].expand(R, in_features - (G - 1) * group_size)
    if G == 1:
        return last.contiguous()
    head = p[:, :G - 1, None].expand(R, G - 1, group_size).reshape(R, (G - 1) * group_size)
    return torch.cat([head, last], dim=1)


def midpoints(levels: torch.Tensor) -> torch.Tensor:
    """(n-1,) or (R, n-1) decision boundaries between sorted levels (n,) or (R, n)."""
    return (levels[..., 1:] + levels[..., :-1]) * 0.5


def nearest_codes(y: torch.Tensor, levels: torch.Tensor, mids: torch.Tensor | None = None) -> torch.Tensor:
    """Index of the nearest level (ties to the lower); y (R, I), levels (n,) or (R, n).

    mids: `midpoints(levels)` when the caller has them (GPTQ calls this once per column)."""
    if mids is None:
        mids = midpoints(levels)
    if mids.dim() == 1:
        return torch.bucketize(y, mids)
    return torch.searchsorted(mids.contiguous(), y.contiguous())


def lookup(levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    return levels[codes] if levels.dim() == 1 else torch.gather(levels, 1, codes)
