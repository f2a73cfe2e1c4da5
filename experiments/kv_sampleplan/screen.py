"""Key plans calibrated on text the model writes itself (issue 12: 4 bits, residual 0, no calibration text).

A key plan (qins.kv.plan) calibrated on corpus windows took the cache from +2.04% to +1.04% on the
reported windows (with pre-RoPE keys and rotated values) and transferred to code and legal prose,
so widths look like a property of the model more than of the text. This screen asks whether the
model's own samples (temperature 1 from BOS, nothing read from disk) or uniformly random token ids
calibrate a plan as good as the corpus's. Plans on windows/samples outside the scored ones;
scored on corpus windows 8..23 (never the reported windows).

    OMP_NUM_THREADS=2 PYTHONPATH=src:. python -m experiments.kv_sampleplan.screen --sources corpus samples random
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import qins
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.kv.plan import calibrate_keys, model_samples
from qins.metrics.models import default_corpus
from qins.metrics.quality import Reference, evaluate, token_windows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sources", nargs="+", default=["corpus", "samples", "random"],
                    help="corpus|samples|random[:n=8,len=512,t=1.0,seed=0]")
    ap.add_argument("--no-none", action="store_true", help="skip the row without a plan")
    ap.add_argument("--configs", nargs="+", default=["pre,vrot", "post"])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--score", default="8:24")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--cfg", nargs="*", default=["{}"], help="extra KVConfig fields (JSON), one run per value")
    ap.add_argument("--menu", default=None, help="plan widths, e.g. 0,1,2,3,4,5,6,7,8 (default kv.plan.MENU)")
    a = ap.parse_args()
    tok, model = qins.load_default_model()
    w = token_windows(tok, default_corpus(), 512)
    s0, s1 = (int(x) for x in a.score.split(":"))
    ref = Reference.build(model, w[s0:s1], 4, False)
    cal = {}
    for src in a.sources:
        t0 = time.perf_counter()
        kind, _, opts = src.partition(":")
        o = dict(n=a.n, len=512, t=a.temperature, seed=a.seed)
        o.update({k: float(v) if k == "t" else int(v) for k, v in (x.split("=") for x in opts.split(",") if x)})
        if kind == "corpus":
            cal[src] = w[0:o["n"], :o["len"]]
        elif kind == "samples":
            cal[src] = model_samples(model, o["n"], o["len"], seed=o["seed"], temperature=o["t"], progress=False)
        elif kind == "random":
            cal[src] = torch.randint(0, model.config.vocab_size, (o["n"], o["len"]),
                                     generator=torch.Generator().manual_seed(o["seed"]))
        else:
            raise SystemExit(f"unknown source {src}")
        print(json.dumps(dict(source=src, seconds=round(time.perf_counter() - t0, 1))), flush=True)
    menu = {} if a.menu is None else dict(menu=tuple(int(x) for x in a.menu.split(",")))
    for conf in a.configs:
        parts = set(conf.split(","))
        for extra in a.cfg:
            c = KVConfig(**{"k_bits": 4, "residual": 0, "k_prerope": "pre" in parts, "v_rotate": "vrot" in parts,
                            **json.loads(extra)})
            for src in ([] if a.no_none else ["none"]) + a.sources:
                t0 = time.perf_counter()
                plan = None if src == "none" else calibrate_keys(model, cal[src], c, progress=False, **menu)
                r = evaluate(model, ref, 4, False, make_cache=lambda: QINSCache(model, config=c, key_plan=plan),
                             chunk=32)
                print(json.dumps(dict(config=conf, extra=json.loads(extra), menu=a.menu, plan=src,
                                      ppl_inc=round(100 * (r["ppl"] / r["ppl_ref"] - 1), 3), kl=round(r["kl"], 5),
                                      seconds=round(time.perf_counter() - t0))), flush=True)


if __name__ == "__main__":
    main()
