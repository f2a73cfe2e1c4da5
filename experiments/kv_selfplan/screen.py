"""Screen self-calibrated key plans (widths chosen from the prompt's own keys) on calibration windows.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m experiments.kv_selfplan.screen --modes uniform offline ones wq q

Windows: the default corpus's windows 4..7 are scored (calibration region, never the reported
windows); the offline key plan ("offline") is calibrated on windows 0..3, disjoint from them.
A self-plan layer chooses its per-channel key widths from the keys it holds when its first group
is sealed (or, with --when first, at its first append), at the same bits per element, with
cost(h, d, w) = weight(h, d) x the prompt's key error at width w:
  ones   weight 1 (keys only)
  wq     weight from the weights: sum over the query heads reading h of ||W_q[d] * g||^2, RoPE pair averaged
  k2     weight E[k_d^2] of the prompt's keys
  q      E[q_d^2] of the prompt's own queries seen so far (an attention hook; the upper bound)
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import qins
from qins.kv import _compat
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.kv.layer import QINSLayer
from qins.kv.layout import RowLayout
from qins.kv.plan import MENU, _grid_error, allocate_widths, calibrate_keys
from qins.metrics.models import default_corpus
from qins.metrics.quality import Reference, evaluate, token_windows

Q2: dict[int, torch.Tensor] = {}          # layer -> (H, D) sum of q^2 of the current cache's prompt


def install_qhooks(model):
    """Pre-hooks on every self_attn: the chunk's queries after RoPE, summed q^2 into Q2 (all rows,
    the first token of the stream left out as a sink)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    hs = []
    for i, layer in enumerate(model.model.layers):
        att = layer.self_attn

        def pre(mod, args, kwargs, i=i):
            x = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            D = mod.head_dim
            q = mod.q_proj(x).view(*x.shape[:-1], -1, D).transpose(1, 2)
            q, _ = apply_rotary_pos_emb(q, q, cos, sin)
            H = mod.config.num_key_value_heads
            s = q.float().pow(2).sum((0, 2)).double().view(H, -1, D).sum(1)
            Q2[i] = Q2[i] + s if i in Q2 else s
        hs.append(att.register_forward_pre_hook(pre, with_kwargs=True))
    return hs


