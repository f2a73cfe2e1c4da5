"""The page math and layout: round trips bounded by the format's step, exact packing."""
from __future__ import annotations

import pytest
import torch

from qins.codec.packing import pack, unpack
from qins.kv.pages import (Codec, PageStore, RowLayout, affine_levels, byte_fit, dequantize_keys_mixed,
                           quantize_keys_mixed, decode_levels, dequantize_keys, dequantize_values, pack_rows,
                           page_tokens, quantize_keys, quantize_values, unpack_rows, zero_point_table)

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


def _max_step(codec: Codec) -> float:
    lv = codec.lut[: codec.mids.numel() + 1]
    return float((lv[1:] - lv[:-1]).max())


@pytest.mark.parametrize("zero", [False, True])
@pytest.mark.parametrize("fmt,a", [("qins", 0.0), ("qins", 2.0), ("int-sym", 0.0)])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_bounded_by_step(fmt, a, bits, zero):
    codec = Codec.build(fmt, bits, a, zero)
    g = torch.Generator().manual_seed(bits)
    # outlier channels with a non-zero centre (as keys have)
    x = torch.randn(2, 3, 128, 40, generator=g) * torch.linspace(0.1, 8, 40) + torch.linspace(-5, 5, 40)
    kc, ks, kz = quantize_keys(x, codec, 64)
    assert ks.shape == (2, 3, 2, 40) and ks.dtype == torch.float16
    assert (kz is None) == (not zero) and (kz is None or kz.shape == ks.shape)
    k = dequantize_keys(kc, ks, kz, codec, 64, torch.float32)
    vc, vs, vz = quantize_values(x, codec)
    assert vs.shape == (2, 3, 128)
    v = dequantize_values(vc, vs, vz, codec, torch.float32)
    # error <= half the widest step of the table times the scale, or, for the signed-scale qins
    # table, the gap between its short side's end and -1 (at 2 bits levels are -.5, 0, .5, 1)
    half = 0.5 * _max_step(codec) if zero else max(0.5 * _max_step(codec), 1.0 + float(codec.lut[0]))
    # + |s| 2^-10: the fp16 scale (and zero point) may round inside the group's range, which then clamps
    sk = ks.float().abs().repeat_interleave(64, dim=2)
    tol = 2**-10 if not zero else 2**-9
    assert ((k - x).abs() <= (half + tol) * sk + 1e-3 * zero + 1e-6).all()
    assert ((v - x).abs() <= (half + tol) * vs.float().abs().unsqueeze(-1) + 1e-3 * zero + 1e-6).all()
    # the extremes of every key group are exact levels, up to fp16 rounding of scale and zero point
    if zero:
        xv, kv = x.view(2, 3, 2, 64, 40), k.view(2, 3, 2, 64, 40)
        ulp = 2**-10 * (kz.float().abs() + ks.float().abs()) + 1e-6      # fp16 rounding of m and s
        assert ((kv.amax(3) - xv.amax(3)).abs() <= ulp).all() and ((kv.amin(3) - xv.amin(3)).abs() <= ulp).all()
    elif fmt == "qins":
        ext = k.view(2, 3, 2, 64, 40).abs().amax(3)
        torch.testing.assert_close(ext, ks.float().abs(), rtol=1e-3, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("a", [0.0, 1.0])
def test_zero_point_table(bits, a):
    t = zero_point_table(bits, a)
    assert t.shape == (2**bits,) and t[0] == -1 and t[-1] == 1
    assert (t[1:] > t[:-1]).all() and torch.equal(t, -t.flip(0))      # increasing, symmetric
    if a == 0:                                                        # uniform: asymmetric INT
        torch.testing.assert_close(t[1:] - t[:-1], torch.full((2**bits - 1,), 2 / (2**bits - 1)))


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


def test_zero_group_decodes_to_zero():
    codec = Codec.build("qins", 4, 1.0)
    x = torch.zeros(1, 1, 64, 8)
    kc, ks, kz = quantize_keys(x, codec, 64)
    assert torch.equal(dequantize_keys(kc, ks, kz, codec, 64, torch.float32), x)
    codec = Codec.build("qins", 4, 1.0, zero_point=True)               # constant groups are exact too
    x = torch.full((1, 1, 64, 8), 3.0)
    kc, ks, kz = quantize_keys(x, codec, 64)
    assert torch.equal(dequantize_keys(kc, ks, kz, codec, 64, torch.float32), x)


def test_page_size_and_bytes():
    # SmolLM2-135M: 3 KV heads of 64; 8 bits -> 390 B/token + a 384 B key-scale row per group
    assert page_tokens(32, 3, 64, 8, 8, 64) == 64
    assert page_tokens(32, 3, 64, 4, 4, 64) == 128
    assert page_tokens(32, 3, 64, 2, 2, 64) == 256
    assert page_tokens(16, 3, 64, 8, 8, 64) == 64          # at least one group
    # 4 bits, group 128 with key zero points: 24576 B of codes + 768 v scales + 768 k scales/zeros
    assert page_tokens(32, 3, 64, 4, 4, 128, k_zero=True) == 128
    p = PageStore(1, 3, 64, 128, 128, 4, 4, "cpu", k_zero=True, pages=1)
    assert p.nbytes() == 3 * (128 * 8 * 4 * 2 + 64 * 2 * 2 + 128 * 2) <= 32 * 1024
    p = PageStore(2, 3, 64, 128, 64, 4, 4, "cpu", pages=1)
    assert p.nbytes() == 2 * 3 * (128 * 8 * 4 * 2 + 2 * 64 * 2 + 128 * 2)
    assert p.nbytes() <= 2 * 32 * 1024                      # page_kb per batch row
    assert PageStore(2, 3, 64, 128, 64, 4, 4, "cpu", pages=5).nbytes() == 5 * p.nbytes()


def test_page_store_grows_by_whole_pages_and_keeps_pages():
    # one contiguous tensor per plane; pages are token ranges; growth keeps written pages
    g = torch.Generator().manual_seed(0)
    st = PageStore(2, 3, 64, 32, 16, 4, 4, "cpu", k_zero=True)
    assert st.capacity == 0 and st.nbytes() == 0 and st.n_pages == 0
    written = []
    for n in (16, 48, 32, 16, 160):
        kc = torch.randint(-2**31, 2**31 - 1, (2, 3, n, 8), generator=g, dtype=torch.int32)
        ks, kz = torch.randn(2, 3, n // 16, 64, generator=g).half(), torch.randn(2, 3, n // 16, 64, generator=g).half()
        vc = torch.randint(-2**31, 2**31 - 1, (2, 3, n, 8), generator=g, dtype=torch.int32)
        vs = torch.randn(2, 3, n, generator=g).half()
        st.write_groups(kc, ks, kz, vc, vs, None)
        written.append((kc, ks, kz, vc, vs))
        assert st.capacity % 32 == 0 and st.capacity >= st.n_tokens
        kw, kss, kzz, vw, vss, vz = st.planes()
        assert vz is None and st.v_zero is None
        cat = lambda i: torch.cat([w[i] for w in written], 2)
        for got, i in ((kw, 0), (kss, 1), (kzz, 2), (vw, 3), (vss, 4)):
            assert torch.equal(got, cat(i))
    assert st.n_tokens == 272 and st.n_pages == 9 and not st.page_sealed(8) and st.page_sealed(7)
    k_codes, k_scale, k_zero, v_codes, v_scale = st.page_tensors(2)
    assert torch.equal(k_codes, st.k_codes[:, :, 64:96]) and torch.equal(k_scale, st.k_scale[:, :, 4:6])
    assert k_codes.stride(-1) == 1 and k_codes[0, 0].is_contiguous()   # one (b, h): P*W consecutive words
    assert st.nbytes() == sum(t.numel() * t.element_size() for t in st.tensors())
    st.truncate(3)
    assert st.n_tokens == 48 and st.n_pages == 2


# -- row layouts ---------------------------------------------------------------------------------
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


def test_mixed_keys_at_one_width_equal_the_uniform_codec():
    # widths all 4 reproduce the 4-bit zero-point codec (same r, m, codes on random data)
    k = torch.randn(2, 3, 256, 64, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    w = torch.full((3, 64), 4)
    c1, r1, m1 = quantize_keys_mixed(k, w, 128)
    codec = Codec.build("qins", 4, 0.0, True)
    c2, r2, m2 = quantize_keys(k, codec, 128)
    assert torch.equal(c1, c2) and torch.equal(r1, r2) and torch.equal(m1, m2)
    # decode as base + step * code: fp32 rounding of the fold only
    torch.testing.assert_close(dequantize_keys_mixed(c1, r1, m1, w, 128, torch.float32),
                               dequantize_keys(c2, r2, m2, codec, 128, torch.float32), rtol=1e-6, atol=1e-6)


def test_mixed_keys_error_falls_with_width_and_zero_width_is_the_mid_range():
    k = torch.randn(1, 1, 128, 9, generator=torch.Generator().manual_seed(1))
    w = torch.arange(9).view(1, 9)                            # channel d gets d bits
    c, r, m = quantize_keys_mixed(k, w, 128)
    x = dequantize_keys_mixed(c, r, m, w, 128, torch.float32)
    err = (x - k).pow(2).mean((0, 1, 2))
    assert torch.equal(c[..., 0], torch.zeros_like(c[..., 0]))
    torch.testing.assert_close(x[..., 0], m[..., 0].float().expand(1, 1, 128))
    assert all(err[i + 1] < err[i] for i in range(1, 8))      # each added bit lowers the error
    lo, hi = k.amin(2), k.amax(2)                             # both ends exact at >= 1 bit (fp16 r, m)
    assert (x.amax(2)[..., 1:] - hi[..., 1:]).abs().max() < 1e-2 and (x.amin(2)[..., 1:] - lo[..., 1:]).abs().max() < 1e-2
