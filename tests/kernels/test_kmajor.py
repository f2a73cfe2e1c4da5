"""The K-major skinny kernel (kernels/triton_kmajor.py) against a float64 product over the same
codes, with the codes stored row-major and K-major (the CUDA modules' order).

Tolerances as in test_qlinear.py: fp32 x 1e-5 (fp32 accumulation); fp16/bf16 x 4e-3 (the
output rounded to half precision, and tl.dot tiles round the decoded weights to x's dtype).
"""
import pytest
import torch

from qins.kernels import kmajor
from qins.kernels.triton_kmajor import kgemv

from .conftest import CUDA, DEVICE, needs_triton
from .test_qlinear import CASES, HALF, SHAPES, TOL, _args, _err, _kmajor_args, _quantized, _ref64

pytestmark = needs_triton


def _stored(qw, order):
    if order == "row":
        return _args
    return _kmajor_args


@pytest.mark.parametrize("fmt,bits,group,curv", CASES)
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("order", ["row", "k"])
def test_kmajor_kernel_matches_float64(fmt, bits, group, curv, m, order):
    if order == "row" and m != 1:
        pytest.skip("row-major codes: batch 1 shows the strides (CI time)")
    shape = SHAPES[0]
    qw = _quantized(fmt, bits, group, curv or "tensor", shape)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, shape[1], generator=g).to(DEVICE)
    b = torch.randn(shape[0], generator=g).to(DEVICE)
    ref = _ref64(qw, x) + b.double()
    args = _stored(qw, order)
    modes = ["closed"] if curv == "channel" else ["table"] + (["closed"] if fmt == "qins" else [])
    gs = qw.group_size or 32
    for mode in modes:
        for split, acc2d in ((1, False), (3, False), (3, True)):
            cfg = dict(BK=min(32, gs), BN=16, SPLIT_K=split, num_warps=4, ACC2D=acc2d)
            y = kgemv(x, *args(qw, mode), b, bits, qw.group_size, shape[1], mode=mode, config=cfg)
            assert y.shape == (m, shape[0]) and y.dtype == x.dtype
            assert _err(y, ref) < TOL[torch.float32], (mode, split, acc2d)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128), (3, 64)])
@pytest.mark.parametrize("m", [1, 7])
def test_kmajor_in_half_precision(dtype, bits, group, m):
    shape = SHAPES[-1]
    qw = _quantized("qins", bits, group, "tensor", shape)
    x = torch.randn(m, shape[1]).to(DEVICE, dtype)
    y = kgemv(x, *_stored(qw, "k")(qw, "table"), None, bits, qw.group_size, shape[1])
    assert y.dtype == dtype
    assert _err(y, _ref64(qw, x)) < TOL[dtype]


@pytest.mark.parametrize("fmt,bits,group", [("qins", 4, 64), ("qins", 3, 32), ("nf4", 4, 64),
                                             ("int-asym", 8, 128), ("qins", 8, 128)])
@pytest.mark.parametrize("m", [1, 5, 17])
def test_op_routes_kmajor_codes(fmt, bits, group, m):
    """The op's whole route over K-major codes: skinny kernels up to 16 rows (closed form for
    qins, a table read at batch 1 otherwise), decode-then-matmul above and for other tables."""
    from qins.kernels.ops import choose, triton_linear
    shape = SHAPES[0]
    qw = _quantized(fmt, bits, group, "tensor", shape)
    x = torch.randn(m, shape[1]).to(DEVICE)
    args = _stored(qw, "k")(qw, "table")
    mode = "auto-qins" if fmt == "qins" else "auto"
    y = triton_linear(x, *args, None, bits, qw.group_size, shape[1], mode)
    assert _err(y, _ref64(qw, x)) < TOL[torch.float32]
    route, _ = choose(mode, bits, m, x.dtype, kmajor=True, per_tensor=True)
    if fmt == "qins" and bits == 8 and m == 1:
        assert route == "kbyte"
    else:
        assert route == ("kgemv" if m == 1 or (m <= 16 and fmt == "qins") else "unfused")


@pytest.mark.parametrize("m", [1, 17])
def test_half_activations_with_a_float32_bias(m):
    """A module's bias stays float32 beside bf16 activations; every route casts it (the
    decode-then-matmul route above batch 16 once raised a dtype mismatch on the H200)."""
    from qins.kernels.ops import triton_linear
    shape = SHAPES[0]
    qw = _quantized("qins", 4, 64, "tensor", shape)
    x = torch.randn(m, shape[1]).to(DEVICE, torch.bfloat16)
    b = torch.randn(shape[0]).to(DEVICE)
    y = triton_linear(x, *_stored(qw, "k")(qw, "table"), b, 4, qw.group_size, shape[1], "auto-qins")
    assert y.dtype == torch.bfloat16
    assert _err(y, _ref64(qw, x.float()) + b.double()) < TOL[torch.bfloat16]


