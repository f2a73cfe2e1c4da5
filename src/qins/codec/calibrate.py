"""Calibration: choose the curvature a and each group's scale clip by (weighted) error.

Error of a group = sum_j h_j (x_j - q_j)^2, with h = 1 (weight MSE, no data) or
h_j = E[x_j^2] of the layer's input channel j (activation-weighted, from calibration text;
the diagonal of the layer's Hessian).

Groups run along the input dimension (codec/grid.py). Everything runs on the weight's device
(CUDA when the model is there); the decode tables are built on the CPU (a few hundred
float64 values) and moved once. Rows are independent once the curvature is chosen, so the
clip search runs on chunks of rows: its temporaries, about ten (rows, I) float32/int64
tensors, stay under CHUNK_ELEMENTS elements each.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .formats import Format, n_levels, table
from . import scales as log8
from .gptq import gptq_codes
from .grid import expand_groups, group_reduce, lookup, n_groups, nearest_codes

# Candidate curvatures: 0 (uniform INT) then geometric; refined around the best point.
CURVATURE_GRID = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.5, 6.0, 9.0, 13.0, 20.0)
_SEARCH_ROWS = 128          # curvature is searched on a strided sample of rows
# elements per row chunk: 2^24 float32 = 64 MiB per temporary; a 4096 x 14336 matrix runs in
# 4 chunks of 1170 rows, peak about 1 GiB above the weight on any device
CHUNK_ELEMENTS = 1 << 24


def clip_grid(bits: int) -> tuple[float, ...]:
    if bits <= 3:
        return (1.0, 0.93, 0.86, 0.79, 0.72, 0.65)
    if bits <= 4:
        return (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)
    if bits <= 6:
        return (1.0, 0.97, 0.94, 0.91, 0.88)
    return (1.0, 0.985, 0.97, 0.955, 0.94)


def _round_scale(s: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Scales are stored in fp16; quantize against the stored value.

    check: raise if a value overflows fp16 (one host sync; the clip search checks its
    largest clip only, which overflows whenever a smaller one does)."""
    s16 = s.to(torch.float16)
    if check and torch.isinf(s16).any():
        raise ValueError("a group's range exceeds the float16 scale range (|x| > 65504)")
    return s16.float()


@dataclass
class GroupParams:
    scale: torch.Tensor              # (O, G) float32, fp16-representable
    offset: torch.Tensor | None      # (O, G) float32, fp16-representable (asymmetric only)


def _extremes(x: torch.Tensor, g: int, fmt: Format) -> tuple[torch.Tensor, ...]:
    """The per-group extremes (R, G) a scale is a clip of; independent of the clip."""
    if fmt.asymmetric:
        return group_reduce(x, g, "amin").clamp(max=0), group_reduce(x, g, "amax").clamp(min=0)
    if fmt.signed_scale:
        hi, lo = group_reduce(x, g, "amax"), group_reduce(x, g, "amin")
        return (torch.where(hi >= -lo, hi, lo),)                    # sign of the extreme weight
    return (group_reduce(x.abs(), g, "amax"),)


def _params(ext: tuple[torch.Tensor, ...], fmt: Format, bits: int, clip, check: bool = True) -> GroupParams:
    if fmt.asymmetric:
        lo, hi = ext[0] * clip, ext[1] * clip
        s = _round_scale((hi - lo) / (2**bits - 1), check)
        s = torch.where(s > 0, s, torch.ones_like(s))
        return GroupParams(s, _round_scale(lo, check))              # offsets are fp16 too
    s = _round_scale(ext[0] * clip, check)
    if fmt.signed_scale:
        return GroupParams(torch.where(s != 0, s, torch.ones_like(s)), None)
    return GroupParams(torch.where(s > 0, s, torch.ones_like(s)), None)


def group_params(x: torch.Tensor, g: int, fmt: Format, bits: int, clip, check: bool = True) -> GroupParams:
    """x (O, I) -> per-group scale (and offset) for a clip factor (scalar or (O, G))."""
    return _params(_extremes(x, g, fmt), fmt, bits, clip, check)


def _encode(x, levels, s, m):
    """x (R, I) with per-column scale s and offset m (R, I) -> (codes int64, dequantized)."""
    y = (x - m) / s if m is not None else x / s
    codes = nearest_codes(y, levels)
    q = lookup(levels, codes) * s
    if m is not None:
        q = q + m
    return codes, q


def _group_error(x, q, h, g):
    """(R, G) float64 sum of h (x - q)^2 over each group.

    The terms are float32 and identical on every device; they are summed in float64 so that
    the choices made from these sums (clip per group, curvature) do not depend on the order
    a device adds them in (float32 sums differed by ~1e-7 relative between orders, enough to
    flip a near-tie between two refinement curvatures)."""
    return group_reduce(((x - q) ** 2 * h).double(), g, "sum")


