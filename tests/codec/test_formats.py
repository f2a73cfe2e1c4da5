"""Every format behind one decode-table interface (codec/formats.py)."""
from __future__ import annotations

import pytest
import torch

from qins.codec import formats
from qins.codec.formats import FORMATS, get_format, n_levels, table

# documented in the formats.py docstring: format -> supported bits
SUPPORTED = {
    "qins": (2, 3, 4, 5, 6, 8),
    "int-sym": (2, 3, 4, 5, 6, 8),
    "int-asym": (2, 3, 4, 5, 6, 8),
    "nf4": (4,),
    "fp8": (8,),
    "qins-seed": (8,),
}
ALL = [(f, b) for f, bs in SUPPORTED.items() for b in bs]


def _documented_levels(fmt: str, bits: int) -> int:
    return {
        "qins": 2**bits,                    # sign(j) v(|j|/N), j = -(N-1)..N
        "int-sym": 2 * (2 ** (bits - 1) - 1) + 1,   # k/K, k = -K..K
        "int-asym": 2**bits,
        "nf4": 16,
        "fp8": 253,                         # finite e4m3fn values, +-0 merged
        "qins-seed": 256,                   # one value per code (in z order, see below)
    }[fmt]


def test_format_names_are_the_contract():
    assert set(FORMATS) == set(SUPPORTED)
    for name, bits in SUPPORTED.items():
        assert get_format(name).bits == bits
        assert get_format(name).name == name


@pytest.mark.parametrize("fmt,bits", ALL)
def test_levels_count_and_order(fmt, bits):
    t = table(fmt, bits, 1.5 if fmt == "qins" else None)
    assert t.shape == (1, 2**bits) and t.dtype == torch.float32
    assert torch.isfinite(t).all()
    n = n_levels(fmt, bits)
    assert n == _documented_levels(fmt, bits)
    levels = t[0, :n]
    if fmt == "qins-seed":
        # the seed's codes follow z = 2c/255 - 1, so its table is not sorted; 255 distinct
        # values (+0 and -0 at codes 255 and 0)
        assert torch.unique(levels).numel() == 255
    else:
        assert (levels[1:] > levels[:-1]).all()
    assert (t[0, n:] == 0).all()                                     # spare codes decode to 0


@pytest.mark.parametrize("fmt,bits", ALL)
def test_zero_is_a_level(fmt, bits):
    levels = table(fmt, bits)[0, :n_levels(fmt, bits)]
    assert (levels == 0).any()


@pytest.mark.parametrize("fmt,bits", [(f, b) for f, b in ALL if f not in ("int-asym", "qins-seed")])
def test_scaled_symmetric_range(fmt, bits):
    # normalized tables of the scaled formats reach exactly 1.0 (the group max)
    t = table(fmt, bits, 0.7 if fmt == "qins" else None)
    assert t.max().item() == 1.0
    assert t.min().item() >= -1.0


def test_int_asym_table():
    for bits in SUPPORTED["int-asym"]:
        assert torch.equal(table("int-asym", bits)[0], torch.arange(2**bits, dtype=torch.float32))


def test_int_sym_equals_qins_symmetric_at_zero():
    for bits in SUPPORTED["int-sym"]:
        k = 2 ** (bits - 1) - 1
        expect = (torch.arange(-k, k + 1, dtype=torch.float64) / k).float()
        t = table("int-sym", bits)[0]
        assert torch.equal(t[:2 * k + 1], expect)
        assert t[-1].item() == 0.0


def test_qins_table_at_default_curvature_is_twos_complement():
    # curvature None -> a = 0 -> j/N
    for bits in SUPPORTED["qins"]:
        n = 2 ** (bits - 1)
        expect = torch.arange(-(n - 1), n + 1, dtype=torch.float32) / n
        assert torch.equal(table("qins", bits)[0], expect)


