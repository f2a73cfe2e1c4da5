"""An independent decoder of the stored weight format, shared by the codec and module tests.

Written from the docstrings of codec/packing.py and codec/formats.py, it shares no code with
the library: codes are read bit by bit from the words, and each format's table is built
from its definition, so a bug in unpack, in a table or in the decode arithmetic shows up as
a difference (the library's own tables are also used to encode, so a wrong table would
otherwise decode consistently with itself). tests/codec/test_tensor.py checks it against
QuantizedWeight.dequantize on every format and width.
"""
from __future__ import annotations

import torch

PLANE_WIDTHS = {8: (8,), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,)}   # packing.py

# QLoRA's NF4 code book as published (bitsandbytes); tests/codec/test_formats.py checks it
# against the normal-quantile construction
NF4_PUBLISHED = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


def ref_codes(qweight: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(R, n) int64: in the plane of width w, code i sits in word i // (32/w), bits
    [(i mod 32/w) * w, ... + w), and holds bits [shift, shift + w) of the code."""
    R = qweight.shape[0]
    words = qweight.long() & 0xFFFFFFFF                              # the int32 bits, unsigned
    n_pad = -(-n // 32) * 32
    i = torch.arange(n_pad)
    codes = torch.zeros(R, n_pad, dtype=torch.int64)
    start = shift = 0
    for w in PLANE_WIDTHS[bits]:
        per_word = 32 // w
        word = words[:, start + i // per_word]                       # (R, n_pad)
        codes |= ((word >> ((i % per_word) * w)) & (2**w - 1)) << shift
        start += n_pad // per_word
        shift += w
    assert start == qweight.shape[1]
    return codes[:, :n]


def e4m3fn_values() -> torch.Tensor:
    """The 253 distinct finite float8 e4m3fn values, sorted, from the bit layout: exponent
    bias 7, subnormals m/8 * 2^-6, exponent 15 with mantissa 7 is NaN (no infinities)."""
    mags = [m / 8 * 2.0**-6 for m in range(8)]
    mags += [(1 + m / 8) * 2.0 ** (e - 7) for e in range(1, 16) for m in range(8) if (e, m) != (15, 7)]
    pos = torch.tensor(mags, dtype=torch.float32)                    # 0 .. 448, exact in float32
    return torch.cat([-pos[1:].flip(0), pos])


def ref_table(fmt: str, bits: int, curvature: torch.Tensor | None) -> torch.Tensor:
    """(A, 2^bits) float32 decode table from the formats.py docstring; spare codes -> 0."""
    n = 2 ** (bits - 1)
    if fmt == "qins":                                                # sign(j) v(|j|/N), j = -(N-1)..N
        a = curvature.double().reshape(-1, 1)
        j = torch.arange(-(n - 1), n + 1, dtype=torch.float64)
        t = j.abs() / n
        return (torch.sign(j) * t / (1 + a * (1 - t))).float()
    if fmt == "int-sym":                                             # k / K, k = -K..K
        k = n - 1
        levels = torch.arange(-k, k + 1, dtype=torch.float64) / k
        return torch.cat([levels, torch.zeros(1, dtype=torch.float64)]).float().unsqueeze(0)
    if fmt == "int-asym":
        return torch.arange(2**bits, dtype=torch.float32).unsqueeze(0)
    if fmt == "nf4":
        return torch.tensor(NF4_PUBLISHED, dtype=torch.float32).unsqueeze(0)
    if fmt == "fp8":
        v = e4m3fn_values() / 448.0
        return torch.cat([v, torch.zeros(256 - v.numel())]).unsqueeze(0)
    assert fmt == "qins-seed"                                        # D(z), z = 2c/255 - 1, alpha = 1
    z = 2 * torch.arange(256, dtype=torch.float64) / 255 - 1
    return (torch.sign(z) * (1 - z.abs()) / z.abs()).float().unsqueeze(0)


def reference_decode(qweight, scales, offsets, curvature, config, shape) -> torch.Tensor:
    """(O, I) float32: x = table[code] * s (+ m), fp32 products; column j belongs to group
    min(j // g, G - 1) (the last group takes the remainder)."""
    O, I = shape
    codes = ref_codes(qweight, config.bits, I)
    tab = ref_table(config.format, config.bits, curvature)            # (A, 2^b)
    vals = tab[0][codes] if tab.shape[0] == 1 else torch.gather(tab, 1, codes)
    if scales is None:
        return vals
    g = I if config.group_size is None else config.group_size
    col = (torch.arange(I) // g).clamp(max=max(1, I // g) - 1)
    x = vals * scales.float()[:, col]
    if offsets is not None:
        x = x + offsets.float()[:, col]
    return x
