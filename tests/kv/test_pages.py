"""The page math and layout: round trips bounded by the format's step, exact packing."""
from __future__ import annotations

import pytest
import torch

from qins.codec.packing import pack, unpack
from qins.kv.pages import (Codec, Page, dequantize_keys, dequantize_values, pack_rows, page_tokens,
                           quantize_keys, quantize_values, unpack_rows)

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


@pytest.mark.parametrize("fmt,a", [("qins", 0.0), ("qins", 2.0), ("int-sym", 0.0)])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_bounded_by_step(fmt, a, bits):
    codec = Codec.build(fmt, bits, a)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 3, 128, 40, generator=g) * torch.linspace(0.1, 8, 40)   # outlier channels
    kc, ks = quantize_keys(x, codec, 64)
    assert ks.shape == (2, 3, 2, 40) and ks.dtype == torch.float16
    k = dequantize_keys(kc, ks, codec, 64, torch.float32)
    vc, vs = quantize_values(x, codec)
    assert vs.shape == (2, 3, 128)
    v = dequantize_values(vc, vs, codec, torch.float32)
    # error <= half the widest step of the table times |scale|, or, for the signed-scale qins
    # table, the gap between its short side's end and -1 (at 2 bits levels are -.5, 0, .5, 1)
    half = max(0.5 * _max_step(codec), 1.0 + float(codec.lut[0]))
    # + |s| 2^-10: the fp16 scale may round below the group's extreme, which then clamps
    sk = ks.float().abs().repeat_interleave(64, dim=2)
    assert ((k - x).abs() <= (half + 2**-10) * sk + 1e-6).all()
    assert ((v - x).abs() <= (half + 2**-10) * vs.float().abs().unsqueeze(-1) + 1e-6).all()
    # the extreme of every key group is within fp16 rounding of the scale (signed: exact level)
    if fmt == "qins":
        ext = k.view(2, 3, 2, 64, 40).abs().amax(3)
        torch.testing.assert_close(ext, ks.float().abs(), rtol=1e-3, atol=0)


def test_zero_group_decodes_to_zero():
    codec = Codec.build("qins", 4, 1.0)
    x = torch.zeros(1, 1, 64, 8)
    kc, ks = quantize_keys(x, codec, 64)
    assert torch.equal(dequantize_keys(kc, ks, codec, 64, torch.float32), x)


def test_page_size_and_bytes():
    # SmolLM2-135M: 3 KV heads of 64; 8 bits -> 390 B/token + a 384 B key-scale row per group
    assert page_tokens(32, 3, 64, 8, 8, 64) == 64
    assert page_tokens(32, 3, 64, 4, 4, 64) == 128
    assert page_tokens(32, 3, 64, 2, 2, 64) == 256
    assert page_tokens(16, 3, 64, 8, 8, 64) == 64          # at least one group
    p = Page(2, 3, 64, 128, 64, 4, 4, "cpu")
    assert p.nbytes() == 2 * 3 * (128 * 8 * 4 * 2 + 2 * 64 * 2 + 128 * 2)
    assert p.nbytes() <= 2 * 32 * 1024                      # page_kb per batch row
