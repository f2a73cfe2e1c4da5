"""QINS-domain modules: x -> E(x) -> matmul with the transported weight -> D(z) (Pattern B).

    QINSNativeLinear   replaces an nn.Linear: E, one matmul on the code, D, then the bias
                       (the bias is added in the float domain, after D)
    QINSNativeMLP      replaces a gated MLP  down(act(gate(x)) * up(x))  (Llama, Qwen2,
                       Mistral): gate and up share one E(x); their outputs are decoded
                       before the activation and the product is re-encoded for down
                       ("decode before SiLU, re-encode after"). Any of the three may stay a
                       float nn.Linear (a Pattern A site).

No sound in-domain SiLU exists here: E(SiLU(D(z))) is an elementwise map of the code, so
tabulating it is a decode and an encode fused into one lookup, not a saving; and the gate *
up product in the code domain, E(g v) = sign |z_g||z_v| / (|z_g||z_v| + (1-|z_g|)(1-|z_v|)/alpha),
needs both magnitudes decoded to (1-|z|)/|z| first. So the MLP decodes and re-encodes.

Every E and D applied to an activation goes through `_Counted._encode/_decode`, which
tally them while a `experiments.transport.counter.count_decodes` context is open.
"""
from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from qins.codec.qins import SEED_ALPHA
from .jacobian import OperatingPoint, Transport, decode, encode, transport


class _Counted(nn.Module):
    """Activation transforms that a decode counter can tally (`_tally` is set by the counter)."""

    _tally: Counter | None = None

    def _encode(self, x: torch.Tensor, alpha: float) -> torch.Tensor:
        if self._tally is not None:
            self._tally["activation_encodes"] += 1
            self._tally["activation_encoded_elements"] += x.numel()
        return encode(x, alpha)

    def _decode(self, z: torch.Tensor, alpha: float, z_min: torch.Tensor) -> torch.Tensor:
        if self._tally is not None:
            self._tally["activation_decodes"] += 1
            self._tally["activation_decoded_elements"] += z.numel()
        return decode(z, alpha, z_min)


def _register(module: nn.Module, name: str, t: torch.Tensor | None, dtype: torch.dtype) -> None:
    module.register_buffer(name, None if t is None else t.to(dtype).contiguous())


class QINSNativeLinear(_Counted):
    """A linear layer computed on QINS codes with a transported weight.

    Buffers (Transport's tensors, in `dtype`):
      weight      (O, I)   W'
      sign_shift  (I,)     first-order with signs="carry"; else None
      offset      (O,)     first-order with signs="ignore"; else None
      level       (O,)     first-order with signs="carry"; else None
      z_min       (O,)     decode clamp
    Parameter: bias (O,) or None, added after D.
    Attributes: alpha, variant, signs.
    """

    def __init__(self, t: Transport, bias: torch.Tensor | None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.out_features, self.in_features = t.weight.shape
        self.alpha, self.variant, self.signs = t.alpha, t.variant, t.signs
        for name in ("weight", "sign_shift", "offset", "level", "z_min"):
            _register(self, name, getattr(t, name), dtype)
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, op: OperatingPoint, variant: str = "first-order",
                   alpha: float = SEED_ALPHA, signs: str = "carry") -> "QINSNativeLinear":
        """Transport `linear`'s weight at the operating point `op` (float64 math, stored in its dtype)."""
        w = linear.weight.detach()
        t = transport(w, op, variant=variant, alpha=alpha, signs=signs)
        return cls(t, linear.bias, dtype=w.dtype).to(w.device)

    @property
    def transport(self) -> Transport:
        return Transport(self.weight, self.sign_shift, self.offset, self.level, self.z_min,
                         self.alpha, self.variant, self.signs)

    def from_code(self, u: torch.Tensor) -> torch.Tensor:
        """y (..., O) from an already encoded input u = E(x) (..., I): matmul, D, + bias."""
        z = self.transport.code_output(u)
        y = self._decode(z, self.alpha, self.z_min)
        return y if self.bias is None else y + self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_code(self._encode(x, self.alpha))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"variant={self.variant}, signs={self.signs}, alpha={self.alpha:g}")


class QINSNativeMLP(_Counted):
    """A gated MLP with gate+up and/or down in the QINS domain.

    Submodules: gate_proj, up_proj, down_proj, each a QINSNativeLinear (transported) or the
    original float linear; act_fn. gate_proj and up_proj are transported together or not
    at all (they share E(x)).
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, act_fn: nn.Module):
        super().__init__()
        if isinstance(gate_proj, QINSNativeLinear) != isinstance(up_proj, QINSNativeLinear):
            raise ValueError("gate_proj and up_proj must both be transported or both stay float")
        if isinstance(gate_proj, QINSNativeLinear) and gate_proj.alpha != up_proj.alpha:
            raise ValueError("gate_proj and up_proj share E(x): they need the same alpha")
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate_proj, up_proj, down_proj, act_fn

    @property
    def native_gate_up(self) -> bool:
        return isinstance(self.gate_proj, QINSNativeLinear)

    @classmethod
    def from_mlp(cls, mlp: nn.Module, ops: dict[str, OperatingPoint], gate_up: bool, down: bool,
                 variant: str = "first-order", alpha: float = SEED_ALPHA, signs: str = "carry") -> "QINSNativeMLP":
        """Transport the chosen projections of `mlp`; ops maps "gate_proj"/"up_proj"/"down_proj" to points."""
        def native(name):
            return QINSNativeLinear.from_float(getattr(mlp, name), ops[name], variant, alpha, signs)
        g = native("gate_proj") if gate_up else mlp.gate_proj
        u = native("up_proj") if gate_up else mlp.up_proj
        d = native("down_proj") if down else mlp.down_proj
        return cls(g, u, d, mlp.act_fn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.native_gate_up:
            u = self._encode(x, self.gate_proj.alpha)                # one E(x) for both
            g, v = self.gate_proj.from_code(u), self.up_proj.from_code(u)   # decoded before SiLU
        else:
            g, v = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act_fn(g) * v)                    # a native down re-encodes
