"""Bit packing (codec/packing.py): exact round trips and the documented bit layout.

Everything here is integer and bit-exact: no tolerances.
"""
from __future__ import annotations

import pytest
import torch

from qins.codec import packing

BITS = (2, 3, 4, 5, 6, 8)
# odd lengths (1 code, one short of a word multiple, one over, non-multiple, 576 = 18*32 but
# not a power of two) next to round ones
LENGTHS = (1, 31, 33, 100, 576, 32, 64, 128)


def _random_codes(rows: int, n: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.int64)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", LENGTHS)
def test_round_trip_random(bits, n):
    codes = _random_codes(5, n, bits, seed=1000 * bits + n)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (5, packing.packed_words(n, bits))
    assert packed.is_contiguous()
    out = packing.unpack(packed, bits, n)
    assert out.dtype == torch.uint8 and out.shape == (5, n)
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", (1, 33, 576))
@pytest.mark.parametrize("fill", ("max", "zero", "alternating"))
def test_round_trip_extremes(bits, n, fill):
    # all-max codes set every bit of every lane, incl. bit 31 (the int32 sign bit)
    top = 2**bits - 1
    if fill == "max":
        codes = torch.full((3, n), top, dtype=torch.int64)
    elif fill == "zero":
        codes = torch.zeros(3, n, dtype=torch.int64)
    else:
        codes = torch.where(torch.arange(n) % 2 == 0, top, 0).expand(3, n).clone()
    out = packing.unpack(packing.pack(codes, bits), bits, n)
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", (torch.uint8, torch.int32, torch.int64))
def test_round_trip_input_dtypes(bits, dtype):
    codes = _random_codes(4, 100, bits, seed=bits).to(dtype)
    out = packing.unpack(packing.pack(codes, bits), bits, 100)
    assert torch.equal(out.long(), codes.long())


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_non_contiguous(bits):
    codes = _random_codes(64, 96, bits, seed=7).t()                # (96, 64), transposed strides
    assert not codes.is_contiguous()
    out = packing.unpack(packing.pack(codes, bits), bits, 64)
    assert torch.equal(out.long(), codes)


@pytest.mark.parametrize("bits", BITS)
def test_all_max_words(bits):
    # every word of every plane has all 32 bits set -> int32 -1
    packed = packing.pack(torch.full((2, 64), 2**bits - 1), bits)
    assert torch.equal(packed, torch.full_like(packed, -1))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", (1, 31, 32, 33, 100, 576))
def test_packed_words_matches_planes(bits, n):
    n_pad = -(-n // 32) * 32
    assert packing.padded_length(n) == n_pad
    # one word per 32 codes per bit: planes are powers of two that sum to `bits`
    assert sum(packing.planes(bits)) == bits
    assert packing.packed_words(n, bits) == n_pad * bits // 32


def test_planes_documented():
    assert {b: packing.planes(b) for b in BITS} == {
        8: (8,), 6: (4, 2), 5: (4, 1), 4: (4,), 3: (2, 1), 2: (2,)}


# -- the documented bit layout, pinned by hand-computed words ------------------------------
def test_layout_4bit_hand_computed():
    # codes 0..7 in one word: c_i in bits [4i, 4i+4) -> 0x76543210
    codes = torch.cat([torch.arange(8), torch.zeros(24, dtype=torch.int64)]).unsqueeze(0)
    packed = packing.pack(codes, 4)
    assert packed.shape == (1, 4)
    assert packed.tolist() == [[0x76543210, 0, 0, 0]]
    # codes 8..15 set the top bit: 0xFEDCBA98 read as int32
    codes = torch.arange(8, 16).unsqueeze(0)
    assert packing.pack(codes, 4).tolist() == [[0xFEDCBA98 - 2**32, 0, 0, 0]]


def test_layout_4bit_padding_and_second_word():
    # a 9th code goes to word 1; the 23 padding codes of the row are zeros
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8, 15]])
    assert packing.pack(codes, 4).tolist() == [[0x87654321 - 2**32, 0xF, 0, 0]]   # as int32


def test_layout_8bit_hand_computed():
    codes = torch.tensor([[0x11, 0x22, 0x33, 0x44, 0xAB]])
    # word 0 = c3 c2 c1 c0, word 1 = c4, words 2..7 padding
    assert packing.pack(codes, 8).tolist() == [[0x44332211, 0xAB, 0, 0, 0, 0, 0, 0]]


