"""Screen an MSE clip search for QINSCache's group ranges (issue 12, 4 bits at residual 0).

The cache takes each group's full range (keys: min..max per channel over 128 tokens; values: the
signed extreme per token). A range shrunk by rho (codes clamp at the ends) trades the outliers'
error for a finer step elsewhere; per group the rho with the least squared error is kept. Only
appending would change (the search runs once per group); reading is the same.

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m experiments.kv_clip.screen --score 4:8 --which none k v kv
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import qins
from qins.kv import codec as C
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.metrics.models import default_corpus
from qins.metrics.quality import Reference, evaluate, token_windows

RHOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
_orig_params = C.Codec.params
WHICH = {"k": False, "v": False}


def clipped_params(self, x, dim):
    s, m = _orig_params(self, x, dim)
    key = self.zero_point                       # the cache's keys carry zero points below 8 bits; values do not
    if not WHICH["k" if key else "v"]:
        return s, m
    best, best_err = s, None
    for rho in RHOS:
        sr = (s.float() * rho).to(torch.float16)
        sr = torch.where(sr == 0, s, sr)
        err = (self.decode(self.encode(x, sr, m), sr, m, torch.float32) - x.float()).pow(2).sum(dim, keepdim=True)
        if best_err is None:
            best, best_err = sr, err
        else:
            take = err < best_err
            best = torch.where(take, sr, best)
            best_err = torch.where(take, err, best_err)
    return best, m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--score", default="4:8")
    ap.add_argument("--which", nargs="+", default=["none", "k", "v", "kv"])
    ap.add_argument("--cfg", default="{}")
    a = ap.parse_args()
    torch.set_num_threads(1)
    tok, model = qins.load_default_model()
    src = token_windows(tok, default_corpus(), 512)
    s0, s1 = (int(x) for x in a.score.split(":"))
    ref = Reference.build(model, src[s0:s1], 4, False)
    cfg = KVConfig(**{"k_bits": 4, "residual": 0, **json.loads(a.cfg)})
    C.Codec.params = clipped_params
    for which in a.which:
        WHICH.update(k="k" in which, v="v" in which)
        t0 = time.perf_counter()
        r = evaluate(model, ref, 4, False, make_cache=lambda: QINSCache(model, config=cfg), chunk=32)
        print(json.dumps(dict(which=which, score=a.score, cfg=a.cfg, ppl_inc=round(100 * (r["ppl"] / r["ppl_ref"] - 1), 3),
                              kl=round(r["kl"], 5), s=round(time.perf_counter() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
