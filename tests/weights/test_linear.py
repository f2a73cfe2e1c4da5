"""QINSLinear and QINSEmbedding against their own reference: the float layer they replace.

Weights are Gaussian with std 0.02 (the scale of LLM weights; qins-seed has no scale and
depends on it). Shapes: (64, 128) in groups of 32, (37, 200) in groups of 64 (200 = 3*64 + 8,
so the last group of a row takes 72 columns, and 37 rows is odd) and (37, 200) per channel.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qins.codec.packing import packed_words
from qins.codec.config import WeightConfig
from qins.weights.linear import QINSEmbedding, QINSLinear
from tests.reference_decode import reference_decode

STD = 0.02
SHAPES = [((64, 128), 32), ((37, 200), 64), ((37, 200), None)]
# Output SQNR floors (dB) of y = x W^T against the float layer, bias excluded. Measured with
# seeds 0-2 on the three SHAPES (min .. max): qins-4 20.4..22.3, qins-8 44.5..46.4,
# qins-3 14.4..16.2, int-sym-4 19.0..21.1, int-asym-4 19.9..22.8, nf4 20.2..22.1,
# fp8 32.0..33.0, qins-seed 18.0..18.8. Floors sit ~1.5 dB under the lowest: the codecs'
# own SQNR tests (tests/codec) hold the tight bounds; these catch a wiring error (wrong
# transpose, lost scale, wrong group), which costs tens of dB.
SQNR_FLOOR = {("qins", 4): 19.0, ("qins", 8): 43.0, ("qins", 3): 13.0, ("int-sym", 4): 17.5,
              ("int-asym", 4): 18.5, ("nf4", 4): 18.5, ("fp8", 8): 30.5, ("qins-seed", 8): 16.5}


def reference_weight(mod) -> torch.Tensor:
    """(O, I) float32 weight decoded from mod's buffers by the independent decoder
    (tests/reference_decode.py, which shares no code with the library)."""
    src = mod.tied_to if getattr(mod, "tied_to", None) is not None else mod
    return reference_decode(src.qweight, src.scales, src.offsets, src.curvature, src.config, src.weight_shape)


def sqnr_db(ref: torch.Tensor, x: torch.Tensor) -> float:
    ref, x = ref.detach().double(), x.detach().double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - x).pow(2).sum()))


def gaussian_linear(out_f: int, in_f: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out_f, in_f, generator=g) * STD)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g) * STD)
    return lin


def config(fmt: str, bits: int, group: int | None) -> WeightConfig:
    return WeightConfig(fmt, bits, None if fmt == "qins-seed" else group)   # qins-seed has no groups


def inputs(in_f: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(3, 5, in_f, generator=torch.Generator().manual_seed(seed)).to(dtype)   # (B, T, I)


@pytest.mark.parametrize("shape,group", SHAPES, ids=["64x128-g32", "37x200-g64", "37x200-ch"])
@pytest.mark.parametrize("fmt,bits", list(SQNR_FLOOR), ids=[f"{f}-{b}" for f, b in SQNR_FLOOR])
def test_forward_is_linear_of_decoded_weight_and_close_to_float(fmt, bits, shape, group):
    lin = gaussian_linear(*shape)
    q = QINSLinear.from_float(lin, config(fmt, bits, group))
    x = inputs(shape[1])
    with torch.no_grad():
        y = q(x)
        # F.linear over the weight decoded here from the stored buffers: the same fp32 weight,
        # so the same bits
        assert torch.equal(y, F.linear(x, reference_weight(q), q.bias))
        assert sqnr_db(lin(x) - lin.bias, y - q.bias) >= SQNR_FLOOR[(fmt, bits)]
    assert (q.in_features, q.out_features) == (shape[1], shape[0])


@pytest.mark.parametrize("bias", [True, False])
def test_bias_is_kept_in_float(bias):
    lin = gaussian_linear(37, 200, bias=bias)
    q = QINSLinear.from_float(lin, WeightConfig("int-sym", 4, 64))
    if bias:
        assert torch.equal(q.bias, lin.bias) and q.bias is not lin.bias     # a copy, bit-exact
        assert q.bias.dtype == torch.float32
    else:
        assert q.bias is None
        assert set(q.state_dict()) == {"qweight", "scales"}


def test_stored_tensors_have_declared_shapes_and_dtypes():
    # (37, 200) qins 4-bit g64: 200 codes padded to 224 (packing.py) = 28 words of 4-bit
    # codes per row; 3 groups per row (the last takes 72 columns)
    q = QINSLinear.from_float(gaussian_linear(37, 200), WeightConfig("qins", 4, 64))
    sd = q.state_dict()
    assert packed_words(200, 4) == 28
    assert (sd["qweight"].shape, sd["qweight"].dtype) == ((37, 28), torch.int32)
    assert (sd["scales"].shape, sd["scales"].dtype) == ((37, 3), torch.float16)
    assert (sd["curvature"].shape, sd["curvature"].dtype) == ((1,), torch.float32)
    assert "offsets" not in sd
    a = QINSLinear.from_float(gaussian_linear(37, 200), WeightConfig("int-asym", 4, 64))
    assert (a.offsets.shape, a.offsets.dtype) == ((37, 3), torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_casting_the_module_keeps_the_stored_format(dtype):
    # model.to(bf16) must not round the float16 scales to bf16 or the float32 curvature:
    # that moved decoded 8-bit weights by ~0.4 of a step before linear.py kept their dtype
    lin = gaussian_linear(64, 128)
    q = QINSLinear.from_float(lin, WeightConfig("qins", 8, 32))
    w = reference_weight(q)                                         # before the cast
    q.to(dtype)
    assert q.scales.dtype == torch.float16 and q.curvature.dtype == torch.float32
    assert q.qweight.dtype == torch.int32 and q.bias.dtype == dtype
    assert torch.equal(q.dequantize(), w)
    x = inputs(128, dtype=dtype)
    with torch.no_grad():
        y = q(x)
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, w.to(dtype), q.bias))


def test_conv1d_weight_is_transposed():
    from transformers.pytorch_utils import Conv1D
    # GPT-2's Conv1D(nf=out, nx=in) stores its weight as (in, out) and computes x @ W + b
    conv = Conv1D(48, 96)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(96, 48, generator=g) * STD)
        conv.bias.copy_(torch.randn(48, generator=g) * STD)
    q = QINSLinear.from_float(conv, WeightConfig("qins", 8, 32))
    assert (q.in_features, q.out_features) == (96, 48) and q.weight_shape == (48, 96)
    x = inputs(96)
    with torch.no_grad():
        y, y_ref = q(x), conv(x)
    # 8-bit: measured 47.9 dB against Conv1D's own forward; a transpose error would not even
    # have the right shape (96 != 48), and a decode of the wrong axis gives < 0 dB
    assert y.shape == y_ref.shape == (3, 5, 48)
    assert sqnr_db(y_ref - conv.bias, y - q.bias) >= 43.0
    assert sqnr_db(conv.weight.t(), q.dequantize()) >= 43.0
    assert torch.equal(q.bias, conv.bias)


def test_unsupported_module_is_a_type_error_naming_it():
    with pytest.raises(TypeError, match=r"blocks\.0\.conv.*Conv2d"):
        QINSLinear.from_float(nn.Conv2d(4, 4, 3), WeightConfig(), name="blocks.0.conv")


def test_nan_weight_is_a_value_error_naming_the_layer():
    lin = gaussian_linear(64, 128)
    with torch.no_grad():
        lin.weight[3, 7] = float("inf")
    with pytest.raises(ValueError, match=r"layers\.1\.up_proj: 1 NaN/Inf"):
        QINSLinear.from_float(lin, WeightConfig(), name="layers.1.up_proj")


def gaussian_embedding(n: int = 100, d: int = 96, padding_idx=None) -> nn.Embedding:
    emb = nn.Embedding(n, d, padding_idx=padding_idx)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * STD)
    return emb


# (format, bits, group, table SQNR floor dB): measured 22.1, 14.8 and 18.7 dB on this table
@pytest.mark.parametrize("fmt,bits,group,floor", [("qins", 4, 32, 20.5), ("int-asym", 3, 64, 13.5),
                                                  ("qins-seed", 8, None, 17.0)])
def test_embedding_lookup_is_rows_of_the_decoded_table(fmt, bits, group, floor):
    emb = gaussian_embedding(padding_idx=0)
    q = QINSEmbedding.from_float(emb, WeightConfig(fmt, bits, group))
    assert q.padding_idx == 0 and (q.num_embeddings, q.embedding_dim) == (100, 96)
    ids = torch.tensor([[0, 5, 99, 5, 42], [17, 1, 2, 98, 0]])       # (2, 5), repeats and ends
    table = q.dequantize()                                          # (100, 96)
    out = q(ids)
    assert out.shape == (2, 5, 96) and out.dtype == torch.float32
    # decoding only the looked-up rows gives the rows of the table decoded here
    assert torch.equal(table, reference_weight(q))
    assert torch.equal(out, reference_weight(q)[ids])
    # and the table is the float one within the format's error
    assert sqnr_db(emb.weight, table) >= floor


def test_scaled_embedding_keeps_its_scale():
    class ScaledEmbedding(nn.Embedding):                            # Gemma-style sqrt(d) scale
        def __init__(self, *a, embed_scale: float, **kw):
            super().__init__(*a, **kw)
            self.embed_scale = embed_scale

        def forward(self, ids):
            return super().forward(ids) * self.embed_scale

    emb = ScaledEmbedding(100, 96, embed_scale=96 ** 0.5)
    with torch.no_grad():
        emb.weight.copy_(gaussian_embedding().weight)
    q = QINSEmbedding.from_float(emb, WeightConfig("int-sym", 8, 32))
    ids = torch.tensor([3, 4, 50])
    out = q(ids)
    assert torch.equal(out, reference_weight(q)[ids] * 96 ** 0.5)
    # and the float module's own output within 8-bit error: measured 44.6 dB (a lost scale
    # measured 0.9 dB)
    with torch.no_grad():
        assert sqnr_db(emb(ids), out) >= 40.0


def test_cache_decoded_gives_identical_outputs():
    lin = gaussian_linear(37, 200)
    q = QINSLinear.from_float(lin, WeightConfig("qins", 4, 64))
    e = QINSEmbedding.from_float(gaussian_embedding(), WeightConfig("qins", 4, 32))
    x, ids = inputs(200), torch.tensor([[1, 2, 3], [99, 0, 50]])
    with torch.no_grad():
        y, rows = q(x), e(ids)
        for m in (q, e):
            m.cache_decoded(True)
        assert q._decoded is not None and e._decoded is not None
        assert torch.equal(q(x), y) and torch.equal(e(ids), rows)
        for m in (q, e):
            m.cache_decoded(False)
        assert q._decoded is None and e._decoded is None
        assert torch.equal(q(x), y) and torch.equal(e(ids), rows)


@pytest.mark.parametrize("bias", [False, True])
def test_tied_linear_reads_the_embedding_codes(bias):
    emb = QINSEmbedding.from_float(gaussian_embedding(), WeightConfig("qins", 4, 32))
    head = QINSLinear(96, 100, bias, None, tied_to=emb)
    # no buffers of its own: the codes are stored once, in the embedding
    assert list(head.buffers()) == []
    assert set(head.state_dict()) == ({"bias"} if bias else set())
    assert head.quantized.qweight is emb.qweight and head.config == emb.config
    assert head.tied_to is emb and "tied" in repr(head)
    assert emb not in list(head.modules())                          # not a submodule: no double save
    x = inputs(96)
    with torch.no_grad():
        y = head(x)
        assert torch.equal(y, F.linear(x, reference_weight(emb), head.bias))
        emb.cache_decoded(True)                                     # the head uses the embedding's cache
        assert torch.equal(head(x), y)
        emb.cache_decoded(False)


def test_tied_linear_shape_mismatch_is_an_error():
    emb = QINSEmbedding.from_float(gaussian_embedding(100, 96), WeightConfig("int-sym", 4, 32))
    with pytest.raises(ValueError, match="tied embedding shape"):
        QINSLinear(64, 100, False, None, tied_to=emb)