@pytest.mark.parametrize("group", [32, 64, 128, 96, 8192])
def test_default_tiles_fit_the_group(group):
    """The launchers' default tiles divide any group size the format allows (one scale per
    step), so a routed layer never meets 'BK must divide the group size'."""
    from qins.kernels.triton_kmajor import kbyte_config, kprmt_config, kprmt_mm_config
    assert group % kprmt_config(4096, 4096, group)["BK"] == 0
    assert group % (4 * kbyte_config(4096, 4096, group)["BKW"]) == 0
    assert group % kprmt_mm_config(4096, 4096, group)["BK"] == 0


def test_choose_routes():
    from qins.kernels import _interpreting
    from qins.kernels.ops import choose
    bf = torch.bfloat16
    assert choose("auto-qins", 8, 1, bf, kmajor=True) == ("kbyte", "closed")
    assert choose("auto-qins", 8, 1, bf, kmajor=True, scaled=False) == ("kgemv", "closed")
    assert choose("auto-qins", 8, 2, bf, kmajor=True) == ("kgemv", "closed")
    # 4 bits, one table, batch 2-16: the prmt decode feeding tl.dot, where PTX runs
    prmt16 = ("kgemv", "closed") if _interpreting() else ("kprmt_mm", "prmt")
    assert choose("auto-qins", 4, 16, bf, kmajor=True) == prmt16
    assert choose("auto-qins", 4, 16, bf, kmajor=True, offsets=True) == ("kgemv", "closed")
    assert choose("auto", 4, 16, bf, kmajor=True) == (("unfused", "table") if _interpreting() else prmt16)
    assert choose("auto", 4, 16, bf, kmajor=True, offsets=True) == ("unfused", "table")
    assert choose("auto-qins", 4, 17, bf, kmajor=True) == ("unfused", "table")
    assert choose("closed", 4, 17, bf, kmajor=True) == ("unfused", "closed")
    assert choose("auto", 8, 1, bf, kmajor=True) == ("kgemv", "table")
    assert choose("auto-qins", 4, 1, bf, kmajor=False)[0] == "words"
    assert choose("auto-qins", 4, 2, bf, kmajor=False)[0] == "unfused"


@pytest.mark.parametrize("mode", ["table", "closed"])
@pytest.mark.parametrize("m", [17, 40])
def test_kgemv_row_tiles(mode, m):
    """More than 16 rows: programs over tiles of rows (a ragged last one), the group scale on
    each step's tl.dot; against float64 within the half-precision bound (x in fp32 here, so
    the decoded tile is fp32 too: the fp32 bound)."""
    shape = SHAPES[-1]
    qw = _quantized("qins", 4, 32, "tensor", shape)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, shape[1], generator=g).to(DEVICE)
    b = torch.randn(shape[0], generator=g).to(DEVICE)
    ref = _ref64(qw, x) + b.double()
    for cfg in (dict(BK=32, BN=16, SPLIT_K=1, BLOCK_M=16, num_warps=4),
                dict(BK=32, BN=32, SPLIT_K=2, BLOCK_M=32, num_warps=4), None):
        y = kgemv(x, *_kmajor_args(qw, mode), b, 4, qw.group_size, shape[1], mode=mode, config=cfg)
        assert y.shape == (m, shape[0])
        assert _err(y, ref) < TOL[torch.float32], cfg


def test_kmajor_refuses_what_it_cannot_run():
    qw = _quantized("qins", 4, 64)
    x = torch.randn(17, 171).to(DEVICE)
    with pytest.raises(ValueError, match="prmt"):
        kgemv(x[:1], *_args(qw, "table"), None, 4, 64, 171, mode="prmt")
    with pytest.raises(ValueError, match="divide the group"):
        kgemv(x[:1], *_args(qw, "table"), None, 4, 64, 171, config=dict(BK=128, BN=16, SPLIT_K=1))


