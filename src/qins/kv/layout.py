"""KV row layout: where each channel's code sits in the packed words of one token row, and
the decode of whole rows.

Codes are packed along the head dimension D with `codec.packing.pack`, one row of D codes
per (b, h, t), so a token's codes are whole int32 words (Wk = packing.packed_words(D, k_bits)
per key row; the planes that hold the rows are in store.py):

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
"""
from __future__ import annotations

import torch

from ..codec.packing import pack, packed_words, padded_length, unpack
from .codec import Codec, affine_levels, mixed_key_affine


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

    def kernel_fields(self, device) -> tuple:
        """A key plan's layout (one segment per channel) as the Triton kernels read it
        (kernels.triton_kv `k_fields`): (byte index, shift, mask) int32 and the levels' (alpha,
        beta) float32, each (H, D) on `device`; a w-bit field c decodes to m + r (alpha c + beta)
        (codec.mixed_key_affine with r = 1, m = 0)."""
        if len(self.segments) != 1:
            raise ValueError("kernel_fields reads a key plan's layout (one field per channel)")
        idx, shift, mask, _ = self.segments[0]
        H, D = self.widths.shape
        beta, alpha = (t[0] for t in mixed_key_affine(self.widths, torch.ones(1, H, D), torch.zeros(1, H, D)))
        return tuple(t.to(device=device, dtype=dt).contiguous()
                     for t, dt in ((idx, torch.int32), (shift, torch.int32), (mask, torch.int32),
                                   (alpha, torch.float32), (beta, torch.float32)))

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