def weight_proxy(model) -> dict[int, torch.Tensor]:
    _, H, D = _compat.kv_shape(model.config)
    out = {}
    for i, layer in enumerate(model.model.layers):
        W = layer.self_attn.q_proj.weight.float() * layer.input_layernorm.weight.float().view(1, -1)
        e = W.pow(2).sum(1).view(-1, D)                              # (n_q_heads, D)
        e = 0.5 * (e + torch.cat([e[:, D // 2:], e[:, :D // 2]], 1))  # RoPE rotates pairs (d, d + D/2)
        out[i] = e.view(H, -1, D).sum(1).double()
    return out


class SelfPlanLayer(QINSLayer):
    mode = "ones"
    menu = MENU
    when = "seal"
    proxy: dict = {}

    def _choose(self):
        S = min(self.sink_k.shape[2], self.keys.shape[2] - 1)
        k = self.keys[:, :, S:]
        n = k.shape[2]
        G = self.group if n >= self.group else n
        k = k[:, :, : n // G * G].float()
        B, H, T, D = k.shape
        menu = self.menu
        err = torch.stack([_grid_error(k, w, G) for w in menu], 2)  # (H, D, M)
        if self.mode == "ones":
            wt = torch.ones(H, D, dtype=torch.float64)
        elif self.mode == "k2":
            wt = k.pow(2).sum((0, 2)).double()
        elif self.mode == "wq":
            wt = self.proxy[self.layer_idx]
        elif self.mode in ("q", "qhook"):
            wt = Q2.get(self.layer_idx)
            if wt is None:
                wt = torch.ones(H, D, dtype=torch.float64)
        cost = wt.unsqueeze(2) * err
        kb = self.k_codec.bits
        widths = [allocate_widths(cost[h], kb, menu) for h in range(H)]
        planned = sum(float(cost[h, d, menu.index(w)]) for h in range(H) for d, w in enumerate(widths[h]))
        uniform = float(cost[:, :, menu.index(kb)].sum())
        if planned >= uniform:
            return
        w = torch.tensor(widths, dtype=torch.int64)
        lay = RowLayout.mixed(w)
        assert lay.n_words == self.k_layout.n_words, (lay.n_words, self.k_layout.n_words)
        self.k_widths, self._k_widths, self.k_layout = w, w.to(self.device), lay.to(self.device)

    def _seal_ready_groups(self):
        if self.k_widths is None and not getattr(self, "_chosen", False) and self.n_quantized == 0:
            ready = self.keys.shape[2] - self.residual >= self.group if self.when == "seal" else self.keys.shape[2] >= 2
            if ready:
                self._chosen = True
                self._choose()
        super()._seal_ready_groups()


def make_selfplan_cache(model, config):
    c = QINSCache(model, config=config)
    for i, layer in enumerate(c.layers):
        if isinstance(layer, QINSLayer):
            layer.__class__ = SelfPlanLayer
            layer.layer_idx = i
    Q2.clear()
    return c


def q_hook(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    i = module.layer_idx
    H = k.shape[1]
    rep = q.shape[1] // H
    s = q[:, :, 1:].float().pow(2).sum((0, 2)).double().view(H, rep, -1).sum(1)
    Q2[i] = Q2[i] + s if i in Q2 else s
    return sdpa_attention_forward(module, q, k, v, mask, **kw)


def hadamard(D: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / D ** 0.5


def rotate_values(cache, D):
    """Values enter the cache rotated by a per-head Hadamard (v @ R) and leave un-rotated (@ R^T)."""
    R = hadamard(D)
    upd = cache.update

    def update(k, v, layer_idx, *args, **kw):
        ko, vo = upd(k, (v.float() @ R).to(v.dtype), layer_idx, *args, **kw)
        return ko, (vo.float() @ R.T).to(vo.dtype)
    cache.update = update
    return cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["uniform", "offline", "ones", "wq", "q"])
    ap.add_argument("--when", default="seal", choices=["seal", "first"])
    ap.add_argument("--score", default="4:8", help="corpus windows scored, a:b")
    ap.add_argument("--calib", default="0:4", help="corpus windows the offline key plan is calibrated on")
    ap.add_argument("--menu", default=None, help="key widths on the menu, e.g. 0,1,2,3,4,5,6,7,8")
    ap.add_argument("--last", type=int, default=0, help="score the last N windows instead of --score")
    ap.add_argument("--text", default=None, help="another text: score its windows --score instead")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--vrot", action="store_true", help="values rotated by a Hadamard per head")
    ap.add_argument("--cfg", default="{}", help="more KVConfig fields, JSON")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok, model = qins.load_default_model()
    allw = token_windows(tok, default_corpus(), 512)
    a0, a1 = (int(x) for x in a.score.split(":"))
    src = token_windows(tok, open(a.text).read(), 512) if a.text else allw
    score = src[src.shape[0] - a.last:] if a.last else src[a0:a1]
    if a.last:
        a.score = f"{src.shape[0] - a.last}:{src.shape[0]}"
    ref = Reference.build(model, score, a.batch, False)
    cfg = KVConfig(**{"k_bits": a.bits, "residual": 0, **json.loads(a.cfg)})
    SelfPlanLayer.when = a.when
    menu = tuple(int(x) for x in a.menu.split(",")) if a.menu else MENU
    SelfPlanLayer.menu = menu
    SelfPlanLayer.proxy = weight_proxy(model)
    for mode in a.modes:
        t0 = time.perf_counter()
        if mode == "uniform":
            make = lambda: QINSCache(model, config=cfg)  # noqa: E731
        elif mode == "offline":
            c0, c1 = (int(x) for x in a.calib.split(":"))
            plan = calibrate_keys(model, allw[c0:c1], cfg, menu=menu, progress=False)
            make = lambda: QINSCache(model, config=cfg, key_plan=plan)  # noqa: E731
        else:
            SelfPlanLayer.mode = mode
            make = lambda: make_selfplan_cache(model, cfg)  # noqa: E731
        if a.vrot:
            make0, D = make, _compat.kv_shape(model.config)[2]
            make = lambda: rotate_values(make0(), D)  # noqa: E731
        if mode == "qhook":
            hs = install_qhooks(model)
            r = evaluate(model, ref, a.batch, False, make_cache=make, chunk=32)
            for hh in hs:
                hh.remove()
        elif mode == "q":
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
            AttentionMaskInterface.register("selfplan_q", sdpa_mask)
            with _compat.attention_hook(model, "selfplan_q", q_hook):
                r = evaluate(model, ref, a.batch, False, make_cache=make, chunk=32)
        else:
            r = evaluate(model, ref, a.batch, False, make_cache=make, chunk=32)
        inc = 100 * (r["ppl"] / r["ppl_ref"] - 1)
        print(json.dumps(dict(mode=mode, when=a.when, score=a.score, text=a.text, batch=a.batch, bits=a.bits,
                              calib=a.calib if mode == "offline" else None, menu=a.menu, cfg=a.cfg, vrot=a.vrot, ppl_inc=round(inc, 3), kl=round(r["kl"], 5), top1=round(r["top1"], 4),
                              s=round(time.perf_counter() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
