"""QINSLinear on CUDA stores 4-bit codes tiled where the tensor-core kernel builds
(kernels.tiles_take): its outputs equal those of the same module kept K-major (QINS_TILED=0)
bit for bit at 1..16 rows (the same kernel, the same sums) and above (the codes untiled for
the call, then the same route); it saves the codes it was given, reloads them, and runs under
CUDA graph capture. Skipped without CUDA (the CPU half is tests/weights/test_tiled.py)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from qins import kernels
from qins.codec.config import WeightConfig
from qins.kernels import cuda_qlinear
from qins.weights.linear import QINSLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or cuda_qlinear.why_not("cuda") is not None,
                                reason="needs a GPU the CUDA weight kernel builds for")


def _module(out_f, in_f, group, fmt="qins"):
    torch.manual_seed(out_f + in_f)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    lin.weight.data.normal_(0, 0.02)
    return QINSLinear.from_float(lin, replace(WeightConfig(fmt, 4, group), clip_search=False))


@pytest.mark.parametrize("out_f,in_f,group,fmt", [(1000, 4160, 64, "qins"), (68, 2312, 32, "qins"),
                                                  (132, 2184, 128, "nf4")])
def test_tiled_module_equals_the_k_major_one(monkeypatch, out_f, in_f, group, fmt):
    cpu = _module(out_f, in_f, group, fmt)
    tiled = copy.deepcopy(cpu).cuda()
    monkeypatch.setenv("QINS_TILED", "0")
    kmaj = copy.deepcopy(cpu).cuda()
    monkeypatch.delenv("QINS_TILED")
    assert cuda_qlinear.is_tiled(tiled.qweight) and kernels.is_kmajor(kmaj.qweight)
    for dtype in (torch.bfloat16, torch.float16):
        for rows in (1, 3, 16, 17, 64):
            x = torch.randn(rows, in_f, device="cuda", dtype=dtype)
            assert torch.equal(tiled(x), kmaj(x)), (dtype, rows)
    sd = tiled.state_dict()
    assert torch.equal(sd["qweight"].cpu(), cpu.qweight)
    again = copy.deepcopy(cpu).cuda()
    again.load_state_dict(sd)
    assert cuda_qlinear.is_tiled(again.qweight) and torch.equal(again.qweight, tiled.qweight)
    assert torch.equal(tiled.cpu().qweight, cpu.qweight)


def test_a_tiled_layer_is_captured_by_cuda_graphs():
    mod = _module(1000, 4160, 64).cuda()
    assert cuda_qlinear.is_tiled(mod.qweight)
    x = torch.randn(2, 4160, device="cuda", dtype=torch.bfloat16)
    want = mod(x)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        mod(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y = mod(x)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, want)
