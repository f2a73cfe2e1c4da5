"""The CUDA decode-attention kernel (kernels/cuda_kv.py, csrc/kv_decode.cu) against the reference
(every token decoded to float, then SDPA) and against the Triton kernel, on the same pages.

CUDA C++ cannot run under Triton's interpreter: on a machine without a GPU only the checks that
need none run (the routing, the pair table, the refusals); the kernel cases run on a GPU with
nvcc. Tolerance as tests/kernels/test_kv_attention.py: q * key scale and p * value scale are
rounded to fp16 for the tensor cores (relative 2^-11 per product), the output to the query's
dtype. So the absolute score error grows with the score: an outlier token 20x the others quantized
into the pages (no sink) measured 1e-2 to 2.5e-2 against the reference in both kernels (H200,
2026-12-04); the cases keep such a token only where it is a sink."""

import pytest
import torch

from qins.kernels import cuda_kv
from qins.kv.attention import float_segment, reference_attention
from qins.kv.layer import QINSLayer

from .conftest import CUDA, DEVICE, needs_triton

pytestmark = needs_triton
TOL = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
GPU_OK = CUDA and cuda_kv.why_not("cuda") is None
needs_kernel = pytest.mark.skipif(not GPU_OK, reason="needs a CUDA GPU (sm_80+) and nvcc")

CASES = [  # (k_bits, v_bits, group, k_zero, v_zero, v_curvature, sink, residual, D, H, QH, dtype, tokens)
    (4, 4, 128, True, False, 0.5, 1, 128, 128, 8, 4, torch.bfloat16, 3000),    # the 4-bit defaults, Llama-3-8B heads
    (4, 4, 64, True, False, 0.0, 1, 5, 128, 8, 4, torch.float16, 2000),         # affine values
    (8, 8, 64, False, False, 0.0, 1, 128, 128, 8, 4, torch.bfloat16, 3000),    # the 8-bit defaults (key offset)
    (4, 4, 32, True, True, 0.0, 3, 0, 64, 3, 3, torch.float32, 1000),           # D 64, value zero points, 3 sinks
    (8, 8, 16, True, False, 0.0, 0, 7, 64, 2, 8, torch.float16, 700),           # 8 query heads per KV head, no sink
    (4, 4, 128, True, False, 0.5, 1, 0, 128, 4, 1, torch.bfloat16, 1500),       # one query head per KV head
    (8, 8, 16, True, False, 0.0, 0, 7, 64, 2, 4, torch.float16, 700),
    (8, 8, 64, True, False, 0.0, 0, 7, 64, 2, 8, torch.float16, 700),
    (8, 8, 16, False, False, 0.0, 0, 7, 64, 2, 8, torch.float16, 700),
    (8, 8, 16, True, False, 0.0, 0, 7, 128, 2, 8, torch.float16, 700),
    (8, 8, 16, True, False, 0.0, 1, 7, 64, 2, 8, torch.float16, 700),
    (4, 4, 16, True, False, 0.0, 0, 7, 64, 2, 8, torch.float16, 700),
    (8, 8, 16, True, False, 0.0, 0, 7, 64, 2, 8, torch.float32, 700),
]


def _layer(case, monkeypatch):
    kb, vb, group, k_zero, v_zero, a, sink, residual, D, H, QH, dtype, n = case
    g = torch.Generator().manual_seed(kb * 100 + group + D)
    monkeypatch.setenv("QINS_KERNELS", "reference")          # pages written by the torch path
    layer = QINSLayer(kb, vb, residual=residual, group=group, page_kb=16, sink=sink, k_zero=k_zero, v_zero=v_zero,
                      v_curvature=a, expect_heads=H, expect_head_dim=D)
    B = 3
    x = torch.randn(B, H, n, D, generator=g) * 2 + 0.3
    if sink:
        x[:, :, 0] *= 20                                      # an outlier sink token (kept in fp16)
    layer.update(x.to(DEVICE, dtype), x.flip(3).mul(1.5).to(DEVICE, dtype))
    layer.crop(-(layer.keys.shape[2] + 5))                    # into the pages: the last group open
    layer.update(x[:, :, :3].to(DEVICE, dtype), x[:, :, 3:6].to(DEVICE, dtype))
    q = (torch.randn(B, H * QH, 1, D, generator=g) * 2).to(DEVICE, dtype)
    return layer, q


