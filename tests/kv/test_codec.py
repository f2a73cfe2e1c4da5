"""The KV codec (kv/codec.py): round trips bounded by the format's step, zero points, mixed-width keys."""
from __future__ import annotations

import pytest
import torch

from qins.kv.codec import (Codec, dequantize_keys, dequantize_keys_mixed, dequantize_values, quantize_keys, quantize_keys_mixed,
                          quantize_values, zero_point_table)

BITS = (2, 3, 4, 5, 6, 8)


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


def test_zero_group_decodes_to_zero():
    codec = Codec.build("qins", 4, 1.0)
    x = torch.zeros(1, 1, 64, 8)
    kc, ks, kz = quantize_keys(x, codec, 64)
    assert torch.equal(dequantize_keys(kc, ks, kz, codec, 64, torch.float32), x)
    codec = Codec.build("qins", 4, 1.0, zero_point=True)               # constant groups are exact too
    x = torch.full((1, 1, 64, 8), 3.0)
    kc, ks, kz = quantize_keys(x, codec, 64)
    assert torch.equal(dequantize_keys(kc, ks, kz, codec, 64, torch.float32), x)


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
