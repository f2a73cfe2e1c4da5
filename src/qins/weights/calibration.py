"""Calibration statistics: mean squared input per channel of every linear layer."""
from __future__ import annotations

import torch
from torch import nn

from ..models import forward_windows
from .linear import is_linear_like


@torch.inference_mode()
def input_second_moments(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear name: (in_features,) E[x_j^2]} over every token of `windows` (N, T) token ids.

    These are the diagonal of each layer's Hessian of the output error, the weights of the
    activation-weighted calibration error. Use text disjoint from any evaluation windows.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def make_hook(name):
        def hook(_mod, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name, mod in model.named_modules():
        if is_linear_like(mod):
            hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    forward_windows(model, windows, batch_size, "calibration", progress, handles=hooks)
    return {n: (sums[n] / counts[n]).cpu() for n in sums}
