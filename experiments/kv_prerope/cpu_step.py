"""What pre-RoPE keys, rotated values and key plans cost a CPU decode step (the reference path
turns every decoded key; rotated values are read in their frame, the attention output turned back).

    OMP_NUM_THREADS=1 PYTHONPATH=src:benchmarks python -m experiments.kv_prerope.cpu_step --context 4096

The default model, a 4-bit QINSCache at residual 0 filled with random K/V as benchmarks/kv_memory.py
fills it; decode steps timed with its `decode_step_ms` (median of steps), the settings (keys as
given / pre-RoPE, values as given / rotated, read in the rotated frame or turned back one by one,
key plans) interleaved, best of `--repeats` rounds each.
"""
from __future__ import annotations

import argparse
import json

import torch

import qins
from kv_memory import decode_step_ms, fill
from qins.kv import KVConfig, _compat
from qins.kv.plan import calibrate_keys
from qins.metrics.quality import token_windows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    tok, model = qins.load_default_model()
    shape = _compat.kv_shape(model.config)
    best: dict[str, float] = {}
    # rotated values: the cache built on the model reads them in the rotated frame and turns the
    # attention output back (kv/attention.py); "turn every value" is the route that decodes every
    # cached value back to the model's frame (paged=False, also any model not on SDPA)
    settings = {"plain": {}, "prerope": dict(k_prerope=True), "vrot": dict(v_rotate=True),
                "prerope+vrot": dict(k_prerope=True, v_rotate=True),
                "vrot, turn every value": dict(v_rotate=True, paged=False),
                "prerope+vrot, turn every value": dict(k_prerope=True, v_rotate=True, paged=False),
                "plan": dict(plan="post"), "prerope+vrot+plan": dict(k_prerope=True, v_rotate=True, plan="pre")}
    # key plans (per-channel widths: the reference reads them with a byte gather), calibrated on the
    # corpus's first 4 windows for the keys as each setting keeps them
    windows = token_windows(tok, qins.default_corpus(), 512, max_windows=4)
    plans = {name: calibrate_keys(model, windows, KVConfig(k_bits=4, residual=0, k_prerope=name == "pre"),
                                  progress=False) for name in ("post", "pre")}
    for _ in range(a.repeats):
        for name, fields in settings.items():
            fields = dict(fields)
            plan = plans[fields.pop("plan")] if "plan" in fields else None
            cache = qins.QINSCache(model, bits=4, residual=0, key_plan=plan, **fields)
            fill(cache, shape, a.context, torch.float32)
            ms = decode_step_ms(model, cache, a.context, a.steps)
            best[name] = min(best.get(name, float("inf")), ms)
    print(json.dumps(dict(context=a.context, threads=torch.get_num_threads(),
                          ms={k: round(v, 2) for k, v in best.items()},
                          x_plain={k: round(v / best["plain"], 3) for k, v in best.items()})))


if __name__ == "__main__":
    main()
