"""KV page math and layout: keys quantized per channel over a group of tokens, values per token.

Math (KIVI's split; DESIGN's QINS format). A decode table `lut` of 2^b entries comes from
`codec.formats.table(format, bits, a)`; one scale `s` per group decodes x = s * lut[code].

    keys    (B, H, T, D): a group is G consecutive tokens of one channel (b, h, d); its
            scale is the group's extreme value (qins: signed, so the extreme lands exactly on
            the top level; int-sym: max |x|)
    values  (B, H, T, D): a group is the D channels of one token of one head

Codes are the nearest table level (ties to the lower); scales are stored in fp16 and the
codes are chosen against the stored fp16 scale.

Layout. A `Page` holds `P` tokens (a multiple of G) of one layer for every batch row and
KV head. Codes are packed along the head dimension D with `codec.packing.pack`, one row of
D codes per (b, h, t), so a token's codes are whole int32 words:

    k_codes  (B, H, P, Wk) int32    Wk = packing.packed_words(D, k_bits)
    k_scale  (B, H, P // G, D) fp16 one scale per (group, channel)
    v_codes  (B, H, P, Wv) int32    Wv = packing.packed_words(D, v_bits)
    v_scale  (B, H, P) fp16         one scale per token

    token t of row (b, h), 4-bit codes, D = 64 (Wk = 8 words):
    | word 0: c7..c0 | word 1: c15..c8 | ... | word 7: c63..c56 |    (c0 in bits 0..3)

A page is written one whole group at a time (`write_groups`); once its P // G groups are
written it is sealed and its tensors are never written again (only `QINSLayer.crop` may
reopen the last page, and beam search permutes whole batch rows). Tensors are contiguous,
so a fused GPU kernel can read one (b, h)'s tokens as P*W consecutive words.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.formats import get_format, n_levels, table
from ..codec.packing import pack, packed_words, unpack

_FP16_MAX = 65504.0


@dataclass(frozen=True)
class Codec:
    """The decode table of one (format, bits, curvature) and its rounding midpoints."""

    format: str
    bits: int
    curvature: float
    lut: torch.Tensor       # (2^bits,) float32 decode table
    mids: torch.Tensor      # (n_levels - 1,) float32 midpoints between real levels
    signed_scale: bool

    @classmethod
    def build(cls, fmt: str, bits: int, curvature: float = 0.0) -> "Codec":
        f = get_format(fmt)
        t = table(f, bits, curvature)[0].float()                     # (2^bits,)
        n = n_levels(f, bits)
        lv = t[:n]
        return cls(fmt, bits, float(curvature), t.contiguous(), ((lv[1:] + lv[:-1]) * 0.5).contiguous(),
                   f.signed_scale)

    # -- scales ------------------------------------------------------------------------------
    def scale(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """fp16 scale of groups along `dim` (kept as size 1): signed extreme or max |x|."""
        if self.signed_scale:
            hi = x.amax(dim, keepdim=True)
            lo = x.amin(dim, keepdim=True)
            s = torch.where(hi >= -lo, hi, lo)
        else:
            s = x.abs().amax(dim, keepdim=True)
        s = s.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)        # |x| beyond fp16 saturates
        return torch.where(s == 0, torch.ones_like(s), s)

    def encode(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Codes (uint8, shape of x) of x / s, s broadcastable, fp16."""
        y = (x.float() / s.float()).clamp_(-1.0, 1.0)
        return torch.bucketize(y, self.mids).to(torch.uint8)

    def decode(self, codes: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        vals = self.lut.index_select(0, codes.reshape(-1).to(torch.int32)).view(codes.shape)
        return vals.mul_(s.float()).to(dtype)


def key_offset(k: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, 1, D) fp16 per-channel mid-range (max + min) / 2."""
    kf = k.float()
    m = (kf.amax(2, keepdim=True) + kf.amin(2, keepdim=True)) * 0.5
    return m.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def quantize_keys(k: torch.Tensor, codec: Codec, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k (B, H, n*G, D) -> codes (B, H, n*G, D) uint8, scale (B, H, n, D) fp16 (per channel)."""
    B, H, T, D = k.shape
    x = k.float().view(B, H, T // group, group, D)
    s = codec.scale(x, 3)                                            # (B, H, n, 1, D)
    return codec.encode(x, s).view(B, H, T, D), s.squeeze(3)


def quantize_values(v: torch.Tensor, codec: Codec) -> tuple[torch.Tensor, torch.Tensor]:
    """v (B, H, T, D) -> codes (B, H, T, D) uint8, scale (B, H, T) fp16 (per token)."""
    x = v.float()
    s = codec.scale(x, 3)                                            # (B, H, T, 1)
    return codec.encode(x, s), s.squeeze(3)


def dequantize_keys(codes, scale, codec: Codec, group: int, dtype) -> torch.Tensor:
    B, H, T, D = codes.shape
    x = codec.decode(codes.view(B, H, T // group, group, D), scale.unsqueeze(3), dtype)
    return x.view(B, H, T, D)


def dequantize_values(codes, scale, codec: Codec, dtype) -> torch.Tensor:
    return codec.decode(codes, scale.unsqueeze(3), dtype)


def fake_quantize_keys(k, codec, group=None):
    """Quantize-dequantize keys with one scale per channel over all T tokens given."""
    c, s = quantize_keys(k, codec, k.shape[2])
    return dequantize_keys(c, s, codec, k.shape[2], k.dtype)


def fake_quantize_values(v, codec):
    c, s = quantize_values(v, codec)
    return dequantize_values(c, s, codec, v.dtype)


# -- packing along D ---------------------------------------------------------------------------
def pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(B, H, T, D) codes -> (B, H, T, W) int32, packed along D."""
    B, H, T, D = codes.shape
    return pack(codes.reshape(-1, D), bits).view(B, H, T, -1)


def unpack_rows(words: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """(B, H, T, W) int32 -> (B, H, T, D) uint8; exact inverse of pack_rows.

    8 and 4 bits read the words as bytes (little-endian: code 0 in the lowest bits, as
    `pack` lays them out); the other widths go through `codec.packing.unpack`.
    """
    B, H, T, W = words.shape
    if bits == 8 and d % 4 == 0 and words.is_contiguous():
        return words.view(torch.uint8).view(B, H, T, W * 4)[..., :d]
    if bits == 4 and d % 8 == 0 and words.is_contiguous():
        b = words.view(torch.uint8)                                  # (B, H, T, 4W)
        return torch.stack((b & 15, b >> 4), dim=-1).view(B, H, T, W * 8)[..., :d]
    return unpack(words.reshape(-1, W), bits, d).view(B, H, T, d)


def page_tokens(page_kb: int, heads: int, head_dim: int, k_bits: int, v_bits: int, group: int) -> int:
    """Tokens per page: the largest multiple of `group` whose codes + scales of K and V for
    one batch row fit in page_kb KiB (at least one group)."""
    per_token = heads * (packed_words(head_dim, k_bits) + packed_words(head_dim, v_bits)) * 4 \
        + heads * 2                                                   # v scale
    per_group = per_token * group + heads * head_dim * 2              # + one k scale row
    return max(1, (page_kb * 1024) // per_group) * group


class Page:
    """P tokens of one layer, all batch rows and KV heads (fields: see the module docstring)."""

    __slots__ = ("k_codes", "k_scale", "v_codes", "v_scale", "n_groups", "group")

    def __init__(self, B, H, D, P, group, k_bits, v_bits, device):
        self.group = group
        self.k_codes = torch.zeros(B, H, P, packed_words(D, k_bits), dtype=torch.int32, device=device)
        self.k_scale = torch.zeros(B, H, P // group, D, dtype=torch.float16, device=device)
        self.v_codes = torch.zeros(B, H, P, packed_words(D, v_bits), dtype=torch.int32, device=device)
        self.v_scale = torch.zeros(B, H, P, dtype=torch.float16, device=device)
        self.n_groups = 0

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def n_tokens(self) -> int:
        return self.n_groups * self.group

    @property
    def sealed(self) -> bool:
        return self.n_tokens == self.capacity

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.k_codes, self.k_scale, self.v_codes, self.v_scale

    def nbytes(self) -> int:
        """Bytes allocated, slack of an unsealed page included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def write_groups(self, kc, ks, vc, vs) -> None:
        """Append whole groups: kc/vc (B, H, g*G, W) int32, ks (B, H, g, D), vs (B, H, g*G)."""
        if self.sealed:
            raise RuntimeError("a sealed page is never written again")
        t0, g0 = self.n_tokens, self.n_groups
        n = kc.shape[2]
        self.k_codes[:, :, t0:t0 + n] = kc
        self.k_scale[:, :, g0:g0 + n // self.group] = ks
        self.v_codes[:, :, t0:t0 + n] = vc
        self.v_scale[:, :, t0:t0 + n] = vs
        self.n_groups += n // self.group

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension op (index_select, repeat_interleave) to every tensor."""
        self.k_codes, self.k_scale, self.v_codes, self.v_scale = (fn(t) for t in self.tensors())
