"""Self-plans (key widths from the prompt's own queries, experiments/kv_selfplan) on pre-RoPE keys.

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m experiments.kv_prerope.selfplan --score 8:24

The cache's keys are pre-RoPE (KVConfig.k_prerope); the plan's key errors are measured on them and
the queries seen through an attention hook are turned back by their own positions (as
calibrate_keys does for pre-RoPE layers).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from experiments.kv_prerope.screen import load_scored
from experiments.kv_selfplan import screen as S
from qins.kv import _compat
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.metrics.quality import evaluate

SEEN: dict[int, int] = {}           # layer -> query tokens seen (their stream positions start there)
ROPES: dict = {}


def q_hook(module, q, k, v, mask, **kw):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    i = module.layer_idx
    H = k.shape[1]
    rep = q.shape[1] // H
    t0 = SEEN.get(i, 0)
    SEEN[i] = t0 + q.shape[2]
    qq = q.float()
    if i in ROPES:
        qq = ROPES[i].rotate(qq, t0, inverse=True)
    if t0 == 0:
        qq = qq[:, :, 1:]                                   # the sink token left out
    s = qq.pow(2).sum((0, 2)).double().view(H, rep, -1).sum(1)
    S.Q2[i] = S.Q2[i] + s if i in S.Q2 else s
    return sdpa_attention_forward(module, q, k, v, mask, **kw)


class PreSelfPlan(S.SelfPlanLayer):
    def _choose(self):
        keys = self.keys
        self.keys = self._pre(keys, 0)                      # no page yet: stream position 0 onwards
        try:
            super()._choose()
        finally:
            self.keys = keys


def make(model, cfg):
    c = QINSCache(model, config=cfg)
    for i, layer in enumerate(c.layers):
        layer.__class__ = PreSelfPlan
        layer.layer_idx = i
    S.Q2.clear()
    SEEN.clear()
    ROPES.clear()
    ROPES.update({i: layer.rope for i, layer in enumerate(c.layers) if layer.rope is not None})
    return c


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--score", default="8:24")
    ap.add_argument("--last", type=int, default=0)
    ap.add_argument("--text", default=None)
    ap.add_argument("--prerope", default="1")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, ref, a.score = load_scored(a.score, a.last, a.text, 4)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    AttentionMaskInterface.register("prerope_selfplan", sdpa_mask)
    S.SelfPlanLayer.mode = "q"
    for pre in a.prerope.split(","):
        cfg = KVConfig(k_bits=4, residual=0, k_prerope=pre == "1")
        t0 = time.perf_counter()
        with _compat.attention_hook(model, "prerope_selfplan", q_hook):
            r = evaluate(model, ref, 4, False, make_cache=lambda: make(model, cfg), chunk=32)
        print(json.dumps(dict(variant="self-plan q", prerope=pre == "1", score=a.score, text=a.text,
                              ppl_inc=round(100 * (r["ppl"] / r["ppl_ref"] - 1), 3), kl=round(r["kl"], 5),
                              s=round(time.perf_counter() - t0, 1))), flush=True)


if __name__ == "__main__":
    main()
