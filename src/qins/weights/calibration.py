"""Calibration statistics: the second moments of every linear layer's input, one collector
(`input_moments`) for the diagonal (activation-weighted error) and the full matrix (GPTQ).

The statistics are computed where the activations are (the model's device) and kept on
`device` (default: there too, so the quantizer that reads them runs on the same device).

Memory of the full matrices (GPTQ): one (I, I) float64 accumulator per distinct layer input
while collecting, returned as float32. A Llama block has four inputs (q/k/v share one,
gate/up share one, o and down): 3 * 4096^2 + 14336^2 entries for Llama-3-8B's shapes, i.e.
2.05 GB per block in float64 (down_proj's 14336^2 alone is 1.64 GB; 822 MB in float32),
65.6 GB for its 32 blocks while collecting, and 32.8 GB returned. The accumulators are
converted one at a time, so the peak stays near the float64 total. Restrict `names` to
collect fewer layers at a time, or pass device="cpu" to hold them in host memory (each
batch's statistic then crosses to the host).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .linear import is_linear_like


@torch.inference_mode()
def input_second_moments(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                         progress: bool = True, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """{linear name: (in_features,) E[x_j^2]} over every token of `windows` (N, T) token ids.

    These are the diagonal of each layer's Hessian of the output error, the weights of the
    activation-weighted calibration error. Use text disjoint from any evaluation windows.
    device: where the statistics are kept (default: the model's device).
    """
    return input_moments(model, _window_batches(model, windows, batch_size), full=False,
                         total=-(-windows.shape[0] // batch_size), progress=progress, device=device)


def _window_batches(model: nn.Module, windows: torch.Tensor, batch_size: int):
    """(forward kwargs, keep=None) per batch of `windows`, on the model's device, no KV cache."""
    device = next(model.parameters()).device
    return ((dict(input_ids=windows[i:i + batch_size].to(device), use_cache=False), None)
            for i in range(0, windows.shape[0], batch_size))


@torch.inference_mode()
def input_hessians(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True,
                   names: list[str] | None = None,
                   device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """{linear name: (I, I) E[x x^T]} over every token of `windows` (N, T) token ids.

    The second-moment matrix of each linear layer's input: the Hessian (up to a factor 2) of
    its output error, which rounding="gptq" uses and whose diagonal is `input_second_moments`.
    Layers fed the same tensor (q/k/v, gate/up) share one matrix. Summed in float64.
    device: where the matrices are kept (default: the model's device); see the module
    docstring for their size.
    """
    return input_moments(model, _window_batches(model, windows, batch_size), full=True, names=names,
                         total=-(-windows.shape[0] // batch_size), progress=progress, device=device)


@torch.inference_mode()
def input_moments(model: nn.Module, batches, full: bool = True, names: list[str] | None = None,
                  total: int | None = None, progress: bool = True,
                  desc: str = "calibration (input moments)",
                  device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
    """{linear name: E[x x^T] (I, I) if full else E[x^2] (I,)} over the kept tokens of `batches`.

    batches   iterable of (model keyword arguments, keep): keep is a (B*T,) bool mask of the
              tokens to count (None = all; e.g. the attention mask, to skip padding)
    device    where the accumulators and results live (None: the device of each layer's
              input); the products are computed on the input's device either way
    Layers fed the same tensor (q/k/v, gate/up) share one accumulator; float64 sums.
    """
    device = None if device is None else torch.device(device)
    acc: dict[str, list] = {}            # name -> [sum, tokens]; shared between layers of one input
    batch: dict[int, tuple] = {}         # id(input) -> (input, accumulator), this batch
    keep_now: list = [None]

    def moment(x):
        """(statistic on `device` or x's, tokens) of one layer input."""
        xf = x.detach().reshape(-1, x.shape[-1])
        if keep_now[0] is not None:
            xf = xf[keep_now[0].to(xf.device)]
        xf = xf.double()
        stat = xf.T @ xf if full else (xf * xf).sum(0)               # fp64 on the input's device
        return (stat if device is None else stat.to(device)), xf.shape[0]

    def make_hook(name):
        def hook(_mod, args):
            x = args[0]
            hit = batch.get(id(x))
            if hit is None:
                stat, n = moment(x)
                a = acc.setdefault(name, [torch.zeros_like(stat), 0])
                a[0] += stat
                a[1] += n
                batch[id(x)] = (x, a)                       # holding x keeps its id unique
                return
            x, a = hit
            mine = acc.setdefault(name, a)                  # first batch: share the accumulator
            if mine is not a:                               # the same input, grouped otherwise:
                stat, n = moment(x)                         # rare, so recomputed rather than every
                mine[0] += stat                             # statistic held (2 GB a block at 8B)
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
    out = {}
    for n, a in acc.items():
        if id(a) not in done:
            done[id(a)] = a[0].div_(a[1]).float()             # in place: no second float64 copy
            a[0] = None                                    # free each float64 sum once converted
        out[n] = done[id(a)]
    return out
