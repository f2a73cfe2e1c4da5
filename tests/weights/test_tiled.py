"""QINSLinear with tiled codes (QINSLinear on CUDA stores 4-bit codes so where the tensor-core
kernel reads them: kernels.tiles_take, cuda_qlinear.tile_codes). Tiling is forced here on the
CPU, so every path around it runs in CI: the codes a module reports, saves, loads, shards and
multiplies with are those it had before tiling, bit for bit. The GPU half (the kernel over
tiled codes equals the K-major kernel bit for bit) is tests/kernels/test_cuda_qlinear.py.
"""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from qins import kernels
from qins.codec.config import WeightConfig
from qins.codec.packing import packed_words
from qins.kernels import cuda_qlinear
from qins.weights.linear import QINSLinear
from qins.weights.parallel import shard_module


def _module(out_f=68, in_f=200, bits=4, group=64, curvature="tensor", fmt="qins"):
    torch.manual_seed(out_f + in_f)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    lin.weight.data.normal_(0, 0.02)
    cfg = WeightConfig(fmt, bits, group, curvature=curvature)
    return QINSLinear.from_float(lin, replace(cfg, clip_search=False))


def _tiled(mod):
    """mod with its codes tiled, as on CUDA (forced on the CPU)."""
    t = copy.deepcopy(mod)
    assert t._tileable()
    t._buffers["qweight"] = cuda_qlinear.tile_codes(t.qweight, t.weight_shape[1])
    return t


@pytest.mark.parametrize("n,k", [(68, 200), (32, 256), (4, 8), (100, 264), (36, 1000)])
def test_untile_inverts_tile_bit_for_bit(n, k):
    g = torch.Generator().manual_seed(n * k)
    codes = torch.randint(-2**31, 2**31 - 1, (n, packed_words(k, 4)), generator=g, dtype=torch.int32)
    tiled = cuda_qlinear.tile_codes(codes, k)
    assert tiled.shape == cuda_qlinear.tiled_shape(n, k) and cuda_qlinear.is_tiled(tiled)
    back = cuda_qlinear.untile_codes(tiled, n, codes.shape[1])
    assert torch.equal(back, codes) and kernels.is_kmajor(back) or n == 1
    with pytest.raises(ValueError, match="do not hold"):
        cuda_qlinear.untile_codes(tiled, n + 32, codes.shape[1])


def test_a_tiled_module_reports_saves_and_multiplies_with_the_same_codes():
    mod = _module()
    t = _tiled(mod)
    assert t.qweight.dim() == 4
    assert torch.equal(t.quantized.qweight, mod.qweight)
    sd, sd_t = mod.state_dict(), t.state_dict()
    assert sd.keys() == sd_t.keys() and all(torch.equal(sd[k], sd_t[k]) for k in sd)
    assert sd_t["qweight"].shape == mod.qweight.shape
    x = torch.randn(3, 200)
    assert torch.equal(t(x), mod(x))
    # the op over tiled codes (on the CPU it untiles, then the reference)
    y = kernels.qlinear_tiled(x, t.qweight, t.scales, t._current_table(), t.curvature, t.bias, 64, 200, 68, "auto-qins")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, mod.dequantize(), mod.bias), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        kernels.qlinear_tiled(x[:, :8], t.qweight, t.scales, t._current_table(), t.curvature, t.bias, 64, 200, 68, "auto")


def test_loading_copying_and_moving_a_tiled_module():
    mod = _module()
    other = _module(curvature="tensor")
    other.load_state_dict(_module(out_f=68, in_f=200).state_dict())
    t = _tiled(mod)
    t.load_state_dict(other.state_dict())                     # (O, words) codes into a tiled module
    assert t.qweight.dim() == 2 and torch.equal(t.qweight, other.qweight)   # untiled: not on CUDA
    t = _tiled(mod)
    t.float()                                                 # any move off CUDA untiles
    assert t.qweight.dim() == 2 and torch.equal(t.qweight, mod.qweight)
    t = _tiled(mod)
    t._set_quantized(other.quantized)
    assert t.qweight.dim() == 2 and torch.equal(t.qweight, other.qweight)


def test_sharding_a_tiled_module_cuts_the_codes_it_had():
    mod = _module(out_f=64, in_f=256)
    for style in ("colwise", "rowwise"):
        a, b = copy.deepcopy(mod), _tiled(mod)
        shard_module(a, "proj", style, rank=1, world=2)
        shard_module(b, "proj", style, rank=1, world=2)
        assert torch.equal(a.qweight, b.qweight) and a.weight_shape == b.weight_shape


@pytest.mark.parametrize("kwargs", [dict(bits=8, group=128), dict(curvature="channel"), dict(group=96, in_f=192),
                                    dict(in_f=204), dict(out_f=66), dict(fmt="int-asym")])
def test_only_what_the_kernel_reads_is_tiled(kwargs):
    assert not _module(**kwargs)._tileable()


def test_tiles_are_for_cuda_under_auto_only(monkeypatch):
    assert not kernels.tiles_take("cpu")
    monkeypatch.setenv("QINS_TILED", "0")
    assert not kernels.tiles_take("cuda:0")


def test_the_tiled_op_traces_under_torch_compile():
    """qins::qlinear_tiled has a fake implementation, so torch.compile traces a tiled layer
    (whole graph, no break) and gives the eager result."""
    mod = _module()
    t = _tiled(mod)
    x = torch.randn(3, 200)
    args = (t.qweight, t.scales, t._current_table(), t.curvature, t.bias, 64, 200, 68, "auto-qins")
    eager = kernels.qlinear_tiled(x, *args)
    compiled = torch.compile(lambda x: kernels.qlinear_tiled(x, *args), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)


def test_gradients_flow_through_a_tiled_layer_and_the_qlinear_op():
    """dL/dx and dL/db through the ops (registered autograd) equal those through the decoded weight."""
    mod = _module()
    t = _tiled(mod)
    w = mod.dequantize()
    x = torch.randn(3, 200, requires_grad=True)
    y = kernels.qlinear_tiled(x, t.qweight, t.scales, t._current_table(), t.curvature, t.bias, 64, 200, 68, "auto-qins")
    g = torch.randn_like(y)
    gx, gb = torch.autograd.grad(y, (x, t.bias), g)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = mod.bias.detach().clone().requires_grad_(True)
    want = torch.autograd.grad(torch.nn.functional.linear(x2, w, b2), (x2, b2), g)
    torch.testing.assert_close(gx, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, want[1], rtol=1e-4, atol=1e-5)
    # the K-major op (the route CUDA layers take) the same way
    qw = mod.quantized
    y = torch.ops.qins.qlinear(x, qw.qweight, qw.scales, None, qw.decode_table(), qw.curvature, mod.bias,
                               4, 64, 200, "auto-qins")
    gx, gb = torch.autograd.grad(y, (x, mod.bias), g)
    torch.testing.assert_close(gx, want[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, want[1], rtol=1e-4, atol=1e-5)


def test_a_bias_gradient_alone_decodes_no_weight(monkeypatch):
    """x without grad (a frozen quantized layer whose bias trains): dL/db, and W is never decoded."""
    from qins.kernels import ops
    t = _tiled(_module())
    calls = []
    real = ops.dequantize
    monkeypatch.setattr(ops, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 200)
    y = kernels.qlinear_tiled(x, t.qweight, t.scales, t._current_table(), t.curvature, t.bias, 64, 200, 68, "auto-qins")
    (gb,) = torch.autograd.grad(y.sum(), (t.bias,))
    torch.testing.assert_close(gb, torch.full((68,), 3.0))
    assert calls == []
