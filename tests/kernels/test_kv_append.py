"""The quantize-on-append kernel (kernels/triton_kv.py) against the torch reference path of
QINSLayer (kv/codec.py's math): the same layer inputs must leave the same pages.

CPU (CI): Triton's interpreter, fp32 and fp16 inputs (its bf16 is not faithful), odd batch,
heads and token counts. Tolerance: bit-exact codes, scales and zero points (the kernel runs
codec.py's fp32 ops in the same order, with IEEE division; on the GPU the benchmark script
reports the share of equal codes)."""
import pytest
import torch

from qins.kv.layer import QINSLayer
from qins.kv.rope import Rope

from .conftest import CUDA, DEVICE, needs_triton

pytestmark = needs_triton

CASES = [  # (k_bits, v_bits, group, k_zero, v_zero, v_curvature, sink, dtype)
    (4, 4, 32, True, False, 0.5, 1, torch.float16), (8, 8, 16, False, False, 0.0, 1, torch.float32),
    (2, 8, 16, True, True, 0.5, 0, torch.float32)] + ([(4, 4, 128, True, False, 0.5, 1, torch.bfloat16),
                                                        (8, 8, 64, False, False, 0.0, 1, torch.bfloat16)]
                                                       if CUDA else [])


def _layer(kb, vb, group, k_zero, v_zero, a, sink, H, D, rope=None, vrot=False, widths=None):
    return QINSLayer(kb, vb, residual=3, group=group, page_kb=16, sink=sink, k_zero=k_zero, v_zero=v_zero,
                     v_curvature=a, expect_heads=H, expect_head_dim=D, rope=rope, v_rotate=vrot, k_widths=widths)


@pytest.mark.parametrize("prerope,plan", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("case", CASES)
def test_append_kernel_matches_reference(case, prerope, plan, monkeypatch):
    # prerope: keys turned back by their position's RoPE angle before either path quantizes them,
    # with rotated values (kv/vrot.py) as well; plan: a key plan's channel widths (0..8 bits, fields
    # packed into bytes), encoded on each channel's grid
    *case, dtype = case
    if plan and (not case[3] or case[0] == 8):
        pytest.skip("key plans are for keys with zero points below 8 bits")
    B, H, D = (3, 3, 32) if not CUDA else (4, 8, 128)
    from .test_kv_attention import _plan_widths
    widths = _plan_widths(H, D, case[0], 11) if plan else None
    g = torch.Generator().manual_seed(sum(case[:3]))
    chunks = [torch.randn(B, H, n, D, generator=g) * 2 + 0.3 for n in ((45, 1, 40, 2) if not CUDA else (700, 1, 300))]
    chunks[0][:, :, 0] *= 30                                      # an outlier sink token
    layers = {}
    for backend in ("reference", "triton"):
        monkeypatch.setenv("QINS_KERNELS", backend)
        layer = _layer(*case, H, D, Rope(1.0 / 300.0 ** (torch.arange(0, D, 2) / D)) if prerope else None, prerope,
                       widths)
        for x in chunks:
            layer.update(x.to(DEVICE, dtype), x.flip(3).to(DEVICE, dtype))
        assert layer.kernels == (backend == "triton")
        layers[backend] = layer
    ref, got = layers["reference"], layers["triton"]
    assert got.n_quantized == ref.n_quantized >= 64
    for a, b in zip(got.planes(), ref.planes()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert (got.k_offset is None) == (ref.k_offset is None)
    if ref.k_offset is not None:
        assert torch.equal(got.k_offset, ref.k_offset)
