"""Pre-RoPE keys: the cache quantizes keys with the model's rotary embedding undone.

Why. A cache receives keys after RoPE, which turns channel pair (d, d + R/2) of token t by the
angle t * f_d. Keys are quantized per channel over a group of tokens, so a pair that turns
quickly swings each of its channels through the pair's whole amplitude within a group, and
the group's range (hence its step) covers it. Before RoPE a channel's range follows the text
only (KVQuant's observation). Measured on the default model, 4-bit keys and values, residual 0,
corpus windows 8..23 (calibration text, experiments/kv_prerope): +2.47% -> +1.62% perplexity,
KL 0.0222 -> 0.0163, at the same bits per element (nothing is stored: the angles come from
the position).

How. A key sealed at stream position t is turned back by -t * f (its pre-RoPE value when the
model's position of that token is t; any other position only costs quality, never
correctness, since the same angle is applied again when the key is read back), quantized,
and decoded keys are turned by +t * f. The angles are float32 t * f_d, as transformers
computes them; the frequencies are the model's own (`_compat.rope_frequencies`).
"""
from __future__ import annotations

import torch

from . import _compat
from .config import KVConfig


class Rope:
    """Rotations by stream position with frequencies f (R/2,) over the first R channels of a
    head (R <= D: partial rotary leaves the rest), transformers' rotate-half pairing (d, d + R/2).

    cos/sin tables (T, R/2) float32 are kept per device and grown by doubling; one Rope is
    shared by the layers that use the same frequencies."""

    def __init__(self, inv_freq: torch.Tensor):
        f = torch.as_tensor(inv_freq).detach().float().flatten().cpu()
        if f.numel() == 0 or not torch.isfinite(f).all():
            raise ValueError(f"rotary frequencies must be a non-empty finite vector, got {f.numel()} values")
        self.inv_freq = f
        self.dims = 2 * f.numel()
        self._tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._freqs: dict[str, torch.Tensor] = {"cpu": f}

    def __repr__(self):
        return f"Rope({self.dims} rotary channels)"

    def same(self, other: "Rope | None") -> bool:
        return other is not None and torch.equal(self.inv_freq, other.inv_freq)

    def freqs(self, device) -> torch.Tensor:
        """(R/2,) float32 frequencies on `device` (copied once per device, as the kernels read them)."""
        key = str(torch.device(device))
        if key not in self._freqs:
            self._freqs[key] = self.inv_freq.to(device)
        return self._freqs[key]

    def cos_sin(self, t0: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, R/2) float32 cos and sin of positions t0 .. t0 + n - 1."""
        device = torch.device(device)
        key = str(device)
        tab = self._tables.get(key)
        if tab is None or tab[0].shape[0] < t0 + n:
            T = max(t0 + n, 256, 2 * (0 if tab is None else tab[0].shape[0]))
            ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * self.freqs(device)[None, :]
            tab = (ang.cos(), ang.sin())
            self._tables[key] = tab
        return tab[0][t0:t0 + n], tab[1][t0:t0 + n]

    def rotate(self, x: torch.Tensor, t0: int, inverse: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """x (..., n, D) with D >= R, tokens at positions t0 .. t0 + n - 1 -> x turned by +t * f
        (inverse: -t * f), in float32, or written into `out` (x's shape, not overlapping x; a
        float32 `out` is written in place, another dtype through a float32 copy)."""
        D, n = x.shape[-1], x.shape[-2]
        if D < self.dims:
            raise ValueError(f"{self.dims} rotary channels do not fit a head of dim {D}")
        if out is not None and out.dtype != torch.float32:
            out.copy_(self.rotate(x, t0, inverse))
            return out
        c, s = self.cos_sin(t0, n, x.device)
        if inverse:
            s = -s
        h = self.dims // 2
        x = x.float()
        a, b = x[..., :h], x[..., h:self.dims]
        out = torch.empty_like(x) if out is None else out
        oa, ob = out[..., :h], out[..., h:self.dims]
        torch.mul(a, c, out=oa).addcmul_(b, s, value=-1.0)             # a cos - b sin
        torch.mul(b, c, out=ob).addcmul_(a, s)                         # b cos + a sin
        if self.dims < D:
            out[..., self.dims:] = x[..., self.dims:]
        return out


def model_ropes(model, types: list[str], head_dim: int, cfg: KVConfig) -> dict[int, Rope]:
    """{layer: Rope} for the full-attention layers whose keys `cfg` keeps pre-RoPE, from the
    model's rotary frequencies (one Rope per distinct set, shared). Layers whose rotary
    channels do not fit the head, and every layer of a model without RoPE, get none (keys as
    given); `k_prerope=True` set explicitly on a model without RoPE is an error."""
    want = [i for i, t in enumerate(types) if t == "full_attention" and cfg.prerope_for(cfg.bits_for(i)[0])]
    if not want:
        return {}
    freqs = _compat.rope_frequencies(model, types)
    if not freqs and cfg.k_prerope:
        raise ValueError("k_prerope=True: no rotary embedding found in this model (a module named "
                         "'...rotary_emb' with inv_freq, or rope_theta in its config)")
    out: dict[int, Rope] = {}
    for i in want:
        f = freqs.get(i)
        if f is None or 2 * f.numel() > head_dim:
            continue
        out[i] = next((r for r in out.values() if torch.equal(r.inv_freq, f.float())), None) or Rope(f)
    return out
