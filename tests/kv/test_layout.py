"""KV row layouts (kv/layout.py): exact packing, uniform and mixed rows, byte decode."""
from __future__ import annotations

import pytest
import torch

from qins.codec.packing import unpack
from qins.kv.codec import Codec, affine_levels
from qins.kv.layout import RowLayout, byte_fit, decode_levels, pack_rows, unpack_rows

BITS = (2, 3, 4, 5, 6, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [64, 16, 40])          # round, small, not a multiple of 32
def test_unpack_rows_exact(bits, d):
    g = torch.Generator().manual_seed(bits * 100 + d)
    codes = torch.randint(0, 2**bits, (2, 3, 5, d), generator=g)
    words = pack_rows(codes, bits)
    assert words.dtype == torch.int32 and words.shape[:3] == (2, 3, 5)
    assert torch.equal(unpack_rows(words, bits, d).long(), codes)
    # the byte-view fast paths agree with the generic unpacker
    assert torch.equal(unpack_rows(words, bits, d), unpack(words.reshape(-1, words.shape[-1]), bits, d).view(2, 3, 5, d))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("d", [64, 40])
@pytest.mark.parametrize("a", [0.0, 1.0])
def test_decode_levels_matches_lut(bits, zero, d, a):
    # the byte-gather decode (affine codes or table lookup) equals unpack + table lookup
    codec = Codec.build("qins", bits, a, zero)
    codes = torch.randint(0, 2**bits, (2, 3, 7, d), generator=torch.Generator().manual_seed(bits))
    words = pack_rows(codes, bits)
    got, want = decode_levels(words, codec, d), codec.lut[codes.long()]
    if affine_levels(codec) is None:
        assert torch.equal(got, want)
    else:   # uniform levels decode as alpha * code + beta in float32: within 2 ulp of the table
        torch.testing.assert_close(got, want, rtol=0, atol=2 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("d", [64, 40, 128])
def test_uniform_layout_is_pack_rows_bit_for_bit(bits, d):
    codes = torch.randint(0, 2**bits, (2, 3, 5, d), generator=torch.Generator().manual_seed(d + bits))
    lay = RowLayout.uniform(3, d, bits)
    words = lay.pack(codes)
    assert lay.n_words == words.shape[3] and torch.equal(words, pack_rows(codes, bits))
    assert torch.equal(lay.unpack(words), codes.to(torch.uint8))
    store = torch.zeros(2, 3, 9, lay.n_words, dtype=torch.int32)      # a strided prefix, as a PageStore reads
    store[:, :, :5] = words
    assert torch.equal(lay.unpack(store[:, :, :5]), codes.to(torch.uint8))


@pytest.mark.parametrize("seed", range(4))
def test_mixed_layout_round_trip(seed):
    g = torch.Generator().manual_seed(seed)
    widths = torch.randint(0, 9, (3, 64), generator=g)
    lay = RowLayout.mixed(widths)
    codes = (torch.rand(2, 3, 7, 64, generator=g) * (2.0 ** widths).view(1, 3, 1, 64)).floor().to(torch.uint8)
    assert torch.equal(lay.unpack(lay.pack(codes)), codes)
    # first-fit decreasing wastes less than one byte per distinct width class in each head
    assert lay.n_words * 32 < int(widths.sum(1).max()) + 8 * 9 + 32


def test_byte_fit_places_disjoint_fields():
    widths = [8, 6, 5, 3, 3, 2, 2, 4, 4, 0, 1, 7]
    idx, shift, n = byte_fit(widths)
    used = {}
    for w, i, s in zip(widths, idx, shift):
        if w:
            assert s + w <= 8
            bits = set(range(i * 8 + s, i * 8 + s + w))
            assert not bits & set(used)
            used.update(dict.fromkeys(bits))
    assert n == 6                                             # 45 bits: 8 | 7+1 | 6+2 | 5+3 | 4+4 | 3+2


@pytest.mark.parametrize("widths", [torch.full((2, 8), 9), torch.full((2, 8), -1), torch.zeros(8)])
def test_mixed_layout_rejects_bad_widths(widths):
    with pytest.raises(ValueError, match="widths"):
        RowLayout.mixed(widths)
