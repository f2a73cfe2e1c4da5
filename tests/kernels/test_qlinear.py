"""The Triton weight kernels against a float64 product over the same codes.

CPU (CI): the Triton interpreter at small, odd shapes (K not a multiple of the group or of 32,
N not a multiple of the tile). GPU: the same tests at real shapes, plus the prmt mode (inline
PTX, which the interpreter does not run) and CUDA-graph capture.

Tolerances (||y - ref|| / ||ref||, ref in float64 over the fp32 table and fp16 scales):
    fp32 x          1e-5   fp32 accumulation of <= 4096 terms (measured <= 3e-7 on the CPU)
    bf16 / fp16 x   4e-3   the output rounded to bf16 alone gives ~1.1e-3; tl.dot tiles and the
                           prmt mode also round weights to bf16 (measured <= 2.9e-3 on the H200)
"""
import pytest
import torch

from qins.codec.config import WeightConfig
from qins.codec.grid import expand_groups
from qins.codec.packing import unpack
from qins.codec.tensor import QuantizedWeight

from .conftest import CUDA, DEVICE, needs_triton

pytestmark = needs_triton
TOL = {torch.float32: 1e-5, torch.bfloat16: 4e-3, torch.float16: 4e-3}
SHAPES = [(37, 171), (64, 100)] if not CUDA else [(4096, 4096), (1000, 4160)]    # (N, K)


def _quantized(fmt, bits, group, curvature="tensor", shape=(37, 171), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    cfg = WeightConfig(fmt, bits, group, curvature=curvature) if fmt == "qins" else WeightConfig(fmt, bits, group)
    qw = QuantizedWeight.from_float(w, cfg)
    return QuantizedWeight(*(t.to(DEVICE) if t is not None else None for t in
                             (qw.qweight, qw.scales, qw.offsets, qw.curvature)), qw.config, qw.shape)


def _ref64(qw, x):
    codes = unpack(qw.qweight, qw.config.bits, qw.shape[1]).long()
    tab = qw.decode_table().double()
    vals = tab[0][codes] if tab.shape[0] == 1 else torch.gather(tab, 1, codes)
    if qw.scales is not None:
        vals = vals * expand_groups(qw.scales.double(), qw.group_size, qw.shape[1])
        if qw.offsets is not None:
            vals = vals + expand_groups(qw.offsets.double(), qw.group_size, qw.shape[1])
    return x.double() @ vals.T


def _err(y, ref):
    assert torch.isfinite(y).all()
    return float((y.double() - ref).norm() / ref.norm())


def _args(qw, mode):
    tab = qw.curvature.reshape(1, -1) if mode == "closed" else qw.decode_table()
    return qw.qweight, qw.scales, qw.offsets, tab, qw.curvature


CASES = [("qins", b, g, c) for b, g in ((2, 96), (3, 32), (4, 64), (5, 64), (6, 32), (8, 128))
         for c in ("tensor",)] + [("qins", 4, 64, "channel"), ("qins", 8, None, "channel"),
                                  ("int-asym", 4, 32, None), ("int-asym", 6, 64, None),
                                  ("int-sym", 3, 64, None), ("nf4", 4, None, None),
                                  ("fp8", 8, 32, None), ("qins-seed", 8, None, None)]


def _kmajor_args(qw, mode):
    from qins.kernels import kmajor
    q, s, m, tab, a = _args(qw, mode)                 # as modules store them (tables stay)
    return (kmajor(q), s if s is None else kmajor(s), m if m is None else kmajor(m), tab, a)


@pytest.mark.parametrize("fmt,bits,group,curv", CASES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("order", ["row", "k"])
def test_dequantize_kernel_matches_reference(fmt, bits, group, curv, shape, order):
    """Either storage order of the codes and group parameters (K-major: modules on CUDA)."""
    from qins.kernels import triton_qlinear as tq
    qw = _quantized(fmt, bits, group, curv or "tensor", shape)
    modes = ["table"] + (["closed"] if fmt == "qins" else [])
    ref = qw.dequantize(torch.float32)
    args = _args if order == "row" else _kmajor_args
    for mode in modes:
        out = tq.dequantize(*args(qw, mode), bits, qw.group_size, shape[1], torch.float32, mode=mode)
        if mode == "table":
            assert torch.equal(out, ref)                           # the same fp32 ops: bit-exact
        else:                                                      # a fast division: ~1 ulp
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fmt,bits,group,curv", CASES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("order", ["row", "k"])
def test_skinny_kernels_match_float64(fmt, bits, group, curv, m, order):
    from qins.kernels import triton_qlinear as tq
    shape = SHAPES[0]
    qw = _quantized(fmt, bits, group, curv or "tensor", shape)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, shape[1], generator=g).to(DEVICE)
    b = torch.randn(shape[0], generator=g).to(DEVICE)
    ref = _ref64(qw, x) + b.double()
    one_plane = bits in (2, 4, 8)
    modes = ["closed"] if curv == "channel" else ["table"] + (["closed"] if fmt == "qins" else [])
    if order == "k" and m != 1:
        pytest.skip("K-major codes go to the K-major kernel (test_kmajor.py); one batch shows the strides")
    args = _args if order == "row" else _kmajor_args
    for mode in modes:
        for split in (1, 3):
            if one_plane:
                cfg = dict(BLOCK_M=1 if m == 1 else 16, BN=16, BKW=16, SPLIT_K=split, num_warps=4)
                y = tq.qmm_words(x, *args(qw, mode), b, bits, qw.group_size, shape[1], mode=mode, config=cfg)
            else:
                cfg = dict(BN=16, NB=2, SPLIT_K=split, num_warps=4)
                y = tq.qgemv(x, *args(qw, mode), b, bits, qw.group_size, shape[1], mode=mode, config=cfg)
            assert y.shape == (m, shape[0]) and y.dtype == x.dtype
            assert _err(y, ref) < TOL[torch.float32], (mode, split)


# Triton 3.9's interpreter mishandles bf16 (a bf16 tl.dot returned ~1e11; fp32 -> bf16 stores
# truncate, 3.7e-3 error at batch 1): bf16 runs on the GPU only, fp16 everywhere
HALF = [torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128), (3, 64)])
@pytest.mark.parametrize("m", [1, 7, 40])
def test_linear_in_half_precision(dtype, bits, group, m):
    """The op's whole route (skinny kernels up to 16 rows, decode + matmul above) in bf16/fp16."""
    from qins.kernels.ops import triton_linear
    shape = SHAPES[-1]
    qw = _quantized("qins", bits, group, "tensor", shape)
    x = torch.randn(m, shape[1]).to(DEVICE, dtype)
    ref = _ref64(qw, x)
    y = triton_linear(x, *_args(qw, "table"), None, bits, qw.group_size, shape[1], "auto-qins")
    assert y.dtype == dtype
    assert _err(y, ref) < TOL[dtype]


