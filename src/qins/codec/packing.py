"""Bit packing of b-bit codes (b in 2, 3, 4, 5, 6, 8) into 32-bit words.

A row of N codes (N padded up to a multiple of 32) is split into bit planes whose widths are
powers of two, so no code ever straddles a word and a GPU kernel can read any plane with
wide, aligned loads:

    bits  planes (low bits first)      words per 32 codes
    8     [8]                          8
    6     [4, 2]                       4 + 2
    5     [4, 1]                       4 + 1
    4     [4]                          4
    3     [2, 1]                       2 + 1
    2     [2]                          2

Row layout of the packed tensor (R, W) int32, W = sum over planes of N_pad * w / 32:

    | plane 0: N_pad*w0/32 words | plane 1: N_pad*w1/32 words |

Inside a plane of width w, word j holds codes j*n .. j*n + n - 1 (n = 32 / w), code i of
the word in bits [i*w, i*w + w) counting from the least significant bit:

    w = 4:  bit 31 ........................................ 0
            | c7 | c6 | c5 | c4 | c3 | c2 | c1 | c0 |

A plane of width w stores bits [shift, shift + w) of each code, shift = sum of the widths
before it. A group of g codes (g a multiple of 32) therefore occupies g*w/32 contiguous words
in every plane, so one group's codes are whole words, group after group.
"""
from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 3, 4, 5, 6, 8)
_PLANES = {8: (8,), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,)}


def planes(bits: int) -> tuple[int, ...]:
    """Widths of the bit planes that hold a `bits`-bit code, low bits first."""
    if bits not in _PLANES:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")
    return _PLANES[bits]


def padded_length(n: int) -> int:
    """Codes per row after padding to a whole number of words in every plane."""
    return -(-n // 32) * 32


def packed_words(n: int, bits: int) -> int:
    """int32 words per row holding `n` codes of `bits` bits (padding included)."""
    n_pad = padded_length(n)
    return sum(n_pad * w // 32 for w in planes(bits))


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # int64 values in [0, 2^32) -> the int32 with the same bit pattern
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


# rows packed at a time: the int64 temporaries (three of them, 8 bytes per code) stay near
# 3 x 128 MiB instead of 24 bytes per code of the whole tensor (2.4 GB for Phi-3.5's
# 32064 x 3072 embedding, the peak of a streamed compression before)
_PACK_CHUNK = 1 << 24


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, N) integer codes in [0, 2^bits) -> (R, packed_words(N, bits)) int32."""
    planes(bits)
    if codes.dim() != 2:
        raise ValueError(f"pack expects a 2-D (rows, codes) tensor, got shape {tuple(codes.shape)}")
    if codes.is_floating_point():
        raise TypeError("pack expects integer codes")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes out of range for {bits} bits")
    rows, n = codes.shape
    step = max(1, _PACK_CHUNK // max(n, 1))
    if rows <= step:
        return _pack_rows(codes, bits)
    return torch.cat([_pack_rows(codes[r:r + step], bits) for r in range(0, rows, step)])


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    c = codes.to(torch.int64)
    rows, n = c.shape
    n_pad = padded_length(n)
    if n_pad != n:
        c = torch.nn.functional.pad(c, (0, n_pad - n))
    out, shift = [], 0
    for w in planes(bits):
        per_word = 32 // w
        plane = (c >> shift) & ((1 << w) - 1)                      # (R, N_pad)
        plane = plane.view(rows, n_pad // per_word, per_word)
        lanes = torch.arange(per_word, dtype=torch.int64, device=c.device) * w
        out.append(_to_int32((plane << lanes).sum(-1)))            # bits are disjoint: sum == or
        shift += w
    return torch.cat(out, dim=1).contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """(R, packed_words(n, bits)) int32 -> (R, n) uint8 codes; exact inverse of `pack`."""
    widths = planes(bits)
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError("unpack expects a 2-D int32 tensor")
    rows = packed.shape[0]
    n_pad = padded_length(n)
    if packed.shape[1] != packed_words(n, bits):
        raise ValueError(
            f"packed rows have {packed.shape[1]} words, expected {packed_words(n, bits)} "
            f"for {n} codes of {bits} bits")
    codes = torch.zeros(rows, n_pad, dtype=torch.int32, device=packed.device)
    start, shift = 0, 0
    for w in widths:
        per_word = 32 // w
        nw = n_pad // per_word
        words = packed[:, start:start + nw].unsqueeze(-1)          # (R, nw, 1)
        lanes = torch.arange(per_word, dtype=torch.int32, device=packed.device) * w
        plane = (words >> lanes) & ((1 << w) - 1)                  # arithmetic shift, then mask
        codes |= plane.reshape(rows, n_pad) << shift
        start += nw
        shift += w
    return codes[:, :n].to(torch.uint8)
