"""Mixed precision to a budget: per-tensor sensitivity and a bit allocator.

Quantizing tensor t with candidate config c (bits, group) costs b_t(c) stored bits and, to
second order, raises the model's per-token KL from the float model by about

    d_t(c) = 1/2 sum_o F_t[o] * (dW H_t dW^T)[o, o]          dW = W - Q_c(W)   (O, I)

H_t = E[x x^T] (I, I) is the layer's input second moment and F_t[o] = E[(dl/dy_o)^2] the
Fisher information of its output o: the squared gradient of the log-likelihood of a token
sampled from the float model, averaged over calibration tokens (so E[l] is the KL's own
curvature, not the training loss'). An embedding read as input adds
1/2 sum_n sum_d G[n, d] dE[v_n, d]^2 over calibration positions n with token v_n.

b_t(c) is by default the raw stored size (QuantizedWeight.nbytes). `sensitivities(size=...)`
charges another size instead, measured on the candidate's own codes: the .qins archive's
entropy-coded bytes (entropy.archive.WeightCodedSize, passed in from above: weights does not
import entropy), so widths and groups that code below their raw size are charged what they
cost on disk. Near-uniform 4-bit QINS codes code to 3.84-3.90 bits, 3-bit to 2.82, an
embedding's 4-bit codes to 3.50, log8 scale codes to 4.2-5.6 bits (t410 plan of
benchmarks/results/archive_curve_s5.md).

The allocator picks one candidate per tensor to minimise sum_t d_t under a bit budget (or the
fewest bits under a bound on sum_t d_t): a multiple-choice knapsack, solved by a Lagrange
multiplier (each tensor minimises d + lambda * b) and a greedy fill of what the budget has
left. The estimate assumes the tensors' errors add; `qins.compress` measures the result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..codec.tensor import QuantizedWeight
from ..codec.config import WeightConfig, scale_dtype_for
from .linear import _linear_weight, is_linear_like

# (bits, group): 3.25, 4.125, 4.25, 5.25, 6.25 and 8.125 bits per weight with fp16 scales
# (3.125 .. 6.125 with log8 scales, which widths up to 6 take by default).
# Each candidate costs one quantization of the whole model while measuring sensitivity.
DEFAULT_MENU = ((3, 64), (4, 128), (4, 64), (5, 64), (6, 64), (8, 128))


def default_candidates(fmt: str = "qins", menu=DEFAULT_MENU, rounding: str = "gptq",
                       scales: str = "auto") -> list[WeightConfig]:
    """One WeightConfig per (bits, group) of `menu`. scales "auto": log8 group scales where the
    format and width allow them (as `qins compress` does for a fixed config), else float16."""
    return [WeightConfig(fmt, b, g, rounding=rounding, scale_dtype=scale_dtype_for(scales, fmt, b)) for b, g in menu]


# -- sensitivity ------------------------------------------------------------------------------
def fisher(model: nn.Module, windows: torch.Tensor, embedding: str | None = None, seed: int = 0,
           progress: bool = True) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """({linear name: (O,) E[(dl/dy_o)^2]}, (V, D) embedding-row gains or None).

    l is the log-likelihood of a token sampled from the model's own next-token distribution at
    every position of `windows` (N, T); one sample per position (a Monte-Carlo Fisher).
    """
    sums: dict[str, torch.Tensor] = {}
    n_tok = 0
    emb_gain: torch.Tensor | None = None
    ids_now: list[torch.Tensor] = []
    handles = []

    def out_hook(name):
        def fwd(_mod, _args, out):
            def grad(g):
                g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0)
                sums[name] = sums.get(name, 0) + g2
            if out.requires_grad:
                out.register_hook(grad)
        return fwd

    def emb_hook(mod, args, out):
        out = out.detach().requires_grad_(True)     # gradients start here: weights stay frozen

        def grad(g):
            nonlocal emb_gain
            g2 = g.detach().float().pow(2).reshape(-1, g.shape[-1])
            if emb_gain is None:
                emb_gain = torch.zeros(mod.num_embeddings, g.shape[-1], device=g.device)
            emb_gain.index_add_(0, ids_now[0].reshape(-1), g2)
        out.register_hook(grad)
        return out

    in_emb = model.get_input_embeddings()
    handles.append(in_emb.register_forward_hook(emb_hook))
    for name, mod in model.named_modules():
        if is_linear_like(mod):
            handles.append(mod.register_forward_hook(out_hook(name)))
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)         # samples depend on the device
    requires = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for i in tqdm(range(windows.shape[0]), desc="sensitivity (Fisher)", disable=not progress, leave=False):
            ids = windows[i:i + 1].to(device)
            ids_now[:] = [ids]
            with torch.enable_grad():
                logits = model(input_ids=ids, use_cache=False).logits.float()      # (1, T, V)
                with torch.no_grad():
                    probs = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
                    y = torch.multinomial(probs, 1, generator=gen).reshape(-1)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y,
                                                         reduction="sum")
                loss.backward()
            n_tok += ids.numel()
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)
    gains = {n: s / n_tok for n, s in sums.items()}
    return gains, (emb_gain / n_tok if emb_gain is not None else None)


@dataclass
class Tensor:
    """One quantizable tensor: its roles and, per candidate, charged bits and estimated loss."""
    name: str                          # module that owns the weight (the input embedding if tied)
    numel: int
    linear: str | None                 # the linear reading the weight (lm_head when tied)
    embedding: bool                    # also (or only) read as the input embedding
    bits: list[int] = field(default_factory=list)      # what the allocator charges (see `size`)
    loss: list[float] = field(default_factory=list)
    weights: list[QuantizedWeight] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)    # raw stored bits (8 nbytes); [] = `bits`

    def stored_bits(self, i: int) -> int:
        return self.stored[i] if self.stored else self.bits[i]


# bytes charged for a candidate: size(quantized weight, module name) -> int
Size = Callable[[QuantizedWeight, str], int]


def _out_err(dW: torch.Tensor, H: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """(O,) diagonal of dW H dW^T, in row chunks (the lm_head has 49k rows)."""
    out = []
    for r in range(0, dW.shape[0], chunk):
        d = dW[r:r + chunk]
        out.append(((d @ H) * d).sum(1))
    return torch.cat(out)


def sensitivities(model: nn.Module, candidates: list[WeightConfig], hessians: dict[str, torch.Tensor],
                  gains: dict[str, torch.Tensor], emb_gain: torch.Tensor | None,
                  include_embeddings: bool = True, skip=(), keep: bool = True,
                  progress: bool = True, size: Size | None = None) -> list[Tensor]:
    """Quantize every tensor with every candidate; return bits and estimated loss of each.

    size  bytes to charge a candidate, `size(qw, name)`; None charges the raw stored bytes
          (`qw.nbytes()`). Tensor.stored keeps the raw bits either way."""
    from .targets import _embedding_name, _matches, _tied_output

    in_name = _embedding_name(model, "get_input_embeddings")
    out_name = _embedding_name(model, "get_output_embeddings")
    tied = _tied_output(model, in_name, out_name)
    tensors: list[Tensor] = []
    for name, mod in model.named_modules():
        if any(_matches(name, p) for p in skip):
            continue
        if is_linear_like(mod) and name != out_name:
            tensors.append(Tensor(name, mod.weight.numel(), name, False))
    if include_embeddings and in_name is not None:
        w = model.get_submodule(in_name).weight
        if tied:
            tensors.insert(0, Tensor(in_name, w.numel(), out_name, True))
        else:
            tensors.insert(0, Tensor(in_name, w.numel(), None, True))
            if out_name is not None:
                tensors.append(Tensor(out_name, model.get_submodule(out_name).weight.numel(), out_name, False))

    jobs = [(t, c) for t in tensors for c in candidates]
    for t, cfg in tqdm(jobs, desc="sensitivity (candidates)", disable=not progress, leave=False):
        mod = model.get_submodule(t.name)
        w = (mod.weight.detach() if t.embedding else _linear_weight(mod, t.name)).float()
        H = hessians.get(t.linear) if t.linear else None
        c = cfg if H is not None or cfg.rounding == "nearest" else cfg.replace(rounding="nearest")
        qw = QuantizedWeight.from_float(w, c, importance=H, name=t.name)
        dW = w - qw.dequantize()
        loss = 0.0
        if t.linear is not None and H is not None:
            g = gains.get(t.linear)
            e = _out_err(dW.double(), H.double())
            loss += 0.5 * float((g.double() * e).sum()) if g is not None else float(e.sum())
        if t.embedding and emb_gain is not None:
            loss += 0.5 * float((emb_gain.double() * dW.double().pow(2)).sum())
        t.stored.append(8 * qw.nbytes())
        t.bits.append(8 * (size(qw, t.name) if size is not None else qw.nbytes()))
        t.loss.append(loss)
        if keep:
            t.weights.append(qw)
    return tensors


# -- allocation -------------------------------------------------------------------------------
def _choose(tensors: list[Tensor], lam: float) -> list[int]:
    return [min(range(len(t.bits)), key=lambda i: (t.loss[i] + lam * t.bits[i], t.bits[i])) for t in tensors]


def _totals(tensors, choice):
    return sum(t.bits[i] for t, i in zip(tensors, choice)), sum(t.loss[i] for t, i in zip(tensors, choice))


def allocate(tensors: list[Tensor], *, max_bits: float | None = None, max_loss: float | None = None) -> list[int]:
    """Candidate index per tensor: least estimated loss within `max_bits` stored bits, or the
    fewest bits whose estimated loss is at most `max_loss`. Raises if neither can be met."""
    if (max_bits is None) == (max_loss is None):
        raise ValueError("give exactly one of max_bits and max_loss")
    cheapest = [min(range(len(t.bits)), key=lambda i: (t.bits[i], t.loss[i])) for t in tensors]
    best = [min(range(len(t.bits)), key=lambda i: (t.loss[i], t.bits[i])) for t in tensors]
    if max_bits is not None:
        if _totals(tensors, cheapest)[0] > max_bits:
            raise ValueError(f"the budget is below the smallest candidate mix ({_totals(tensors, cheapest)[0]:.0f} bits)")
        ok = lambda ch: _totals(tensors, ch)[0] <= max_bits                       # noqa: E731
    else:
        if _totals(tensors, best)[1] > max_loss:
            raise ValueError(f"even the largest candidates are estimated above the bound "
                             f"({_totals(tensors, best)[1]:.4g} > {max_loss:.4g})")
        ok = lambda ch: _totals(tensors, ch)[1] <= max_loss                       # noqa: E731
    # each tensor minimises loss + lam * bits: lam -> 0 gives `best`, lam -> inf `cheapest`;
    # feasibility is monotone in lam (budget: feasible above lam*, bound: below lam*)
    budget = max_bits is not None
    if ok(best if budget else cheapest):
        return best if budget else cheapest
    lo, hi = 1e-30, 1.0
    while ok(_choose(tensors, hi)) != budget:
        hi *= 1e3
    choice = cheapest if budget else best
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        ch = _choose(tensors, mid)
        if ok(ch):
            choice = ch
            if budget:
                hi = mid
            else:
                lo = mid
        elif budget:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-9:
            break
    return _greedy_fill(tensors, choice, max_bits) if budget else choice


def _greedy_fill(tensors, choice, max_bits):
    """Spend what the budget has left on the upgrades with the best loss saved per bit."""
    choice = list(choice)
    used = _totals(tensors, choice)[0]
    while True:
        best, best_rate = None, 0.0
        for k, (t, i) in enumerate(zip(tensors, choice)):
            for j in range(len(t.bits)):
                db, dl = t.bits[j] - t.bits[i], t.loss[i] - t.loss[j]
                if dl > 0 and 0 < db <= max_bits - used and dl / db > best_rate:
                    best, best_rate = (k, j, db), dl / db
        if best is None:
            return choice
        k, j, db = best
        choice[k] = j
        used += db
