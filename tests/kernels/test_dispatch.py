"""One dispatch: QINS_KERNELS picks the backend; the module path gives the reference's answer
through either; bad input gets a clear error, never a wrong answer."""
import pytest
import torch

import qins.kernels as K
from qins.codec.config import WeightConfig
from qins.weights.linear import QINSLinear

from .conftest import CUDA, DEVICE, needs_triton


def _layer(bits=4, group=64, curvature="tensor", fmt="qins"):
    torch.manual_seed(0)
    lin = torch.nn.Linear(100, 37, bias=True)
    cfg = WeightConfig(fmt, bits, group, curvature=curvature) if fmt == "qins" else WeightConfig(fmt, bits, group)
    return QINSLinear.from_float(lin, cfg).to(DEVICE)


def test_backend_reads_the_environment(monkeypatch):
    monkeypatch.delenv("QINS_KERNELS", raising=False)
    assert K.backend() == "auto"
    monkeypatch.setenv("QINS_KERNELS", "Reference")
    assert K.backend() == "reference"
    monkeypatch.setenv("QINS_KERNELS", "cuda")
    with pytest.raises(ValueError, match="QINS_KERNELS='cuda'"):
        K.backend()


@needs_triton
@pytest.mark.parametrize("fmt,bits,group,curv", [("qins", 4, 64, "tensor"), ("qins", 3, 32, "channel"),
                                                 ("int-asym", 8, 32, "tensor"), ("nf4", 4, None, "tensor")])
@pytest.mark.parametrize("m", [1, 5, 20])
def test_module_forward_same_through_both_backends(monkeypatch, fmt, bits, group, curv, m):
    layer = _layer(bits, group, curv, fmt)
    x = torch.randn(2, m, 100).to(DEVICE)                       # (B, T, K): leading dims kept
    monkeypatch.setenv("QINS_KERNELS", "reference")
    ref = layer(x)
    monkeypatch.setenv("QINS_KERNELS", "triton")
    y = layer(x)
    assert y.shape == (2, m, 37)
    # fp32 x: fp32 accumulation in both (measured <= 4e-7 relative)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@needs_triton
def test_non_contiguous_input_is_read_correctly(monkeypatch):
    layer = _layer()
    x = torch.randn(100, 6).to(DEVICE).t()                      # (6, 100), stride (1, 6)
    monkeypatch.setenv("QINS_KERNELS", "reference")
    ref = layer(x)
    monkeypatch.setenv("QINS_KERNELS", "triton")
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_auto_on_the_cpu_does_not_use_triton(monkeypatch):
    # auto on the CPU runs the CPU fast path (tests/kernels/test_cpu.py), here the reference:
    # the bias requires grad outside no_grad
    if CUDA:
        pytest.skip("CPU-only behaviour")
    monkeypatch.setenv("QINS_KERNELS", "auto")
    layer = _layer()
    x = torch.randn(3, 100)
    assert K._use_triton(x, layer.quantized) is False
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias))


@needs_triton
def test_forced_triton_says_why_it_cannot_run(monkeypatch):
    layer = _layer()
    monkeypatch.setenv("QINS_KERNELS", "triton")
    with pytest.raises(RuntimeError, match="dtype torch.float64"):
        layer.double()(torch.randn(2, 100, dtype=torch.float64).to(DEVICE))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not CUDA:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            _layer()(torch.randn(2, 100))


def test_wrong_feature_count_is_a_clear_error(monkeypatch):
    layer = _layer()
    for backend in ("reference", "triton"):
        monkeypatch.setenv("QINS_KERNELS", backend)
        with pytest.raises((ValueError, RuntimeError), match="100"):
            layer(torch.randn(2, 99).to(DEVICE))


def test_table_follows_the_curvature_and_the_device():
    layer = _layer()
    x = torch.randn(4, 100).to(DEVICE)
    before = layer(x)
    layer.curvature.fill_(2.0)                                   # in place: the table is rebuilt
    fresh = torch.nn.functional.linear(x, layer.quantized.dequantize(), layer.bias)
    assert not torch.allclose(before, fresh)
    torch.testing.assert_close(layer(x), fresh)
    assert layer._table.device == layer.qweight.device
    assert "_table" not in dict(layer.named_buffers()) and "_table" not in layer.state_dict()


def test_custom_ops_pass_torch_library_checks():
    from qins.kernels import ops  # noqa: F401  (registers the ops)
    layer = _layer().cpu()
    qw = layer.quantized
    x = torch.randn(3, 100)
    args = (x, qw.qweight, qw.scales, None, qw.decode_table(), qw.curvature, layer.bias.detach(),
            4, 64, 100, "auto-qins")
    torch.library.opcheck(torch.ops.qins.qlinear.default, args, test_utils=("test_schema", "test_faketensor"))
    out = torch.ops.qins.qlinear(*args)
    torch.testing.assert_close(out, torch.nn.functional.linear(x, qw.dequantize(), layer.bias))
    dq = (qw.qweight, qw.scales, None, qw.decode_table(), qw.curvature, 4, 64, 100, "table", torch.bfloat16)
    torch.library.opcheck(torch.ops.qins.dequantize.default, dq, test_utils=("test_schema", "test_faketensor"))


def test_table_refreshed_by_load_state_dict_under_inference_mode():
    # inference tensors keep no version counter: the in-place copies of load_state_dict must
    # still rebuild the table (this broke `qins.load` inside torch.inference_mode once)
    src = _layer(curvature="tensor")
    src.curvature.fill_(1.5)
    x = torch.randn(3, 100).to(DEVICE)
    with torch.inference_mode():
        dst = QINSLinear(100, 37, True, src.config).to(DEVICE)
        dst(x)                                                   # table built from curvature 0
        dst.load_state_dict(src.state_dict())
        torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_prmt_registers_cached_per_table():
    from qins.kernels.prmt import cached_registers as _registers
    t = torch.randn(1, 16)
    a = _registers(t)
    assert _registers(t) is a                                  # a hit compares no tensors
    t.mul_(2.0)                                                # in place: rebuilt
    b = _registers(t)
    assert b is not a and not torch.equal(a, b)
