"""Pre-RoPE keys, rotated values and key plans in combination: plans calibrated on corpus windows
0..7, every variant scored on 8..23 (calibration text; never the reported windows).

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python -m experiments.kv_prerope.plan_screen pre,plan post,plan pre,vrot,plan

A variant is a comma list of: pre (KVConfig.k_prerope), vrot (KVConfig.v_rotate), plan (a key plan).
"""
import json
import sys

import torch

import qins
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.kv.plan import calibrate_keys
from qins.metrics.models import default_corpus
from qins.metrics.quality import Reference, evaluate, token_windows


def main():
    torch.set_num_threads(1)
    tok, model = qins.load_default_model()
    w = token_windows(tok, default_corpus(), 512)
    ref = Reference.build(model, w[8:24], 4, False)
    for variant in sys.argv[1:] or ["pre,plan", "post,plan"]:
        parts = set(variant.split(","))
        c = KVConfig(k_bits=4, residual=0, k_prerope="pre" in parts, v_rotate="vrot" in parts)
        plan = calibrate_keys(model, w[0:8], c, progress=False) if "plan" in parts else None
        r = evaluate(model, ref, 4, False, make_cache=lambda: QINSCache(model, config=c, key_plan=plan), chunk=32)
        print(json.dumps(dict(variant=variant, ppl_inc=round(100 * (r["ppl"] / r["ppl_ref"] - 1), 3),
                              kl=round(r["kl"], 5))), flush=True)


if __name__ == "__main__":
    main()