def test_qins_table_one_row_per_curvature():
    a = torch.tensor([0.0, 1.0, 13.0])
    t = table("qins", 4, a)
    assert t.shape == (3, 16)
    assert torch.equal(t[1], table("qins", 4, 1.0)[0])
    # a float32 curvature is read exactly as stored (float64 widening is exact)
    assert torch.equal(table("qins", 4, torch.tensor([0.3])), table("qins", 4, 0.30000001192092896))


def test_fp8_table_is_e4m3fn_over_448():
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = vals[torch.isfinite(vals)]
    assert finite.numel() == 254                                     # 0x7F, 0xFF are NaN
    ref = torch.unique(finite) / 448.0                               # +0 / -0 merged
    assert ref.numel() == 253
    t = table("fp8", 8)[0]
    assert torch.equal(t[:253], ref)
    assert t[0].item() == -1.0 and t[252].item() == 1.0              # +-448 / 448
    assert (t[253:] == 0).all()
    # 126 negative values, zero at index 126, then the smallest positive value: the
    # subnormal 2^-9, divided by 448 in float32
    assert t[126].item() == 0.0
    assert t[127].item() == (torch.tensor(2.0**-9) / 448.0).item()


def test_nf4_table():
    t = table("nf4", 4)[0]
    assert t.numel() == 16
    assert t[0].item() == -1.0 and t[-1].item() == 1.0 and t[7].item() == 0.0
    assert torch.unique(t).numel() == 16
    assert (t[1:] > t[:-1]).all()
    # QLoRA's construction (bitsandbytes create_normal_map, offset 0.9677083): 8 positive
    # quantiles of N(0, 1) at linspace(offset, 0.5, 9)[:-1], 7 negative at
    # linspace(offset, 0.5, 8)[:-1], and 0; divided by the largest. The published code book
    # was rounded through float32 on the way: measured max difference 4.3e-8 with the float32
    # linspace used here; atol 1e-7 (the table's entries are >= 0.08 apart)
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    ref = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    ref = ref / ref.abs().max()
    torch.testing.assert_close(t.double(), ref, rtol=0, atol=1e-7)
    # and two entries of the published code book, to the last float32 bit
    assert t[8].item() == pytest.approx(0.07958029955625534, rel=0, abs=0)
    assert t[1].item() == pytest.approx(-0.6961928009986877, rel=0, abs=0)


def test_table_accepts_format_object():
    f = get_format("int-sym")
    assert torch.equal(table(f, 4), table("int-sym", 4))
    assert n_levels(f, 4) == n_levels("int-sym", 4)


@pytest.mark.parametrize("name", ("qinz", "INT-SYM", "", "int4", "fp16"))
def test_unknown_format(name):
    with pytest.raises(ValueError, match=f"unknown format {name!r}"):
        get_format(name)
    with pytest.raises(ValueError, match="unknown format"):
        table(name, 4)
    with pytest.raises(ValueError, match="unknown format"):
        n_levels(name, 4)


@pytest.mark.parametrize("fmt,bits", [
    ("qins", 7), ("qins", 1), ("qins", 16), ("int-sym", 7), ("int-asym", 0),
    ("nf4", 3), ("nf4", 8), ("fp8", 4), ("qins-seed", 4), ("qins-seed", 16),
])
def test_unsupported_bits(fmt, bits):
    with pytest.raises(ValueError, match=rf"format {fmt!r} supports bits .* got {bits}"):
        table(fmt, bits)
    with pytest.raises(ValueError, match=f"got {bits}"):
        get_format(fmt).check_bits(bits)


def test_supported_bits_match_packing():
    from qins.codec.packing import SUPPORTED_BITS
    for f in FORMATS.values():
        assert set(f.bits) <= set(SUPPORTED_BITS)


def test_format_flags():
    assert formats.FORMATS["int-asym"].asymmetric
    assert formats.FORMATS["qins"].curved and formats.FORMATS["qins"].signed_scale
    assert not formats.FORMATS["qins-seed"].scaled and formats.FORMATS["qins-seed"].seed_rounding
    assert not any(f.curved for n, f in FORMATS.items() if n != "qins")
