"""Error-compensating rounding (GPTQ) for any decode table: codes only, scales fixed.

Rounding each weight to its nearest level minimizes the weight error, not the layer's output
error E||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T) with H = E[x x^T] (I, I). GPTQ (Frantar et
al. 2022) rounds one input column at a time and moves that column's error onto the columns
not yet rounded, weighted by the inverse Hessian, so later roundings compensate earlier ones.
Nothing in the method needs a uniform grid: a column is "rounded" by the same nearest-level
search the codec uses, on whatever table (QINS, INT, NF4, FP8) and per-group scale/offset the
calibration chose, so every format gets the same treatment and comparisons stay fair.

    codes = gptq_codes(w, H, levels, scale_cols, offset_cols)

Columns are visited in decreasing H_jj ("act order"); scales are fixed beforehand ("static
groups"), so the order does not change the stored layout. Dead inputs (H_jj = 0) have their
weights zeroed before rounding, as in the original: they never meet a nonzero input.

Everything runs on the device of `w` (the Hessian is moved there). The column loop is
inherent to the method: about ten small kernels per column, no host sync inside it.
"""
from __future__ import annotations

import torch

from .grid import lookup, midpoints, nearest_codes

DAMP = 0.01           # fraction of mean(diag H) added to the diagonal: keeps H invertible
BLOCK = 128           # columns updated lazily together (same result, fewer big matmuls)


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (I, I), after damping; float64 for stability."""
    H = H.double().clone()
    d = torch.diagonal(H)
    d.add_(damp * float(d.mean()) + 1e-12)
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            break
        H.diagonal().add_(damp * float(torch.diagonal(H).mean()) * 10 ** attempt)  # not PD: damp more
    else:
        raise ValueError("Hessian is not positive definite even after damping")
    Hinv = torch.cholesky_inverse(L)
    return torch.linalg.cholesky(Hinv, upper=True)


def gptq_codes(
    w: torch.Tensor,
    hessian: torch.Tensor,
    levels: torch.Tensor,
    scale_cols: torch.Tensor,
    offset_cols: torch.Tensor | None = None,
    *,
    damp: float = DAMP,
    block: int = BLOCK,
    act_order: bool = True,
) -> torch.Tensor:
    """Codes (O, I) int64 for w (O, I) given H (I, I) and fixed per-column scale/offset (O, I).

    levels: (n,) shared table or (O, n) one table per row (sorted ascending); a weight x is
    stored as levels[code] * s + m.
    """
    O, I = w.shape
    if hessian.shape != (I, I):
        raise ValueError(f"Hessian must have shape ({I}, {I}), got {tuple(hessian.shape)}")
    if not torch.isfinite(hessian).all():
        raise ValueError("Hessian has NaN/Inf entries")
    dev = w.device
    W = w.float().clone()                                           # fp32 updates, fp64 inverse
    H = hessian.to(dev).double()
    dead = torch.diagonal(H) <= 0
    if dead.any():
        # an input that never fires: its weights meet only zeros, so store them as 0 (the
        # nearest code to 0) and give H a unit diagonal there so it stays invertible
        W[:, dead] = 0.0
        H = H.clone()
        H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(I, device=dev)
    W = W[:, perm]
    H = H[perm][:, perm]
    S = scale_cols.to(dev).float()[:, perm]
    M = None if offset_cols is None else offset_cols.to(dev).float()[:, perm]
    U = _inverse_cholesky(H, damp).float()                          # (I, I) upper
    del H
    lev = levels.to(dev).float()
    mids = midpoints(lev)                                           # once, not per column
    codes = torch.empty(O, I, dtype=torch.long, device=dev)

    for b0 in range(0, I, block):
        b1 = min(b0 + block, I)
        Wb = W[:, b0:b1].clone()                                    # (O, B)
        Eb = torch.zeros_like(Wb)
        Ub = U[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            x = Wb[:, j]
            s = S[:, col]
            if M is None:                       # no "- 0.0" / "+ 0.0": two kernels fewer, same codes
                c = nearest_codes((x / s).unsqueeze(1), lev, mids).squeeze(1)
                q = lookup(lev, c.unsqueeze(1)).squeeze(1) * s
            else:
                m = M[:, col]
                c = nearest_codes(((x - m) / s).unsqueeze(1), lev, mids).squeeze(1)
                q = lookup(lev, c.unsqueeze(1)).squeeze(1) * s + m
            codes[:, col] = c
            e = (x - q) / Ub[j, j]
            Wb[:, j:] -= e.unsqueeze(1) * Ub[j, j:].unsqueeze(0)
            Eb[:, j] = e
        W[:, b1:] -= Eb @ U[b0:b1, b1:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out
