"""KV page math and layout: keys quantized per channel over a group of tokens, values per token.

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

Layout. A layer's pages live in one `PageStore`: one contiguous tensor per plane with a
capacity of C tokens (a whole number of pages of P tokens, P a multiple of G), batch rows
and KV heads outermost. Page i is the token range [i P, (i + 1) P) of every plane (its key
groups: [i P / G, (i + 1) P / G)). Codes are packed along the head dimension D with
`codec.packing.pack`, one row of D codes per (b, h, t), so a token's codes are whole int32
words:

    k_codes  (B, H, C, Wk) int32    Wk = packing.packed_words(D, k_bits)
    k_scale  (B, H, C // G, D) fp16 one scale per (group, channel)
    k_zero   (B, H, C // G, D) fp16 one zero point per (group, channel), or None
    v_codes  (B, H, C, Wv) int32    Wv = packing.packed_words(D, v_bits)
    v_scale  (B, H, C) fp16         one scale per token
    v_zero   (B, H, C) fp16         one zero point per token, or None

    element offsets of page i, row (b, h), in each plane (all tensors contiguous):
    k_codes[b, h, iP:(i+1)P]    ((b H + h) C + i P) Wk      P Wk consecutive int32 words
    k_scale[b, h, iP/G:...]     ((b H + h) C/G + i P/G) D   (P/G) D consecutive fp16
    v_scale[b, h, iP:(i+1)P]    (b H + h) C + i P           P consecutive fp16
    (k_zero like k_scale, v_codes like k_codes, v_zero like v_scale)

    token t of row (b, h), 4-bit codes, D = 64 (Wk = 8 words):
    | word 0: c7..c0 | word 1: c15..c8 | ... | word 7: c63..c56 |    (c0 in bits 0..3)

    read as bytes (little-endian), byte j holds c(2j) in bits 0..3 and c(2j+1) in bits 4..7,
    which `byte_table` decodes with one lookup per byte

    Where each code sits is a `RowLayout`: `RowLayout.uniform` is exactly the layout above
    (codec.packing's planes: at 3, 5 and 6 bits a code is split over two planes); a layer
    with a key plan (plan.py) stores keys with `RowLayout.mixed`: channel d of head h has
    its own width w[h, d] in 0..8, and the fields of a head are packed first-fit-decreasing
    into whole bytes (no field crosses a byte), so the row keeps Wk = packed_words(D, k_bits)
    words. A kernel reads those rows with the plan's (byte, shift, mask) per channel.

So a GPU kernel reads page i of (b, h) as one run of P*W words (plus its scale runs) given
the store's base pointers and C, e.g. through a block table of page indices. Tokens
0 .. n_tokens - 1 are written, whole groups at a time (`PageStore.write_groups`); a page is
sealed once its P // G groups are written and its ranges are never written again (only
`QINSLayer.crop` may give back groups, reopening the last page, and beam search permutes
whole batch rows). When a write needs more than C tokens the store is reallocated with
max(needed, C + C / 8) tokens rounded up to whole pages and the written prefix copied (so
appends cost amortized O(new tokens) and the slack is at most about 1/8 of the capacity
while decoding; a prefill is allocated exactly). `nbytes` counts the whole capacity, slack
included. The decode reads the written prefix of each plane, a strided view
[:, :, :n_tokens], in one op per plane (no concatenation over pages).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..codec.formats import get_format, n_levels, table
from ..codec.packing import pack, packed_words, padded_length, unpack

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


def page_tokens(page_kb: int, heads: int, head_dim: int, k_bits: int, v_bits: int, group: int,
                k_zero: bool = False, v_zero: bool = False, k_words: int | None = None) -> int:
    """Tokens per page: the largest multiple of `group` whose codes, scales and zero points of
    K and V for one batch row fit in page_kb KiB (at least one group). `k_words` overrides the
    words per key row (mixed channel widths: RowLayout.mixed)."""
    wk = packed_words(head_dim, k_bits) if k_words is None else k_words
    per_token = heads * (wk + packed_words(head_dim, v_bits)) * 4 \
        + heads * 2 * (1 + v_zero)                                    # v scale (+ zero point)
    per_group = per_token * group + heads * head_dim * 2 * (1 + k_zero)   # + k scale (+ zero) row
    return max(1, (page_kb * 1024) // per_group) * group


class PageStore:
    """The sealed (and open) pages of one layer: one contiguous tensor per plane, grown in
    whole pages; page i is the token range [i P, (i + 1) P) of every plane (fields and
    layout: see the module docstring; k_zero / v_zero are None for codecs without a zero
    point). Tokens 0 .. n_tokens - 1 are written; the capacity beyond them is slack, counted
    by `nbytes`."""

    PLANES = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
    GROWTH = 8                       # a full store grows by 1/GROWTH of its capacity (at least what is asked)

    def __init__(self, B, H, D, P, group, k_bits, v_bits, device, k_zero=False, v_zero=False, pages: int = 0,
                 k_words: int | None = None):
        if P % group:
            raise ValueError(f"page tokens ({P}) must be a multiple of the group ({group})")
        self.group, self.page_tokens, self.n_groups = group, P, 0
        self.shape = (B, H, D, packed_words(D, k_bits) if k_words is None else k_words, packed_words(D, v_bits))
        self.has_zero = (k_zero, v_zero)
        self.device = device
        self.k_codes = self.k_scale = self.k_zero = self.v_codes = self.v_scale = self.v_zero = None
        self._alloc(pages * P)

    def _empty(self, C: int) -> dict:
        B, H, D, Wk, Wv = self.shape
        i32, f16 = dict(dtype=torch.int32, device=self.device), dict(dtype=torch.float16, device=self.device)
        G = C // self.group
        return dict(k_codes=torch.zeros(B, H, C, Wk, **i32), k_scale=torch.zeros(B, H, G, D, **f16),
                    k_zero=torch.zeros(B, H, G, D, **f16) if self.has_zero[0] else None,
                    v_codes=torch.zeros(B, H, C, Wv, **i32), v_scale=torch.zeros(B, H, C, **f16),
                    v_zero=torch.zeros(B, H, C, **f16) if self.has_zero[1] else None)

    def _alloc(self, C: int) -> None:
        """Reallocate every plane with capacity C tokens (a multiple of P), keeping what is written."""
        new = self._empty(C)
        t, g = self.n_tokens, self.n_groups
        for name, x in new.items():
            old = getattr(self, name)
            if old is not None and x is not None:
                n = g if name in ("k_scale", "k_zero") else t
                x[:, :, :n] = old[:, :, :n]
            setattr(self, name, x)

    @property
    def capacity(self) -> int:
        return self.k_codes.shape[2]

    @property
    def n_tokens(self) -> int:
        return self.n_groups * self.group

    @property
    def n_pages(self) -> int:
        """Pages holding at least one written group (the last may be open)."""
        return -(-self.n_tokens // self.page_tokens)

    def page_range(self, i: int) -> tuple[int, int]:
        """Token range [t0, t1) of page i (its groups: [t0 / G, t1 / G))."""
        return i * self.page_tokens, (i + 1) * self.page_tokens

    def page_sealed(self, i: int) -> bool:
        return self.page_range(i)[1] <= self.n_tokens

    def page_tensors(self, i: int) -> tuple[torch.Tensor, ...]:
        """Views of page i's planes (codes, scales, zero points of K then V; None planes left out)."""
        t0, t1 = self.page_range(i)
        G = self.group
        out = []
        for name in self.PLANES:
            x = getattr(self, name)
            if x is not None:
                out.append(x[:, :, t0 // G:t1 // G] if name in ("k_scale", "k_zero") else x[:, :, t0:t1])
        return tuple(out)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in self.PLANES if getattr(self, n) is not None)

    def nbytes(self) -> int:
        """Bytes allocated: every page of the capacity, slack (unwritten tokens) included."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def planes(self) -> tuple[torch.Tensor | None, ...]:
        """Written prefix of every plane (views, no copy): k_codes, k_scale, k_zero, v_codes,
        v_scale, v_zero; (B, H, n_tokens, ...) or (B, H, n_groups, ...)."""
        t, g = self.n_tokens, self.n_groups
        return tuple(None if (x := getattr(self, n)) is None else
                     x[:, :, :g] if n in ("k_scale", "k_zero") else x[:, :, :t] for n in self.PLANES)

    def write_groups(self, kc, ks, kz, vc, vs, vz) -> None:
        """Append whole groups after the written tokens (growing the store by whole pages):
        kc/vc (B, H, g*G, W) int32, ks/kz (B, H, g, D), vs/vz (B, H, g*G). Written tokens
        are never written again (only `truncate` may give groups back)."""
        t0, g0 = self.n_tokens, self.n_groups
        n = kc.shape[2]
        g = n // self.group
        need = t0 + n
        if need > self.capacity:
            P = self.page_tokens
            grow = max(need, self.capacity + self.capacity // self.GROWTH)
            self._alloc(-(-grow // P) * P)
        self.k_codes[:, :, t0:t0 + n] = kc
        self.k_scale[:, :, g0:g0 + g] = ks
        self.v_codes[:, :, t0:t0 + n] = vc
        self.v_scale[:, :, t0:t0 + n] = vs
        if self.k_zero is not None:
            self.k_zero[:, :, g0:g0 + g] = kz
        if self.v_zero is not None:
            self.v_zero[:, :, t0:t0 + n] = vz
        self.n_groups += g

    def truncate(self, n_groups: int) -> None:
        """Keep the first n_groups groups (the capacity is kept: later writes reuse it)."""
        self.n_groups = min(self.n_groups, max(n_groups, 0))

    def map_batch(self, fn) -> None:
        """Apply a batch-dimension op (index_select, repeat_interleave, .to) to every plane."""
        for name in self.PLANES:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self.shape = (self.k_codes.shape[0],) + self.shape[1:]
        self.device = self.k_codes.device


class PageView:
    """Page i of a PageStore (read-only views; for inspection and tests)."""

    __slots__ = ("store", "index")

    def __init__(self, store: PageStore, index: int):
        self.store, self.index = store, index

    @property
    def capacity(self) -> int:
        return self.store.page_tokens

    @property
    def n_tokens(self) -> int:
        return min(max(self.store.n_tokens - self.index * self.capacity, 0), self.capacity)

    @property
    def n_groups(self) -> int:
        return self.n_tokens // self.store.group

    @property
    def sealed(self) -> bool:
        return self.store.page_sealed(self.index)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.store.page_tensors(self.index)

    def nbytes(self) -> int:
        """Bytes of the page's ranges (written or not)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def __getattr__(self, name):
        if name in PageStore.PLANES:
            i = PageStore.PLANES.index(name)
            if getattr(self.store, name) is None:
                return None
            j = sum(getattr(self.store, n) is not None for n in PageStore.PLANES[:i])
            return self.tensors()[j]
        raise AttributeError(name)


# -- row layouts: where each channel's code sits in a packed row --------------------------------
class RowLayout:
    """Where the code of channel d of head h sits in a packed row of W int32 words (4W bytes,
    little-endian), as one or more bit fields none of which crosses a byte:

        code[h, d] = OR over segments s of ((byte[idx_s[h, d]] >> shift_s[h, d]) & mask_s[h, d]) << out_s

    uniform(H, D, bits): `codec.packing.pack`'s planes (widths 1, 2, 4, 8: a field never
        crosses a byte); 3, 5 and 6 bits are two segments (low plane, high plane). Bit for
        bit the layout of pack_rows.
    mixed(widths): channel d of head h has widths[h, d] bits (0..8); each head's fields are
        placed first-fit-decreasing into whole bytes (`byte_fit`), one segment, and every
        head's row is padded to the same whole number of words. A 0-bit channel has no field
        (its code is 0).

    `unpack` is one byte gather, one shift and one mask per segment over (B, H, T, D) uint8,
    which on CPU measured about 2x faster than the 4-bit byte-table gather (1.2 vs 2.3 ms
    for 4096 tokens x 3 heads x 64 channels) and replaces the generic bit-plane unpacker at
    3, 5 and 6 bits."""

    def __init__(self, widths: torch.Tensor, segments, n_words: int):
        self.widths = widths                    # (H, D) int64
        self.segments = segments                # [(idx (H, D) int64, shift (H, D) uint8, mask (H, D) uint8, out)]
        self.n_words = n_words

    @classmethod
    def uniform(cls, heads: int, d: int, bits: int) -> "RowLayout":
        from ..codec.packing import planes
        segs, start, out = [], 0, 0
        ch = torch.arange(d)
        for w in planes(bits):
            per_word = 32 // w
            bit = (start + ch // per_word) * 32 + (ch % per_word) * w     # bit offset in the row
            segs.append((bit // 8, bit % 8, w, out))
            start += padded_length(d) * w // 32
            out += w
        segs = [(i.expand(heads, d), s.expand(heads, d), torch.full((heads, d), w), o) for i, s, w, o in segs]
        return cls._build(torch.full((heads, d), bits, dtype=torch.int64), segs, packed_words(d, bits))

    @classmethod
    def mixed(cls, widths: torch.Tensor) -> "RowLayout":
        widths = torch.as_tensor(widths, dtype=torch.int64)
        if widths.dim() != 2 or widths.numel() == 0 or int(widths.min()) < 0 or int(widths.max()) > 8:
            raise ValueError(f"channel widths must be an (H, D) tensor of ints in 0..8, got {tuple(widths.shape)}")
        H, D = widths.shape
        idx = torch.zeros(H, D, dtype=torch.int64)
        shift = torch.zeros(H, D, dtype=torch.int64)
        n_bytes = 0
        for h in range(H):
            i, s, n = byte_fit(widths[h].tolist())
            idx[h], shift[h] = torch.tensor(i), torch.tensor(s)
            n_bytes = max(n_bytes, n)
        return cls._build(widths, [(idx, shift, widths, 0)], max(1, -(-n_bytes // 4)))

    @classmethod
    def _build(cls, widths, segs, n_words):
        built = [(i.to(torch.int64).contiguous(), s.to(torch.uint8).contiguous(),
                  ((1 << w.to(torch.int64)) - 1).to(torch.uint8).contiguous(), int(o)) for i, s, w, o in segs]
        return cls(widths, built, n_words)

    @property
    def bits(self) -> int:
        """Code bits per row (each head), padding excluded."""
        return int(self.widths.sum(1).max())

    def to(self, device) -> "RowLayout":
        return RowLayout(self.widths.to(device),
                         [(i.to(device), s.to(device), m.to(device), o) for i, s, m, o in self.segments], self.n_words)

    def pack(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) codes (each < 2^width) -> (B, H, T, W) int32."""
        B, H, T, D = codes.shape
        c = codes.to(torch.uint8)
        out = torch.zeros(B, H, T, 4 * self.n_words, dtype=torch.uint8, device=codes.device)
        for idx, shift, mask, o in self.segments:
            part = ((c >> o) & mask.view(1, H, 1, D)) << shift.view(1, H, 1, D)
            out.scatter_add_(3, idx.view(1, H, 1, D).expand(B, H, T, D), part)   # disjoint bits: add == or
        return out.view(torch.int32)

    def unpack(self, words: torch.Tensor) -> torch.Tensor:
        """(B, H, T, W) int32 (the last dim contiguous; a strided prefix is fine) -> (B, H, T, D) uint8."""
        B, H, T, W = words.shape
        if W != self.n_words:
            raise ValueError(f"rows have {W} words, this layout has {self.n_words}")
        by = words.view(torch.uint8)                                   # (B, H, T, 4W)
        D = self.widths.shape[1]
        out = None
        for idx, shift, mask, o in self.segments:
            c = torch.gather(by, 3, idx.view(1, H, 1, D).expand(B, H, T, D))
            c.bitwise_right_shift_(shift.view(1, H, 1, D)).bitwise_and_(mask.view(1, H, 1, D))
            if o:
                c.bitwise_left_shift_(o)
            out = c if out is None else out.bitwise_or_(c)
        return out


def byte_fit(widths: list[int]) -> tuple[list[int], list[int], int]:
    """First-fit-decreasing of bit fields into bytes: (byte index, bit shift) per field and the
    bytes used. Fields of 0 bits get (0, 0) and no room."""
    order = sorted(range(len(widths)), key=lambda j: -widths[j])
    free: list[int] = []                       # bits left in each byte opened so far
    idx, shift = [0] * len(widths), [0] * len(widths)
    for j in order:
        w = widths[j]
        if w == 0:
            continue
        for b, f in enumerate(free):
            if f >= w:
                break
        else:
            free.append(8)
            b = len(free) - 1
        idx[j], shift[j] = b, 8 - free[b]
        free[b] -= w
    return idx, shift, len(free)


def bytes_needed(widths: list[int]) -> int:
    return byte_fit(widths)[2]


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
    top = ((1 << widths.to(torch.int64)) - 1).to(torch.float32).view(1, H, 1, 1, D)
    rf = r.float()
    y = ((x - m.float()) / torch.where(rf == 0, torch.ones_like(rf), rf)).clamp_(-1.0, 1.0)
    c = torch.floor((y + 1.0) * 0.5 * top + 0.5).clamp_(min=0).minimum(top)
    return c.to(torch.uint8).view(B, H, T, D), r.squeeze(3), m.squeeze(3)


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


def byte_table(codec: Codec) -> torch.Tensor | None:
    """(256,) table of the levels of the codes packed in one byte, lowest bits first: with
    `pack`'s single plane at 8, 4 and 2 bits, byte j of a row holds codes j*n .. j*n + n - 1
    (n = 8 // bits). Its n float32 levels are stored as one element (float32, float64 or
    complex128 for n = 1, 2, 4), so one gather of 1-element rows decodes n codes (a gather of
    (256, n) rows measured 2.8x slower on CPU). None at 3, 5 and 6 bits (two planes)."""
    if codec.bits not in (2, 4, 8):
        return None
    n, mask = 8 // codec.bits, 2**codec.bits - 1
    b = torch.arange(256, device=codec.lut.device)
    codes = torch.stack([(b >> (codec.bits * i)) & mask for i in range(n)], dim=1)   # (256, n)
    as_one = {1: torch.float32, 2: torch.float64, 4: torch.complex128}[n]
    return codec.lut[codes].contiguous().view(as_one).view(256)


def decode_rows(words: torch.Tensor, codec: Codec, d: int, layout: RowLayout, table: torch.Tensor | None = None,
                affine: tuple[float, float] | None = None) -> tuple[torch.Tensor, float, float]:
    """(B, H, T, W) int32 packed rows -> (u (B, H, T, d), alpha, beta) with the table level of
    each code = alpha * u + beta (no scale yet). Rows may be strided (a PageStore prefix).

    - 8 bits, uniform levels (`affine`): u = the row's bytes as uint8 codes (no pass).
    - 2, 4, 8 bits (`table` = byte_table): one uint8 -> int64 pass and one gather of the
      byte table, u = levels (alpha, beta = 1, 0); on CPU this measured faster than the
      layout's byte gather at these widths (4 bits, 4096 tokens x 3 heads: 2.3 vs 3.3 ms a layer).
    - 3, 5, 6 bits: `layout.unpack` (a byte gather, shift and mask per plane); u = the uint8
      codes with uniform levels, else lut[code]. Measured 6-11 ms against 12-15 ms for the
      generic bit-plane unpacker (a layer at 4096 tokens)."""
    B, H, T, W = words.shape
    whole = W * 4 * 8 == d * codec.bits and words.stride(-1) == 1    # no padding codes in a row
    if whole and affine is not None and codec.bits == 8:
        return words.view(torch.uint8).view(B, H, T, d), affine[0], affine[1]
    if whole and table is not None:
        idx = words.view(torch.uint8).long().view(-1)                 # (B*H*T*4W,) bytes
        return table.index_select(0, idx).view(torch.float32).view(B, H, T, d), 1.0, 0.0
    codes = layout.unpack(words)
    if affine is not None:
        return codes, affine[0], affine[1]
    return codec.lut.take(codes.long()), 1.0, 0.0


def decode_levels(words: torch.Tensor, codec: Codec, d: int) -> torch.Tensor:
    """(B, H, T, W) int32 packed rows -> (B, H, T, d) float32 levels lut[code]."""
    layout = RowLayout.uniform(words.shape[1], d, codec.bits).to(words.device)
    u, alpha, beta = decode_rows(words, codec, d, layout, byte_table(codec), affine_levels(codec))
    return u.float() if (alpha, beta) == (1.0, 0.0) else u * alpha + beta