def test_split_k_and_bias_add_once():
    from qins.kernels import triton_qlinear as tq
    qw = _quantized("qins", 4, 32, "tensor", (33, 1000))
    x = torch.randn(1, 1000).to(DEVICE)
    b = torch.full((33,), 3.0).to(DEVICE)
    cfg = dict(BLOCK_M=1, BN=16, BKW=16, SPLIT_K=4, num_warps=4)
    y = tq.qmm_words(x, *_args(qw, "table"), b, 4, 32, 1000, config=cfg)
    assert _err(y, _ref64(qw, x) + 3.0) < 1e-5


def test_unsupported_widths_and_modes_are_refused():
    from qins.kernels import triton_qlinear as tq
    qw = _quantized("qins", 3, 32)
    x = torch.randn(1, 171).to(DEVICE)
    with pytest.raises(ValueError, match="two planes"):
        tq.qmm_words(x, *_args(qw, "table"), None, 3, 32, 171)
    with pytest.raises(ValueError, match="prmt"):
        tq.qgemv(x, *_args(qw, "table"), None, 3, 32, 171, mode="prmt")
    with pytest.raises(ValueError, match="unknown decode mode"):
        tq.qgemv(x, *_args(qw, "table"), None, 3, 32, 171, mode="cubic")
    with pytest.raises(ValueError, match="closed"):
        tq.qgemv(x, qw.qweight, qw.scales, None, qw.decode_table(), None, None, 3, 32, 171, mode="closed")


@pytest.mark.skipif(not CUDA, reason="inline PTX and CUDA graphs need a GPU")
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("fmt", ["qins", "nf4", "int-asym"])
def test_prmt_mode_on_gpu(m, fmt):
    from qins.kernels import triton_qlinear as tq
    from qins.kernels.prmt import table_registers
    qw = _quantized(fmt, 4, 64, "tensor", (4096, 4096))
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    regs = table_registers(qw.decode_table())
    y = tq.qmm_words(x, qw.qweight, qw.scales, qw.offsets, regs, None, None, 4, 64, 4096, mode="prmt")
    assert _err(y, _ref64(qw, x)) < TOL[torch.bfloat16]


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_module_forward_captures_in_a_cuda_graph():
    from qins.weights.linear import QINSLinear
    lin = torch.nn.Linear(4096, 1024, bias=True)
    q = QINSLinear.from_float(lin, WeightConfig("qins", 4, 64)).cuda()
    x = torch.randn(1, 4096, device="cuda", dtype=torch.bfloat16)
    eager = q(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = q(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, q(x), rtol=0, atol=0)
    assert not torch.equal(y, eager)
