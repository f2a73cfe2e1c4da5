"""Screen pre-RoPE key quantization for QINSCache (issue 12: 4 bits, residual 0, no calibration text).

Keys enter the cache with RoPE undone (rotated back by their position's angle) and leave with it
applied again, so the cache's per-channel key scales see pre-RoPE channels, whose range does not
swing with position (KVQuant's observation). Rotations are exact up to float rounding; nothing is
stored, so bits per element are unchanged.

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m experiments.kv_prerope.screen --variants post pre built

Variants: post = the cache with k_prerope=False; pre = this module's wrapper around that cache;
built = the cache's own pre-RoPE keys (KVConfig.k_prerope=True, kv/rope.py).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import qins
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.metrics.models import default_corpus
from qins.metrics.quality import Reference, evaluate, token_windows


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), -1)


def rope(x, cos, sin):
    """x (B, H, T, D) rotated by cos/sin (B, T, D), the rotate-half convention."""
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * c + rotate_half(x) * s


def prerope(cache, model, vrot: torch.Tensor | None = None):
    """Wrap cache.update: keys stored pre-RoPE, re-rotated on the way out; values optionally @ vrot."""
    upd, emb = cache.update, model.model.rotary_emb
    held = {}

    def update(k, v, layer_idx, *args, **kw):
        B, _, T, D = k.shape
        t0 = held.get(layer_idx, 0)
        pos = torch.arange(t0, t0 + T).expand(B, T)
        cos, sin = emb(k.float(), pos)
        kp = rope(k.float(), cos, -sin).to(k.dtype)
        if vrot is not None:
            v = (v.float() @ vrot).to(v.dtype)
        ko, vo = upd(kp, v, layer_idx, *args, **kw)
        L = ko.shape[2]
        held[layer_idx] = L
        cos, sin = emb(ko.float(), torch.arange(L).expand(B, L))
        ko = rope(ko.float(), cos, sin).to(ko.dtype)
        if vrot is not None:
            vo = (vo.float() @ vrot.T).to(vo.dtype)
        return ko, vo
    cache.update = update
    return cache


def hadamard(D: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < D:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / D ** 0.5


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["post", "pre"])
    ap.add_argument("--score", default="4:8")
    ap.add_argument("--last", type=int, default=0)
    ap.add_argument("--text", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--cfg", default="{}", help="KVConfig fields, JSON (k_bits 4, residual 0 by default)")
    ap.add_argument("--vrot", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok, model = qins.load_default_model()
    src = token_windows(tok, open(a.text).read() if a.text else default_corpus(), 512)
    if a.last:
        a.score = f"{src.shape[0] - a.last}:{src.shape[0]}"
    s0, s1 = (int(x) for x in a.score.split(":"))
    ref = Reference.build(model, src[s0:s1], a.batch, False)
    cfg = KVConfig(**{"k_bits": 4, "residual": 0, **json.loads(a.cfg)})
    D = model.config.hidden_size // model.config.num_attention_heads
    R = hadamard(D) if a.vrot else None
    for var in a.variants:
        t0 = time.perf_counter()
        post = cfg.replace(k_prerope=False)
        if var == "post":
            make = (lambda: prerope_values_only(QINSCache(model, config=post), R)) if R is not None else \
                (lambda: QINSCache(model, config=post))
        elif var == "built":                     # the cache's own pre-RoPE keys (KVConfig.k_prerope)
            make = (lambda: prerope_values_only(QINSCache(model, config=cfg.replace(k_prerope=True)), R)) \
                if R is not None else (lambda: QINSCache(model, config=cfg.replace(k_prerope=True)))
        else:                                    # "pre": this wrapper around a post-RoPE cache
            make = lambda: prerope(QINSCache(model, config=post), model, R)  # noqa: E731
        r = evaluate(model, ref, a.batch, False, make_cache=make, chunk=32)
        print(json.dumps(dict(variant=var, score=a.score, text=a.text, cfg=a.cfg, vrot=a.vrot,
                              ppl_inc=round(100 * (r["ppl"] / r["ppl_ref"] - 1), 3), kl=round(r["kl"], 5),
                              top1=round(r["top1"], 4), s=round(time.perf_counter() - t0, 1))), flush=True)


def prerope_values_only(cache, R):
    upd = cache.update

    def update(k, v, layer_idx, *args, **kw):
        ko, vo = upd(k, (v.float() @ R).to(v.dtype), layer_idx, *args, **kw)
        return ko, (vo.float() @ R.T).to(vo.dtype)
    cache.update = update
    return cache


if __name__ == "__main__":
    main()