@pytest.mark.parametrize("group,curv", [(128, "tensor"), (32, "tensor"), (None, "channel")])
@pytest.mark.parametrize("order", ["row", "k"])
def test_kbyte_matches_float64(group, curv, order):
    """8-bit qins at batch 1, the closed form over byte positions of (words, outputs) tiles."""
    from qins.kernels.triton_kmajor import kbyte
    shape = SHAPES[0]
    qw = _quantized("qins", 8, group, curv, shape)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, shape[1], generator=g).to(DEVICE)
    b = torch.randn(shape[0], generator=g).to(DEVICE)
    q, s, m, _, a = _stored(qw, order)(qw, "closed")
    gs = qw.group_size or 32
    for split, acc1d in ((1, False), (3, False), (3, True)):
        cfg = dict(BKW=min(8, gs // 4), BN=16, SPLIT_K=split, num_warps=4, ACC1D=acc1d)
        y = kbyte(x, q, s, m, a, b, qw.group_size, shape[1], config=cfg)
        assert y.shape == (1, shape[0]) and y.dtype == x.dtype
        assert _err(y, _ref64(qw, x) + b.double()) < TOL[torch.float32], split
    with pytest.raises(ValueError, match="divide the group"):
        kbyte(x, q, s, m, a, b, qw.group_size, shape[1], config=dict(BKW=5, BN=16, SPLIT_K=1))


@pytest.mark.parametrize("order", ["row", "k"])
@pytest.mark.parametrize("m", [2, 5, 16, 37])
def test_kprmt_mm_matches_float64(order, m):
    """4-bit batch 2-16: the prmt decode's 8 code positions joined back into k order feed one
    tl.dot. The interpreter reads the same bf16 table from memory (no PTX), so the joins,
    permutes and scales are what this checks; bound 4e-3 (the table rounded to bf16)."""
    from qins.kernels.prmt import table_registers
    from qins.kernels.triton_kmajor import kprmt_mm
    shape = SHAPES[0] if not CUDA else (4096, 4160)
    qw = _quantized("qins", 4, 32 if not CUDA else 64, "tensor", shape)
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, shape[1], generator=g).to(DEVICE, torch.bfloat16 if CUDA else torch.float32)
    b = torch.randn(shape[0], generator=g).to(DEVICE)
    q, s, _, _, _ = _stored(qw, order)(qw, "table")
    regs = table_registers(qw.decode_table())
    # more than 16 rows: tiles of 16 rows (a ragged last one) or one tile of 64, and the default
    tiles = [(16, 1), (16, 3)] + ([(16, 1), (64, 1), (None, None)] if m > 16 else [])
    for bm, split in tiles:
        cfg = None if bm is None else dict(BK=qw.group_size, BN=16 if not CUDA else 64, SPLIT_K=split,
                                           BLOCK_M=bm, num_warps=4)
        y = kprmt_mm(x, q, s, regs, b, qw.group_size, shape[1], config=cfg)
        assert y.shape == (m, shape[0]) and y.dtype == x.dtype
        assert _err(y, _ref64(qw, x) + b.double()) < TOL[torch.bfloat16], (bm, split)
    with pytest.raises(ValueError, match="multiple of 16"):
        kprmt_mm(x, q, s, regs, b, qw.group_size, shape[1], config=dict(BK=8, BN=16, SPLIT_K=1))


@pytest.mark.skipif(not CUDA, reason="inline PTX (prmt) runs on a GPU only")
@pytest.mark.parametrize("order", ["row", "k"])
@pytest.mark.parametrize("fmt", ["qins", "nf4", "int-asym"])
def test_kprmt_on_gpu(order, fmt):
    from qins.kernels.prmt import table_registers
    from qins.kernels.triton_kmajor import kprmt
    qw = _quantized(fmt, 4, 64, "tensor", (4096, 4160))
    x = torch.randn(1, 4160, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, device="cuda")
    qweight, scales = (qw.qweight, qw.scales) if order == "row" else (kmajor(qw.qweight), kmajor(qw.scales))
    offsets = None if qw.offsets is None else (qw.offsets if order == "row" else kmajor(qw.offsets))
    for split in (1, 4):
        y = kprmt(x, qweight, scales, offsets, table_registers(qw.decode_table()), b, 64, 4160,
                  config=dict(BK=64, BN=128, SPLIT_K=split, num_warps=4))
        assert _err(y, _ref64(qw, x) + b.double()) < TOL[torch.bfloat16]


@pytest.mark.skipif(not CUDA, reason="modules store K-major codes on CUDA only")
def test_module_on_cuda_stores_kmajor_and_saves_row_major(tmp_path):
    from qins.kernels import is_kmajor
    from qins.weights.linear import QINSLinear
    from qins.codec.config import WeightConfig
    lin = torch.nn.Linear(4160, 4096, bias=True)
    q = QINSLinear.from_float(lin, WeightConfig("qins", 4, 64))
    ref_state = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(1, 4160)
    y_cpu = q(x)
    q = q.cuda()
    # 4-bit codes the tensor-core kernel reads are tiled where it builds, else K-major
    from qins.kernels import cuda_qlinear, tiles_take
    assert is_kmajor(q.scales)
    assert cuda_qlinear.is_tiled(q.qweight) if tiles_take(q.qweight.device) else is_kmajor(q.qweight)
    for m in (1, 16, 40):
        xm = torch.randn(m, 4160)
        y = q(xm.cuda().bfloat16()).float().cpu()
        ref = QINSLinear.from_float(lin, WeightConfig("qins", 4, 64))(xm)
        assert float((y - ref).norm() / ref.norm()) < TOL[torch.bfloat16]
    torch.testing.assert_close(q(x.cuda()).cpu(), y_cpu, rtol=1e-5, atol=1e-5)
    back = q.cpu().state_dict()
    for k, v in ref_state.items():
        assert torch.equal(back[k], v)
