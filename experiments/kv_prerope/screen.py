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
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import qins
from experiments.kv_selfplan.screen import rotate_values
from qins.kv import _compat
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.metrics.models import default_corpus
from qins.metrics.quality import Reference, evaluate, token_windows


def prerope(cache, model):
    """Wrap cache.update: keys stored pre-RoPE, re-rotated on the way out."""
    upd, emb = cache.update, model.model.rotary_emb
    held = {}

    def update(k, v, layer_idx, *args, **kw):
        B, _, T, D = k.shape
        t0 = held.get(layer_idx, 0)
        pos = torch.arange(t0, t0 + T).expand(B, T)
        cos, sin = emb(k.float(), pos)
        kp, _ = apply_rotary_pos_emb(k.float(), k.float(), cos, -sin)
        kp = kp.to(k.dtype)
        ko, vo = upd(kp, v, layer_idx, *args, **kw)
        L = ko.shape[2]
        held[layer_idx] = L
        cos, sin = emb(ko.float(), torch.arange(L).expand(B, L))
        ko = apply_rotary_pos_emb(ko.float(), ko.float(), cos, sin)[0].to(ko.dtype)
        return ko, vo
    cache.update = update
    return cache


def load_scored(score: str, last: int, text: str | None, batch: int):
    """(model, Reference, score) of the default model on windows `score` ("a:b") of the corpus or
    of `text`, or on their `last` windows."""
    tok, model = qins.load_default_model()
    src = token_windows(tok, open(text).read() if text else default_corpus(), 512)
    if last:
        score = f"{src.shape[0] - last}:{src.shape[0]}"
    s0, s1 = (int(x) for x in score.split(":"))
    return model, Reference.build(model, src[s0:s1], batch, False), score


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
    model, ref, a.score = load_scored(a.score, a.last, a.text, a.batch)
    cfg = KVConfig(**{"k_bits": 4, "residual": 0, **json.loads(a.cfg)})
    D = _compat.kv_shape(model.config)[2]
    for var in a.variants:
        t0 = time.perf_counter()
        post = cfg.replace(k_prerope=False)
        if var == "post":
            make0 = lambda: QINSCache(model, config=post)  # noqa: E731
        elif var == "built":                     # the cache's own pre-RoPE keys (KVConfig.k_prerope)
            make0 = lambda: QINSCache(model, config=cfg.replace(k_prerope=True))  # noqa: E731
        else:                                    # "pre": this wrapper around a post-RoPE cache
            make0 = lambda: prerope(QINSCache(model, config=post), model)  # noqa: E731
        # --vrot: values rotated by a Hadamard per head on the way in, back on the way out
        make = (lambda: rotate_values(make0(), D)) if a.vrot else make0
        r = evaluate(model, ref, a.batch, False, make_cache=make, chunk=32)
        print(json.dumps(dict(variant=var, score=a.score, text=a.text, cfg=a.cfg, vrot=a.vrot,
                              ppl_inc=round(100 * (r["ppl"] / r["ppl_ref"] - 1), 3), kl=round(r["kl"], 5),
                              top1=round(r["top1"], 4), s=round(time.perf_counter() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