def _call(layer, q, **kw):
    from qins.kernels.triton_kv import kv_decode_attention
    fk, fv, skip = float_segment(layer)
    planes = tuple(getattr(layer.pool, p) for p in layer.pool.PLANES)
    D = q.shape[-1]
    return kv_decode_attention(q[:, :, 0], planes, layer.table.ids, layer.n_quantized, skip, layer.k_offset,
                               layer.k_codec.lut, layer.v_codec.lut, layer._k_affine, layer._v_affine,
                               layer.k_codec.bits, layer.v_codec.bits, layer.group, fk, fv, D ** -0.5, **kw)


@needs_kernel
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"k{c[0]}v{c[1]}g{c[2]}d{c[8]}qh{c[10]}")
def test_cuda_kernel_matches_reference(case, monkeypatch):
    layer, q = _layer(case, monkeypatch)
    assert layer.n_quantized % layer.group               # the last tile ends inside a group
    D, dtype = q.shape[-1], q.dtype
    ref = reference_attention(layer, q.float(), D ** -0.5)[:, :, 0]
    triton = _call(layer, q, cuda=False).float()
    terr = float((triton - ref).abs().max() / ref.abs().max())
    for splits in (None, 1, 7):
        got = _call(layer, q, cuda=True, splits=splits).float()
        assert torch.isfinite(got).all()
        err = float((got - ref).abs().max() / ref.abs().max())
        assert err <= TOL[dtype], f"splits={splits}: relative max error {err:.2e} against the reference (Triton {terr:.2e})"
        # the Triton kernel rounds the same products to fp16 (its key scale times alpha after the dot)
        gap = float((got - triton).abs().max() / ref.abs().max())
        assert gap <= TOL[dtype], f"splits={splits}: relative gap {gap:.2e} to the Triton kernel"


@needs_kernel
def test_cuda_kernel_is_the_default_and_graph_capturable(monkeypatch):
    layer, q = _layer(CASES[0], monkeypatch)
    want = _call(layer, q, cuda=True)
    torch.testing.assert_close(_call(layer, q), want, rtol=0, atol=0)
    out = torch.empty_like(q[:, :, 0])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out.copy_(_call(layer, q, cuda=True))
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_refusals_name_the_reason():
    assert "head dim 96" in cuda_kv.unsupported(96, 4, 4, 4, 128, (1.0, 0.0), None, (torch.bfloat16,))
    assert "k2v2" in cuda_kv.unsupported(128, 4, 2, 2, 64, (1.0, 0.0), None, (torch.bfloat16,))
    assert "9 query heads" in cuda_kv.unsupported(128, 9, 4, 4, 128, (1.0, 0.0), None, (torch.bfloat16,))
    assert "affine keys" in cuda_kv.unsupported(128, 4, 4, 4, 128, None, None, (torch.bfloat16,))
    assert "8-bit values" in cuda_kv.unsupported(128, 4, 8, 8, 64, (1.0, 0.0), None, (torch.bfloat16,))
    assert cuda_kv.unsupported(128, 4, 4, 4, 128, (1.0, 0.0), None, (torch.bfloat16, torch.float16)) is None
    assert "not cpu" in cuda_kv.why_not("cpu")


def test_cuda_true_without_the_kernel_is_a_clear_error(monkeypatch):
    if GPU_OK:
        pytest.skip("the kernel runs here")
    case = (4, 4, 32, True, False, 0.5, 1, 0, 32, 2, 2, torch.float32, 100)
    layer, q = _layer(case, monkeypatch)
    with pytest.raises(ValueError, match="cuda=True"):
        _call(layer, q, cuda=True)


def test_pair_table_holds_both_levels():
    lut = torch.linspace(-1, 1, 16)
    pairs = cuda_kv.pair_table(lut)
    assert pairs.dtype == torch.int32 and pairs.shape == (256,)
    halves = pairs.view(torch.int16).view(256, 2).view(torch.float16).float()
    i = torch.arange(256)
    torch.testing.assert_close(halves[:, 0], lut.half().float()[i & 15], rtol=0, atol=0)
    torch.testing.assert_close(halves[:, 1], lut.half().float()[i >> 4], rtol=0, atol=0)
    assert cuda_kv.pair_table(lut) is pairs                  # cached per table
