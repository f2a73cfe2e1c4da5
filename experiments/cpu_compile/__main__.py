"""Does torch.compile remove the per-token overhead of transformers' forward on the CPU?

    python -m experiments.cpu_compile [--tokens 64]

The bf16 default model (saved by `benchmarks/cpu_speed.py`'s preparation, or built here),
2 torch threads, greedy generation of --tokens new tokens after a 16-token prompt: eager with
the dynamic cache, eager with the static cache, then `model.forward = torch.compile(...)` with
the static cache (the first call includes the compile), two timed calls. One run each: the
2 cores drift by tens of percent between minutes, so read the ratios, not the rates.
"""
from __future__ import annotations

import argparse
import time

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args(argv)
    from qins.metrics.models import load_model
    torch.set_num_threads(2)
    tok, model = load_model(None, dtype="bfloat16")
    model.eval()
    ids = tok("The quick brown fox jumps over the lazy dog and then some more words here",
              return_tensors="pt").input_ids[:, :16]

    def gen(**kw):
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=a.tokens,
                              min_new_tokens=a.tokens, do_sample=False, pad_token_id=tok.eos_token_id, **kw)

    def rate(**kw) -> float:
        t = time.perf_counter()
        gen(**kw)
        return a.tokens / (time.perf_counter() - t)

    with torch.inference_mode():
        gen()
        print(f"eager, dynamic cache: {rate():.1f} tok/s", flush=True)
        gen(cache_implementation="static")
        print(f"eager, static cache: {rate(cache_implementation='static'):.1f} tok/s", flush=True)
        model.forward = torch.compile(model.forward, dynamic=False)
        t = time.perf_counter()
        gen(cache_implementation="static")
        print(f"torch.compile, first call (compiles): {time.perf_counter() - t:.1f} s", flush=True)
        for _ in range(2):
            print(f"torch.compile, static cache: {rate(cache_implementation='static'):.1f} tok/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
