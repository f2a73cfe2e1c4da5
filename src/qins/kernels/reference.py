"""Pure-PyTorch reference of the weight kernels: decode through the table, then matmul."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..codec.tensor import QuantizedWeight


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """(O, I) weight, or the selected rows, decoded as table[code] * s (+ m)."""
    return qw.dequantize(dtype, rows=rows)


def qlinear(x: torch.Tensor, qw: QuantizedWeight, bias: torch.Tensor | None,
            weight: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b with W decoded from codes (or the given pre-decoded `weight`)."""
    w = dequantize(qw, x.dtype) if weight is None else weight.to(x.dtype)
    return F.linear(x, w, bias)