def _expand(p: GroupParams, g: int, I: int):
    return expand_groups(p.scale, g, I), expand_groups(p.offset, g, I) if p.offset is not None else None


def _best_per_group(x, h, g, levels, candidates, keep: bool):
    """Of the candidate GroupParams (an iterable), each group's lowest-error one, on rows x (R, I);
    the first candidate wins a tie.

    Returns (err (R, G) float64, index (R, G) int64 of each group's winner, codes (R, I) uint8 or
    None, GroupParams or None): the winners' codes and parameters when `keep` (no second
    encoding pass).
    """
    I = x.shape[1]
    best_err = best_idx = best_codes = best_p = None
    for i, p in enumerate(candidates):
        codes, q = _encode(x, levels, *_expand(p, g, I))
        err = _group_error(x, q, h, g)
        if best_err is None:
            best_err, best_idx = err, torch.zeros(err.shape, dtype=torch.long, device=x.device)
            if keep:
                best_codes, best_p = codes.to(torch.uint8), p
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_idx = torch.where(better, i, best_idx)
        if keep:
            best_codes = torch.where(expand_groups(better, g, I), codes.to(torch.uint8), best_codes)
            best_p = GroupParams(torch.where(better, p.scale, best_p.scale),
                                 None if p.offset is None else torch.where(better, p.offset, best_p.offset))
    return best_err, best_idx, best_codes, best_p


def _clip_search(x, h, g, fmt, bits, levels, clips, keep: bool = False):
    """Per-group error minimized over clip factors, on rows x (R, I).

    Returns (err (R, G) float64, clip (R, G) float32, codes (R, I) uint8 or None, GroupParams or
    None): the codes and parameters of each group's best clip when `keep`.
    """
    ext = _extremes(x, g, fmt)
    top = max(clips)
    cands = (_params(ext, fmt, bits, c, check=c == top) for c in clips)
    err, idx, codes, p = _best_per_group(x, h, g, levels, cands, keep)
    return err, torch.tensor(clips, dtype=torch.float32, device=x.device)[idx], codes, p


def _snap_log8(x, h, g, levels, p: GroupParams):
    """Put each group's chosen scale on the log8 grid of its row (codec/scales.py): of the two
    grid values around it, the one with the lower error, and re-encode the codes for it.

    x (R, I) rows, p.scale (R, G) their chosen scales.
    Returns (codes (R, I) uint8, scale (R, G) float32 on the grid)."""
    zero = group_reduce(x.abs(), g, "amax") == 0               # all-zero groups: any scale is exact
    s = torch.where(zero, torch.zeros_like(p.scale), p.scale)
    cands = (GroupParams(c, None) for c in log8.neighbours(s, log8.row_ref(s)))
    _, _, codes, best = _best_per_group(x, h, g, levels, cands, keep=True)
    return codes, best.scale


def _best_clip_error(x, h, g, fmt, bits, levels, clips):
    """Per-group error minimized over clip factors -> (err (O, G), best clip (O, G))."""
    err, clip, _, _ = _clip_search(x, h, g, fmt, bits, levels, clips)
    return err, clip


