"""Calibration statistics: the second moments of every linear layer's input, one collector
(`input_moments`) for the diagonal (activation-weighted error) and the full matrix (GPTQ)."""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .linear import is_linear_like


@torch.inference_mode()
def input_second_moments(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                         progress: bool = True) -> dict[str, torch.Tensor]:
    """{linear name: (in_features,) E[x_j^2]} over every token of `windows` (N, T) token ids.

    These are the diagonal of each layer's Hessian of the output error, the weights of the
    activation-weighted calibration error. Use text disjoint from any evaluation windows.
    """
    return input_moments(model, _window_batches(model, windows, batch_size), full=False,
                         total=-(-windows.shape[0] // batch_size), progress=progress)


def _window_batches(model: nn.Module, windows: torch.Tensor, batch_size: int):
    """(forward kwargs, keep=None) per batch of `windows`, on the model's device, no KV cache."""
    device = next(model.parameters()).device
    return ((dict(input_ids=windows[i:i + batch_size].to(device), use_cache=False), None)
            for i in range(0, windows.shape[0], batch_size))


@torch.inference_mode()
def input_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                   names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """{linear name: (I, I) E[x x^T]} over every token of `windows` (N, T) token ids.

    The second-moment matrix of each linear layer's input: the Hessian (up to a factor 2) of
    its output error, which rounding="gptq" uses and whose diagonal is `input_second_moments`.
    Layers fed the same tensor (q/k/v, gate/up) share one matrix. Summed in float64.
    """
    return input_moments(model, _window_batches(model, windows, batch_size), full=True, names=names,
                         total=-(-windows.shape[0] // batch_size), progress=progress)


@torch.inference_mode()
def input_moments(model: nn.Module, batches, full: bool = True, names: list[str] | None = None,
                  total: int | None = None, progress: bool = True,
                  desc: str = "calibration (input moments)") -> dict[str, torch.Tensor]:
    """{linear name: E[x x^T] (I, I) if full else E[x^2] (I,)} over the kept tokens of `batches`.

    batches   iterable of (model keyword arguments, keep): keep is a (B*T,) bool mask of the
              tokens to count (None = all; e.g. the attention mask, to skip padding)
    Layers fed the same tensor (q/k/v, gate/up) share one accumulator; float64 sums.
    """
    acc: dict[str, list] = {}            # name -> [sum, tokens]; shared between layers of one input
    batch: dict[int, tuple] = {}         # id(input) -> (input, accumulator, stat, tokens), this batch
    keep_now: list = [None]

    def make_hook(name):
        def hook(_mod, args):
            x = args[0]
            hit = batch.get(id(x))
            if hit is None:
                xf = x.detach().reshape(-1, x.shape[-1])
                if keep_now[0] is not None:
                    xf = xf[keep_now[0]]
                xf = xf.double()
                stat = xf.T @ xf if full else (xf * xf).sum(0)
                a = acc.setdefault(name, [torch.zeros_like(stat), 0])
                a[0] += stat
                a[1] += xf.shape[0]
                batch[id(x)] = (x, a, stat, xf.shape[0])    # holding x keeps its id unique
                return
            _, a, stat, n = hit
            mine = acc.setdefault(name, a)                  # first batch: share the accumulator
            if mine is not a:                               # the same input, grouped otherwise
                mine[0] += stat
                mine[1] += n
        return hook

    hooks = []
    for name, mod in model.named_modules():
        if is_linear_like(mod) and (names is None or name in names):
            hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    try:
        for kwargs, keep in tqdm(batches, total=total, desc=desc, disable=not progress, leave=False):
            batch.clear()
            keep_now[0] = keep
            model(**kwargs)
    finally:
        batch.clear()
        for h in hooks:
            h.remove()
    done: dict[int, torch.Tensor] = {}
    return {n: done.setdefault(id(a), (a[0] / a[1]).float().cpu()) for n, a in acc.items()}