def test_layout_2bit_hand_computed():
    # 16 codes per word, c_i in bits [2i, 2i+2)
    codes = torch.tensor([[3, 0, 1, 2]])
    assert packing.pack(codes, 2).tolist() == [[3 | (1 << 4) | (2 << 6), 0]]


def test_layout_3bit_planes():
    # 3 bits = plane of width 2 (low bits, 2 words per 32 codes) then width 1 (high bit, 1 word)
    codes = torch.tensor([[5, 7, 2]])                                # 0b101, 0b111, 0b010
    low = (5 & 3) | ((7 & 3) << 2) | ((2 & 3) << 4)                 # 0b10_11_01
    high = (5 >> 2) | ((7 >> 2) << 1) | ((2 >> 2) << 2)             # 0b0_1_1
    assert packing.pack(codes, 3).tolist() == [[low, 0, high]]


def test_layout_6bit_planes():
    # 6 bits = width 4 (bits 0..3, 4 words per 32 codes) then width 2 (bits 4..5, 2 words)
    codes = torch.tensor([[0b110101, 0b001010]])
    low = 0b0101 | (0b1010 << 4)
    high = 0b11 | (0b00 << 2)
    assert packing.pack(codes, 6).tolist() == [[low, 0, 0, 0, high, 0]]


def test_layout_5bit_planes():
    codes = torch.tensor([[0b10011, 0b01111, 0b11111]])
    low = 0b0011 | (0b1111 << 4) | (0b1111 << 8)
    high = 1 | (0 << 1) | (1 << 2)
    assert packing.pack(codes, 5).tolist() == [[low, 0, 0, 0, high]]


def test_group_codes_are_whole_words():
    # a group of 64 codes at 4 bits is 8 contiguous words of the plane: packing a row equals
    # packing its groups one by one and concatenating plane by plane
    codes = _random_codes(3, 128, 4, seed=3)
    whole = packing.pack(codes, 4)
    parts = [packing.pack(codes[:, i:i + 64], 4) for i in (0, 64)]
    assert torch.equal(whole, torch.cat(parts, dim=1))


def test_rows_independent():
    codes = _random_codes(6, 33, 5, seed=4)
    whole = packing.pack(codes, 5)
    for r in range(6):
        assert torch.equal(whole[r:r + 1], packing.pack(codes[r:r + 1], 5))


# -- errors --------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", (0, 1, 7, 9, 16))
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="unsupported bit width"):
        packing.pack(torch.zeros(1, 32, dtype=torch.int64), bits)
    with pytest.raises(ValueError, match="unsupported bit width"):
        packing.unpack(torch.zeros(1, 4, dtype=torch.int32), bits, 32)
    with pytest.raises(ValueError, match="unsupported bit width"):
        packing.packed_words(32, bits)


@pytest.mark.parametrize("bits", BITS)
def test_codes_out_of_range(bits):
    with pytest.raises(ValueError, match=f"out of range for {bits} bits"):
        packing.pack(torch.tensor([[0, 2**bits]]), bits)
    with pytest.raises(ValueError, match="out of range"):
        packing.pack(torch.tensor([[-1, 0]]), bits)


def test_float_codes_rejected():
    with pytest.raises(TypeError, match="integer codes"):
        packing.pack(torch.zeros(1, 32), 4)


@pytest.mark.parametrize("shape", ((32,), (1, 2, 32)))
def test_pack_wrong_rank(shape):
    with pytest.raises(ValueError, match="2-D"):
        packing.pack(torch.zeros(shape, dtype=torch.int64), 4)


def test_unpack_wrong_width():
    packed = packing.pack(torch.zeros(2, 33, dtype=torch.int64), 4)    # 8 words (n_pad = 64)
    with pytest.raises(ValueError, match="expected 4"):
        packing.unpack(packed, 4, 32)
    with pytest.raises(ValueError, match="expected 12"):
        packing.unpack(packed, 6, 33)


def test_unpack_wrong_dtype_or_rank():
    packed = packing.pack(torch.zeros(2, 32, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="int32"):
        packing.unpack(packed.long(), 4, 32)
    with pytest.raises(ValueError, match="2-D"):
        packing.unpack(packed[0], 4, 32)