def _row_chunks(O: int, I: int):
    step = max(1, CHUNK_ELEMENTS // max(I, 1))
    return [(r, min(r + step, O)) for r in range(0, O, step)]


def _levels(fmt: Format, bits: int, a: torch.Tensor | None, device) -> torch.Tensor:
    """The first n_levels entries of the decode table on `device`: (n,) shared or (A, n)."""
    n = n_levels(fmt, bits)
    levels = (table(fmt, bits, a) if a is not None else table(fmt, bits))[:, :n]
    return (levels[0] if levels.shape[0] == 1 else levels).to(device)


def fit(
    w: torch.Tensor,
    fmt: Format,
    bits: int,
    group_size: int,
    *,
    importance: torch.Tensor | None = None,
    curvature: str = "tensor",
    curvature_value: float | None = None,
    clip_search: bool = True,
    hessian: torch.Tensor | None = None,
    rounding: str = "nearest",
    scale_dtype: str = "float16",
):
    """Calibrate and encode w (O, I) in groups of `group_size` along I, on w's device.

    hessian   (I, I) E[x x^T] of the layer's input: its diagonal weights the error (when no
              `importance` is given) and rounding="gptq" compensates rounding errors with it
              (codec/gptq.py); the curvature and scales are fitted first either way.
    scale_dtype "float16", or "log8": each group's chosen scale then moves to the better of
              the two log8 grid values around it (codec/scales.py) before the codes are
              final (the curvature search itself uses unsnapped scales).
    importance and hessian may sit on another device: they are moved to w's.

    Returns (codes (O, I) uint8 (nearest) or int64 (gptq), scale (O, G), offset (O, G) or
    None, curvature (A,) or None), all on w's device.
    """
    O, I = w.shape
    dev = w.device
    x = w.float()
    if rounding not in ("nearest", "gptq"):
        raise ValueError(f"rounding must be 'nearest' or 'gptq', got {rounding!r}")
    if importance is None and hessian is not None:
        importance = torch.diagonal(hessian)
    h = (torch.ones(1, I, device=dev) if importance is None
         else importance.to(dev).float().clamp(min=0).reshape(1, I))
    clips = clip_grid(bits) if clip_search else (1.0,)

    a = None
    if fmt.curved:
        if curvature_value is not None:
            a = torch.full((O if curvature == "channel" else 1,), float(curvature_value))
            levels = _levels(fmt, bits, a, dev)
            a = a.to(dev)
        else:
            a, levels = _search_curvature(x, h, group_size, fmt, bits, per_row=curvature == "channel")
    else:
        levels = _levels(fmt, bits, None, dev)

    G = n_groups(I, group_size)
    codes = torch.empty(O, I, dtype=torch.uint8, device=dev)
    scale = torch.empty(O, G, device=dev)
    offset = torch.empty(O, G, device=dev) if fmt.asymmetric else None
    for r0, r1 in _row_chunks(O, I):
        lev = levels if levels.dim() == 1 else levels[r0:r1]
        _, _, c, p = _clip_search(x[r0:r1], h, group_size, fmt, bits, lev, clips, keep=True)
        if scale_dtype == "log8":
            c, snapped = _snap_log8(x[r0:r1], h, group_size, lev, p)
            p = GroupParams(snapped, p.offset)
        codes[r0:r1] = c
        scale[r0:r1] = p.scale
        if offset is not None:
            offset[r0:r1] = p.offset
    if rounding == "gptq" and hessian is not None:
        s = expand_groups(scale, group_size, I)
        m = expand_groups(offset, group_size, I) if offset is not None else None
        codes = gptq_codes(x, hessian.to(dev).float(), levels, s, m)
    return codes, scale, offset, a


def _search_curvature(x, h, g, fmt, bits, per_row):
    """Grid then local refinement of a; per tensor on a row sample, or per row on all rows.

    Returns (a (A,) float32, levels (n,) or (O, n)) on x's device. The scales (clip 1.0) do
    not depend on a: they are computed once per row chunk and every candidate reuses them.
    """
    dev = x.device
    O, I = x.shape
    if not per_row and O > _SEARCH_ROWS:
        # the sample indices come from the CPU so that every device picks the same rows
        xs = x[torch.linspace(0, O - 1, _SEARCH_ROWS).round().long().to(dev)]
    else:
        xs = x

    # The clip is searched after a is fixed: searching both jointly measured 0.00 dB better
    # at 8 bits and 0.02 dB at 4 bits on the default model's layers, at 2x the time.
    def errors(cand: torch.Tensor) -> torch.Tensor:
        """(n_a, rows) error of each candidate's table (n_a, n) at clip 1.0."""
        out = []
        for r0, r1 in _row_chunks(xs.shape[0], I):
            xc = xs[r0:r1]
            p = group_params(xc, g, fmt, bits, 1.0)
            s, m = _expand(p, g, I)
            out.append(torch.stack([_group_error(xc, _encode(xc, lev, s, m)[1], h, g).sum(-1) for lev in cand]))
        return torch.cat(out, dim=1)

    grid = torch.tensor(CURVATURE_GRID, dtype=torch.float64)
    tabs = _levels(fmt, bits, grid, dev)                            # (n_a, n)
    errs = errors(tabs)                                             # (n_a, rows)
    if per_row:
        best = errs.argmin(0)                                       # (O,), no host sync
        return grid.float().to(dev)[best], tabs[best]
    total = errs.sum(-1)
    i = int(total.argmin())
    lo = CURVATURE_GRID[max(i - 1, 0)]
    hi = CURVATURE_GRID[min(i + 1, len(CURVATURE_GRID) - 1)]
    cands = [CURVATURE_GRID[i]] + torch.linspace(lo, hi, 6)[1:-1].tolist()
    refined = errors(_levels(fmt, bits, torch.tensor(cands[1:], dtype=torch.float64), dev)).sum(-1)
    # the grid's best first: ties keep it, then the first refinement (argmin takes the first)
    j = int(torch.cat([total[i:i + 1], refined]).argmin())
    a = torch.tensor([cands[j]], dtype=torch.float32)
    return a.to(dev), _levels(fmt, bits, a, dev)
