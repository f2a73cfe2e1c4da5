"""QINSNativeLinear and QINSNativeMLP against the Transport they hold, evaluated directly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.transport.jacobian import OperatingPoint, transport
from experiments.transport.native import QINSNativeLinear, QINSNativeMLP

F64 = torch.float64


def linear(o, i, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias, dtype=F64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(o, i, generator=g, dtype=F64) / i ** 0.5)
        if bias:
            lin.bias.copy_(torch.randn(o, generator=g, dtype=F64))
    return lin


def inputs(n, i, seed=5):
    return torch.randn(n, i, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("variant,signs", [("seed", "carry"), ("first-order", "carry"), ("first-order", "ignore")])
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_is_its_transport_plus_bias(variant, signs, bias):
    lin = linear(37, 20, bias, seed=1)
    x = inputs(64, 20)
    op = OperatingPoint.from_samples(x[:32], lin.weight)
    mod = QINSNativeLinear.from_float(lin, op, variant, 0.5, signs)
    assert mod.weight.dtype == F64                                   # stored in the layer's dtype
    t = transport(lin.weight, op, variant, 0.5, signs)
    want = t(x[32:]) + (lin.bias if bias else 0)                     # the bias is added after D
    torch.testing.assert_close(mod(x[32:].view(4, 8, 20)), want.view(4, 8, 37), rtol=1e-14, atol=1e-14)
    assert not any(isinstance(m, nn.Linear) for m in mod.modules())  # no float weight left to decode


def test_native_linear_keeps_float32_weights_for_a_float32_layer():
    lin = linear(8, 6, True, seed=2).float()
    op = OperatingPoint.from_samples(inputs(16, 6), lin.weight)
    mod = QINSNativeLinear.from_float(lin, op)
    assert mod.weight.dtype == torch.float32 and mod(inputs(3, 6).float()).dtype == torch.float32


class GatedMLP(nn.Module):
    def __init__(self, h=24, m=40):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(m, h, False, 3), linear(m, h, False, 4), linear(h, m, False, 5)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def mlp_ops(mlp, x):
    h = F.silu(mlp.gate_proj(x)) * mlp.up_proj(x)
    return {"gate_proj": OperatingPoint.from_samples(x, mlp.gate_proj.weight),
            "up_proj": OperatingPoint.from_samples(x, mlp.up_proj.weight),
            "down_proj": OperatingPoint.from_samples(h, mlp.down_proj.weight)}


@pytest.mark.parametrize("gate_up,down", [(True, True), (True, False), (False, True), (False, False)])
def test_native_mlp_decodes_before_silu_and_reencodes_after(gate_up, down):
    mlp = GatedMLP()
    x = inputs(48, 24)
    ops = mlp_ops(mlp, x[:24])
    nat = QINSNativeMLP.from_mlp(mlp, ops, gate_up=gate_up, down=down, alpha=0.8)
    tr = {k: transport(getattr(mlp, k).weight, op, "first-order", 0.8, "carry") for k, op in ops.items()}
    xt = x[24:]
    g = tr["gate_proj"](xt) if gate_up else mlp.gate_proj(xt)
    v = tr["up_proj"](xt) if gate_up else mlp.up_proj(xt)
    h = F.silu(g) * v                                                # float SiLU between decode and encode
    want = tr["down_proj"](h) if down else mlp.down_proj(h)
    torch.testing.assert_close(nat(xt), want, rtol=1e-13, atol=1e-13)


def test_native_mlp_refuses_half_a_gate_up_pair():
    mlp = GatedMLP()
    ops = mlp_ops(mlp, inputs(8, 24))
    gate = QINSNativeLinear.from_float(mlp.gate_proj, ops["gate_proj"])
    with pytest.raises(ValueError, match="both"):
        QINSNativeMLP(gate, mlp.up_proj, mlp.down_proj, mlp.act_fn)
