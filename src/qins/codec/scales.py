"""Group scales stored in 8 bits (`WeightConfig(scale_dtype="log8")`): a sign and a step down a
logarithmic grid from the row's largest scale, which is kept in float16.

    code (O, G) uint8     sign << 7 | k,  k = 0..127
    ref  (O,)   float16   the row's largest |scale| (the group with k = 0)
    |s| = float16(ref * 2^(-k / STEPS_PER_OCTAVE))      computed in float64, then rounded

STEPS_PER_OCTAVE = 16: neighbouring scales sit 4.4% apart and the smallest is 2^(-127/16) =
1/245 of the row's largest (a group below that takes it: a coarser scale, never a clip).
At group size 64 the scales cost 0.125 bits per weight instead of float16's 0.25, which is
what decides whether a 3.8B model fits in 2 GB at 4 bits (issue 13).

In memory the scales stay float16 (every kernel reads them unchanged); the quantizer only
produces values on the grid (`neighbours` gives the two around a scale, calibrate chooses by
error), and `encode` recovers the codes from those float16 values exactly, or refuses:
`decode(*encode(s)) == s` bit for bit. Both directions run in float64 on the CPU (IEEE
multiply of a float16 by a fixed table, one rounding to float16), so every machine gets the
same bits.
"""
from __future__ import annotations

import torch

STEPS_PER_OCTAVE = 16
LEVELS = 128                                   # k = 0..127; bit 7 is the sign
_MULT = torch.exp2(-torch.arange(LEVELS, dtype=torch.float64) / STEPS_PER_OCTAVE)   # (128,) 2^(-k/16)


def _values(ref: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """|s| for steps k (R, G) below ref (R, 1): float16 values as float32, on k's device."""
    mult = _MULT.to(k.device)[k]
    return (ref.double() * mult).to(torch.float16).float()


def row_ref(s: torch.Tensor) -> torch.Tensor:
    """(R, 1) float32, float16-representable: each row's largest |scale| (1 for a zero row)."""
    ref = s.abs().amax(dim=1, keepdim=True).to(torch.float16).float()
    return torch.where(ref > 0, ref, torch.ones_like(ref))


def neighbours(s: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The grid values just above and just below |s| (R, G), with s's sign, for ref (R, 1).

    s = 0 (an all-zero group: any scale decodes it exactly) and the row's largest |s| take
    the value at or above it only, so the row's largest stored scale is ref and `encode`
    finds the same grid again; values below the grid's end take its end."""
    mag = s.abs().float()
    k = torch.floor(-STEPS_PER_OCTAVE * torch.log2(mag / ref))
    k = torch.where(mag > 0, k, torch.zeros_like(k)).clamp(0, LEVELS - 1).long()
    sign = torch.where(s < 0, -1.0, 1.0)
    up = _values(ref, k) * sign
    down = _values(ref, (k + 1).clamp(max=LEVELS - 1)) * sign
    keep = (mag >= mag.amax(dim=1, keepdim=True)) | (mag == 0)
    return up, torch.where(keep, up, down)


def encode(scales: torch.Tensor, name: str = "scales") -> tuple[torch.Tensor, torch.Tensor]:
    """float16 (O, G) scales on the grid -> (code (O, G) uint8, ref (O,) float16), on the CPU.

    Raises ValueError when a scale is not on its row's grid (scales not made by the log8
    quantizer, or edited since): storing it in 8 bits would change the model."""
    s = scales.detach().cpu()
    if s.dtype != torch.float16 or s.dim() != 2:
        raise ValueError(f"{name}: expected (O, G) float16 scales, got {tuple(s.shape)} {s.dtype}")
    mag = s.float().abs()
    ref = mag.amax(dim=1, keepdim=True)
    if not torch.isfinite(ref).all() or (mag == 0).any():
        raise ValueError(f"{name}: a scale is zero or not finite: not a log8 scale")
    k = torch.round(-STEPS_PER_OCTAVE * torch.log2(mag / ref)).clamp(0, LEVELS - 1).long()
    for step in (-1, 1):                        # the float32 log may land one step off
        cand = (k + step).clamp(0, LEVELS - 1)
        k = torch.where(_values(ref, cand) == mag, cand, k)
    bad = int((_values(ref, k) != mag).sum())
    if bad:
        raise ValueError(f"{name}: {bad} scales are not on the log8 grid of their row (made with "
                         f"another scale_dtype, or edited): re-quantize, or save with float16 scales")
    code = (k | torch.where(s < 0, 128, 0)).to(torch.uint8)
    return code, ref.reshape(-1).to(torch.float16)


def decode(code: torch.Tensor, ref: torch.Tensor, name: str = "scales") -> torch.Tensor:
    """(code (O, G) uint8, ref (O,) float16) -> float16 (O, G) scales, on the CPU."""
    code, ref = code.detach().cpu(), ref.detach().cpu()
    if code.dtype != torch.uint8 or code.dim() != 2 or ref.dtype != torch.float16 \
            or tuple(ref.shape) != (code.shape[0],):
        raise ValueError(f"{name}: expected (O, G) uint8 codes and (O,) float16 references, got "
                         f"{tuple(code.shape)} {code.dtype} and {tuple(ref.shape)} {ref.dtype}")
    r = ref.float().reshape(-1, 1)
    if not (torch.isfinite(r) & (r > 0)).all():
        raise ValueError(f"{name}: a row's reference scale is zero, negative or not finite")
    c = code.long()
    mag = _values(r, c & (LEVELS - 1))
    return torch.where(c >= LEVELS, -mag, mag).to(torch.float16)


def nbytes(rows: int, groups: int) -> int:
    """Bytes stored for (rows, groups) log8 scales: one code per group, one float16 per row."""
    return rows * groups + 2 * rows


__all__ = ["LEVELS", "STEPS_PER_OCTAVE", "decode", "encode", "nbytes", "neighbours", "row_ref"]
