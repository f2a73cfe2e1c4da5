"""Fused layers (Phi-3's qkv_proj, gate_up_proj): what the format stores for them.

A fused weight is quantized as the one (O, I) tensor the checkpoint holds. Per-tensor
curvature: one a shared by the stacked logical tensors. Per-channel curvature (and the group
scales, always per row): rows are independent, so each logical tensor's codes equal those it
gets when quantized alone.
"""
from __future__ import annotations

import pytest
import torch

from qins.codec.config import WeightConfig
from qins.codec.tensor import QuantizedWeight


def parts():
    """q, k, v of Phi-3-like attention at toy size: different scales, heavy-tailed v."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(96, 128, generator=g) * 0.05
    k = torch.randn(32, 128, generator=g) * 0.2
    chi = torch.randn(32, 128, 3, generator=g).pow(2).mean(-1).sqrt()
    v = torch.randn(32, 128, generator=g) / chi * 0.02                # Student-t(3)
    return [q, k, v]


@pytest.mark.parametrize("bits,group", [(4, 64), (8, 128), (3, None)])
def test_channel_curvature_quantizes_each_logical_tensor_as_alone(bits, group):
    cfg = WeightConfig("qins", bits, group, curvature="channel")
    fused = QuantizedWeight.from_float(torch.cat(parts()), cfg)
    row = 0
    for p in parts():
        alone = QuantizedWeight.from_float(p, cfg)
        rows = slice(row, row + p.shape[0])
        assert torch.equal(fused.qweight[rows], alone.qweight)
        assert torch.equal(fused.scales[rows], alone.scales)
        assert torch.equal(fused.curvature[rows], alone.curvature)
        row += p.shape[0]


def test_tensor_curvature_is_shared_by_the_fused_parts():
    cfg = WeightConfig("qins", 4, 64)
    fused = QuantizedWeight.from_float(torch.cat(parts()), cfg)
    assert fused.curvature.shape == (1,)                         # one a for q, k and v together
    alone = [QuantizedWeight.from_float(p, cfg).curvature.item() for p in parts()]
    assert len(set(alone)) > 1                                  # alone, the parts would pick differently
    dec = fused.dequantize()
    assert dec.shape == (160, 128) and fused.scales.shape == (160, 2)
