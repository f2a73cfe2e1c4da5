"""The CUDA tensor-core weight kernel (kernels/cuda_qlinear.py, csrc/qlinear_mma.cu) against a
float64 product over the same codes, on a GPU; its refusals, pair table and library build
everywhere (the build where nvcc exists).

Tolerance 4e-3 (relative norm), as for the Triton kernels in half precision: the table's levels
are rounded to x's dtype (bf16: 2^-9 relative), products and sums are fp32, the output is
rounded to x's dtype (bf16 alone ~1.1e-3).
"""
import functools

import pytest
import torch

from qins.codec.packing import packed_words
from qins.codec.tensor import QuantizedWeight
from qins.codec.config import WeightConfig
from qins.kernels import cuda_qlinear, kmajor

from .conftest import CUDA, DEVICE
from .test_qlinear import _err, _quantized, _ref64

TOL = 4e-3
needs_gpu = pytest.mark.skipif(not CUDA or cuda_qlinear.why_not("cuda") is not None,
                               reason="needs a GPU the kernel builds for")


def _kmajor(qw):
    return kmajor(qw.qweight), kmajor(qw.scales), qw.decode_table()


@functools.lru_cache(maxsize=4)
def _weight(n, k, group):
    """One weight per shape: quantized below 256 outputs; above, random codes and scales with a
    QINS table (quantizing 4096 x 4096 on the CPU takes tens of seconds; the kernel reads codes)."""
    if n < 256:
        return _quantized("qins", 4, group, "tensor", (n, k))
    g = torch.Generator().manual_seed(n + k)
    words = packed_words(k, 4)
    codes = torch.randint(-2**31, 2**31 - 1, (n, words), generator=g, dtype=torch.int32)
    codes[:, -(-k // 8):] = 0                                  # padding past K stays zero
    scales = (torch.rand(n, max(1, k // group), generator=g) * 0.02 + 0.001).half()
    cfg = WeightConfig("qins", 4, group, curvature="tensor")
    return QuantizedWeight(codes.to(DEVICE), scales.to(DEVICE), None, torch.tensor([0.6], device=DEVICE), cfg, (n, k))


# (N, K, group): odd tiles (N not a multiple of 32, K not of the group or of 32), each group size;
# the last three have runs long enough for the unchecked main loop at every group size
SHAPES = [(36, 200, 32), (100, 264, 64), (64, 136, 128), (4096, 4096, 64), (1000, 4160, 64),
          (68, 2312, 32), (132, 2184, 128)]


@needs_gpu
@pytest.mark.parametrize("n,k,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_float64(n, k, group, m, dtype):
    qw = _weight(n, k, group)
    q, s, tab = _kmajor(qw)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(DEVICE, dtype)
    b = torch.randn(n, generator=g).to(DEVICE)
    ref = _ref64(qw, x) + b.double()
    assert cuda_qlinear.unsupported(x, q, s, None, tab, 4, group, k) is None
    tiled = cuda_qlinear.tile_codes(q, k)
    for splits in sorted({1, 3, 8, cuda_qlinear.default_config(m, n, k, group, x.device)[0]}):
        # some warps get no group at 3 and 8 splits; 8 warps take the wide table by default
        for warps, depth, wide in [(w, d, None) for w, d in cuda_qlinear.SHAPES] + [(4, 4, True), (8, 4, False)]:
            launch = dict(splits=splits, warps=warps, depth=depth, wide=wide)
            y = cuda_qlinear.qlinear(x, q, s, tab, b, group, k, **launch)
            assert y.shape == (m, n) and y.dtype == dtype
            assert _err(y, ref) < TOL, launch
            again = cuda_qlinear.qlinear(x, q, s, tab, b, group, k, **launch)
            assert torch.equal(y, again), "split-K must add the blocks' sums in a fixed order"
            # the same codes tiled: the same products in the same order
            assert torch.equal(y, cuda_qlinear.qlinear(x, tiled, s, tab, b, group, k, out_features=n, **launch)), launch


@pytest.mark.parametrize("n,k", [(36, 200), (64, 256), (100, 264), (4, 8)])
def test_tile_codes_puts_each_word_where_the_kernel_reads_it(n, k):
    g = torch.Generator().manual_seed(n * k)
    words = packed_words(k, 4)
    codes = torch.randint(-2**31, 2**31 - 1, (n, words), generator=g, dtype=torch.int32)
    tiled = cuda_qlinear.tile_codes(kmajor(codes), k)
    chunks = -(-k // 32)
    assert tiled.shape == (-(-n // 32), chunks, 32, 4) and tiled.is_contiguous()
    flat = tiled.reshape(-1, chunks, 8, 4, 4)                # (T, c, g, t, j)
    for out in range(-(-n // 32) * 32):
        for w in range(chunks * 4):
            want = codes[out, w].item() if out < n and w < words else 0
            assert flat[out // 32, w // 4, (out % 32) // 4, w % 4, out % 4].item() == want, (out, w)
    assert torch.equal(cuda_qlinear.tile_codes(codes, k), tiled)     # strides do not matter


@needs_gpu
def test_the_op_routes_4_bit_half_batches_to_it_and_graphs_capture_it():
    from qins.kernels.ops import choose, triton_linear
    n, k, group = 1000, 4160, 64
    qw = _quantized("qins", 4, group, "tensor", (n, k))
    q, s, tab = _kmajor(qw)
    x = torch.randn(4, k, device=DEVICE, dtype=torch.bfloat16)
    assert choose("auto-qins", 4, 4, x.dtype, kmajor=True, mma=True)[0] == "mma"
    y = triton_linear(x, q, s, None, tab, qw.curvature, None, 4, group, k, "auto-qins")
    assert _err(y, _ref64(qw, x)) < TOL
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_linear(x, q, s, None, tab, qw.curvature, None, 4, group, k, "auto-qins")
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, triton_linear(x, q, s, None, tab, qw.curvature, None, 4, group, k, "auto-qins"),
                               rtol=0, atol=0)


def test_refusals_name_the_reason():
    qw = _quantized("qins", 4, 64, "tensor", (36, 200))
    q, s, tab = _kmajor(qw)
    x = torch.randn(1, 200, dtype=torch.bfloat16, device=DEVICE)
    why = lambda **kw: cuda_qlinear.unsupported(kw.get("x", x), kw.get("q", q), kw.get("s", s), kw.get("m"),
                                                kw.get("tab", tab), kw.get("bits", 4), kw.get("group", 64), 200)
    assert "8-bit" in why(bits=8)
    assert "float32" in why(x=x.float())
    assert "17 rows" in why(x=torch.randn(17, 200, dtype=torch.bfloat16, device=DEVICE))
    assert "offsets" in why(m=s)
    assert "per channel" in why(tab=tab.expand(36, 16))
    assert "K-major" in why(q=qw.qweight, s=qw.scales)          # row-major, as saved
    assert "group" in why(group=48)
    assert "aligned" in why(x=torch.randn(2, 204, dtype=torch.bfloat16, device=DEVICE)[:, 4:])
    assert cuda_qlinear.why_not("cpu") is not None
    # tiled codes: N comes from the layer, and the tiles must hold N x K codes
    tiled = cuda_qlinear.tile_codes(q, 200)
    assert cuda_qlinear.unsupported(x, tiled, s, None, tab, 4, 64, 200, 36) is None
    assert "do not hold" in cuda_qlinear.unsupported(x, tiled, s, None, tab, 4, 64, 200, 68)
    assert "do not hold" in cuda_qlinear.unsupported(x, tiled[:, :3], s, None, tab, 4, 64, 200, 36)
    with pytest.raises(ValueError, match="do not hold"):
        cuda_qlinear.qlinear(x, tiled, s, tab, None, 64, 200, out_features=68, splits=1, warps=4, depth=4)


def test_qins_kernels_triton_keeps_the_nvcc_kernels_out(monkeypatch):
    from qins.kernels import cuda_refused
    from qins.kernels.triton_kv import cuda_reason
    monkeypatch.setenv("QINS_KERNELS", "triton")
    assert "Triton kernels only" in cuda_refused()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 4, 64)
    assert "Triton kernels only" in cuda_reason(q, q[:, :, None], None, None, None, 4, 4, 4, 16, (1.0, 0.0), None)
    monkeypatch.setenv("QINS_KERNELS", "auto")
    assert cuda_refused() is None


def test_pair_table_holds_both_codes_of_a_byte():
    lut = torch.linspace(-1, 1, 16).reshape(1, 16) ** 3
    for dtype in (torch.float16, torch.bfloat16):
        pairs = cuda_qlinear.pair_table(lut, dtype)
        halves = pairs.view(torch.int16).view(256, 2).view(dtype).float()
        i = torch.arange(256)
        torch.testing.assert_close(halves[:, 0], lut[0].to(dtype).float()[i & 15], rtol=0, atol=0)
        torch.testing.assert_close(halves[:, 1], lut[0].to(dtype).float()[i >> 4], rtol=0, atol=0)
        assert cuda_qlinear.pair_table(lut, dtype) is pairs          # cached per table and dtype
