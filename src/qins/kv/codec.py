"""KV codec: keys quantized per channel over a group of tokens, values per token.

Math (KIVI's split; DESIGN's QINS format). Each group decodes as x = s * lut[code] or, with a
zero point, x = m + s * lut[code]:

    keys    (B, H, T, D): a group is G consecutive tokens of one channel (b, h, d).
            With a zero point (default below 8 bits): m = the group's mid-range, s = its
            half-range, lut = zero_point_table (2^b levels symmetric on [-1, 1], both ends
            exact). Without (8 bits): a fixed per-channel offset is subtracted first (cache.py)
            and s = the group's signed extreme (qins) or max |x| (int-sym).
    values  (B, H, T, D): a group is the D channels of one token of one head; s = the
            signed extreme (qins table: the extreme lands exactly on the top level) or max
            |x| (int-sym), optionally with a zero point as for keys.

`lut` comes from `codec.formats.table(format, bits, a)` (or zero_point_table), a the qins
curvature (more levels near the centre as a grows; int-sym: a = 0). Codes are the nearest
level (ties to the lower); scales and zero points are stored in fp16 and the codes are chosen
against the stored fp16 values.

Mixed-width keys (a key plan, plan.py) use the same zero-point quantizer per channel at
that channel's width (`quantize_keys_mixed`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.formats import get_format, n_levels, table


_FP16_MAX = 65504.0

def zero_point_table(bits: int, curvature: float = 0.0) -> torch.Tensor:
    """(2^bits,) float32 levels symmetric about 0 on [-1, 1], for groups that store a zero
    point m and a half-range r (x = m + r * level): t_j = (2j - L + 1) / (L - 1), j < L = 2^b,
    level = sign(t) v(|t|) with the qins curve v(t) = t / (1 + a (1 - t)). a = 0 is uniform
    asymmetric INT (KIVI's grid); a > 0 puts more levels near the group's mid-range m. Both
    ends (the group's min and max) are exact levels; no level is 0 (zero is not exact)."""
    L = 2 ** bits
    t = (2 * torch.arange(L, dtype=torch.float64) - (L - 1)) / (L - 1)
    a = float(curvature)
    return (torch.sign(t) * (t.abs() / (1.0 + a * (1.0 - t.abs())))).to(torch.float32)

@dataclass(frozen=True)
class Codec:
    """The decode table of one (format, bits, curvature, zero point) and its rounding midpoints.

    zero_point=False: x = s * lut[code], s the group's signed extreme (qins) or max |x|
                      (int-sym); lut = codec.formats.table(format, bits, a).
    zero_point=True:  x = m + s * lut[code], m the group's mid-range, s its half-range;
                      lut = zero_point_table(bits, a) (int-sym: a = 0, uniform).
    """

    format: str
    bits: int
    curvature: float
    lut: torch.Tensor       # (2^bits,) float32 decode table
    mids: torch.Tensor      # (n_levels - 1,) float32 midpoints between real levels
    signed_scale: bool
    zero_point: bool = False

    @classmethod
    def build(cls, fmt: str, bits: int, curvature: float = 0.0, zero_point: bool = False) -> "Codec":
        f = get_format(fmt)
        if zero_point:
            t = zero_point_table(bits, curvature if f.curved else 0.0)
            n = t.numel()
        else:
            t = table(f, bits, curvature)[0].float()                  # (2^bits,)
            n = n_levels(f, bits)
        lv = t[:n]
        return cls(fmt, bits, float(curvature), t.contiguous(), ((lv[1:] + lv[:-1]) * 0.5).contiguous(),
                   f.signed_scale and not zero_point, zero_point)

    # -- group parameters ------------------------------------------------------------------
    def params(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp16 (scale, zero point or None) of groups along `dim` (kept as size 1)."""
        if self.zero_point:
            return zero_point_params(x, dim)                          # r = 0: constant group, x = m
        hi = x.amax(dim, keepdim=True)
        lo = x.amin(dim, keepdim=True)
        s = torch.where(hi >= -lo, hi, lo) if self.signed_scale else torch.maximum(hi, -lo)
        s = s.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)        # |x| beyond fp16 saturates
        return torch.where(s == 0, torch.ones_like(s), s), None

    def encode(self, x: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (uint8, shape of x) of (x - m) / s; s, m broadcastable, fp16."""
        y = x.float() - m.float() if m is not None else x.float()
        s = s.float()
        y = (y / torch.where(s == 0, torch.ones_like(s), s)).clamp_(-1.0, 1.0)
        return torch.bucketize(y, self.mids).to(torch.uint8)

    def decode(self, codes: torch.Tensor, s: torch.Tensor, m: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        vals = self.lut.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
        vals = vals.mul_(s.float()) if m is None else torch.addcmul(m.float(), vals, s.float())
        return vals.to(dtype)

def key_offset(k: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, 1, D) fp16 per-channel mid-range (max + min) / 2."""
    kf = k.float()
    m = (kf.amax(2, keepdim=True) + kf.amin(2, keepdim=True)) * 0.5
    return m.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)

def quantize_keys(k: torch.Tensor, codec: Codec, group: int):
    """k (B, H, n*G, D) -> codes (B, H, n*G, D) uint8, scale and zero point (B, H, n, D) fp16
    (per channel; zero point None without one)."""
    B, H, T, D = k.shape
    x = k.float().view(B, H, T // group, group, D)
    s, m = codec.params(x, 3)                                        # (B, H, n, 1, D)
    return codec.encode(x, s, m).view(B, H, T, D), s.squeeze(3), None if m is None else m.squeeze(3)

def quantize_values(v: torch.Tensor, codec: Codec):
    """v (B, H, T, D) -> codes (B, H, T, D) uint8, scale and zero point (B, H, T) fp16 (per token)."""
    x = v.float()
    s, m = codec.params(x, 3)                                        # (B, H, T, 1)
    return codec.encode(x, s, m), s.squeeze(3), None if m is None else m.squeeze(3)

def dequantize_keys(codes, scale, zero, codec: Codec, group: int, dtype) -> torch.Tensor:
    B, H, T, D = codes.shape
    x = codec.decode(codes.view(B, H, T // group, group, D), scale.unsqueeze(3),
                     None if zero is None else zero.unsqueeze(3), dtype)
    return x.view(B, H, T, D)

def dequantize_values(codes, scale, zero, codec: Codec, dtype) -> torch.Tensor:
    return codec.decode(codes, scale.unsqueeze(3), None if zero is None else zero.unsqueeze(3), dtype)

def fake_quantize_keys(k, codec):
    """Quantize-dequantize keys with one scale (and zero point) per channel over all T tokens."""
    c, s, m = quantize_keys(k, codec, k.shape[2])
    return dequantize_keys(c, s, m, codec, k.shape[2], k.dtype)

def fake_quantize_values(v, codec):
    c, s, m = quantize_values(v, codec)
    return dequantize_values(c, s, m, codec, v.dtype)

def zero_point_params(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (half-range r, mid-range m) of groups along dim (kept as size 1): m rounded to
    fp16 first, r the half-range about the stored m, so both group ends stay within r."""
    hi, lo = x.amax(dim, keepdim=True), x.amin(dim, keepdim=True)
    m = ((hi + lo) * 0.5).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    mf = m.float()
    r = torch.maximum(hi - mf, mf - lo).clamp(0, _FP16_MAX).to(torch.float16)
    return r, m

def quantize_keys_mixed(k: torch.Tensor, widths: torch.Tensor, group: int):
    """Keys with w = widths[h, d] bits per channel (0..8), a zero point and a half-range per
    (group, channel): k (B, H, n*G, D) -> codes (B, H, n*G, D) uint8, r and m (B, H, n, D) fp16.

    x = m + r * (2 c / (2^w - 1) - 1), c = round((x - m) / r * (2^w - 1) / 2 + (2^w - 1) / 2)
    (halves round up), the uniform zero-point grid of zero_point_table(w) (both group ends
    exact); w = 0 stores no code and decodes to m."""
    B, H, T, D = k.shape
    x = k.float().view(B, H, T // group, group, D)
    r, m = zero_point_params(x, 3)                                    # (B, H, n, 1, D)
    return encode_keys_mixed(x, widths, r, m).view(B, H, T, D), r.squeeze(3), m.squeeze(3)

def encode_keys_mixed(x: torch.Tensor, widths: torch.Tensor, r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """uint8 codes of x (B, H, ..., D) on the grid of widths (H, D) given fp16 half-range r and
    mid-range m broadcastable to x (quantize_keys_mixed's rounding; used alone to fill a group
    whose parameters are already stored)."""
    H, D = widths.shape
    top = ((1 << widths.to(torch.int64)) - 1).to(torch.float32).view(1, H, *([1] * (x.dim() - 3)), D)
    rf = r.float()
    y = ((x.float() - m.float()) / torch.where(rf == 0, torch.ones_like(rf), rf)).clamp_(-1.0, 1.0)
    return torch.floor((y + 1.0) * 0.5 * top + 0.5).clamp_(min=0).minimum(top).to(torch.uint8)

def mixed_key_affine(widths: torch.Tensor, r: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, step) float32 with x = base + step * code, from r, m (..., D) fp16 and the
    channel widths (H, D) broadcast over the trailing (H, ..., D) dims of r."""
    top = ((1 << widths.to(torch.int64)) - 1).to(torch.float32)
    alpha = torch.where(top > 0, 2.0 / top.clamp(min=1), torch.zeros_like(top))
    beta = torch.where(top > 0, -torch.ones_like(top), torch.zeros_like(top))
    shape = [1] * r.dim()
    shape[1], shape[-1] = widths.shape
    rf = r.float()
    return torch.addcmul(m.float(), rf, beta.view(shape)), rf * alpha.view(shape)

def dequantize_keys_mixed(codes, r, m, widths, group: int, dtype) -> torch.Tensor:
    B, H, T, D = codes.shape
    base, step = mixed_key_affine(widths, r.unsqueeze(3), m.unsqueeze(3))
    return torch.addcmul(base, codes.view(B, H, T // group, group, D).float(), step).view(B, H, T, D).to(dtype)

# -- fast decode (reference path) --------------------------------------------------------------
def affine_levels(codec: Codec) -> tuple[float, float] | None:
    """(alpha, beta) when every code the encoder emits decodes to alpha * code + beta (uniform
    levels: a = 0), else None; lets 8-bit codes skip the table (a uint8 -> float pass)."""
    n = codec.mids.numel() + 1
    lv = codec.lut[:n].double()
    c = torch.arange(n, dtype=torch.float64, device=lv.device)
    alpha, beta = float(lv[1] - lv[0]), float(lv[0])
    return (alpha, beta) if torch.allclose(lv, alpha * c + beta, rtol=0, atol=1e-6) else None
