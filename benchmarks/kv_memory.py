"""KV bytes and CPU decode-step latency against context length, QINSCache vs transformers' caches.

    OMP_NUM_THREADS=1 python benchmarks/kv_memory.py --contexts 1024 4096 8192 [--steps 3]

Every cache is filled by calling its `update` directly with random K/V of the default
model's shape (30 layers, 3 KV heads of 64): bytes and latency do not depend on the values,
and a 32k prefill on a CPU would take far longer than the measurement. Then `--steps`
decode steps of the model (one token, batch 1, float32) run on the filled cache; the
median step time is reported. Rows:

    dynamic-fp32     DynamicCache holding float32 (the model's dtype): the latency baseline
    dynamic-fp16     DynamicCache holding float16 (bytes only: a CPU fp16 model is not timed)
    hqq-Nb           QuantizedCache(backend="hqq", nbits=N), residual_length 128 (if hqq imports)
    qins-Nb-rR       QINSCache(bits=N, residual=R)

kv_bytes: bytes held by the cache's tensors (codes, scales, offsets, fp regions, page slack;
for HQQ its packed tensors and metadata). rss_delta: growth of the process RSS while the
cache was filled (approximate; the allocator may keep freed blocks). Latency ratios are
meaningful within one run only (CPU shared with other work). Writes
benchmarks/results/kv_memory.csv and kv_memory.png.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor reachable from obj (lists, tuples, dicts, attributes)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.untyped_storage().nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return obj.untyped_storage().nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return sum(tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


def make_caches(model, bits_list, residuals, hqq: bool):
    from transformers import DynamicCache, QuantizedCache

    from qins import QINSCache
    out = [("dynamic-fp32", lambda: DynamicCache(config=model.config), torch.float32, True),
           ("dynamic-fp16", lambda: DynamicCache(config=model.config), torch.float16, False)]
    if hqq:
        for b in (8, 4, 2):
            out.append((f"hqq-{b}b", lambda b=b: QuantizedCache("hqq", model.config, nbits=b, residual_length=128),
                        torch.float32, True))
    for r in residuals:
        for b in bits_list:
            out.append((f"qins-{b}b-r{r}", lambda b=b, r=r: QINSCache(model, bits=b, residual=r), torch.float32, True))
    return out


def fill(cache, layers, heads, head_dim, context, dtype, chunk=512):
    g = torch.Generator().manual_seed(0)
    for t in range(0, context, chunk):
        n = min(chunk, context - t)
        for i in range(layers):
            k = torch.randn(1, heads, n, head_dim, generator=g).to(dtype)
            v = torch.randn(1, heads, n, head_dim, generator=g).to(dtype)
            cache.update(k, v, i)


def cache_bytes(cache) -> int:
    return cache.nbytes() if hasattr(cache, "nbytes") else tensor_bytes(cache.layers)


def decode_steps(model, cache, context, steps):
    times = []
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        for s in range(steps + 1):
            pos = torch.tensor([[context + s]])
            t0 = time.perf_counter()
            model(input_ids=ids, cache=cache, position_ids=pos, use_cache=True)
            times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])                      # first step: warm-up


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 4096, 8192, 32768])
    ap.add_argument("--bits", nargs="+", type=int, default=[8, 6, 4, 3, 2])
    ap.add_argument("--residuals", nargs="+", type=int, default=[0, 128])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--no-hqq", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "kv_memory.csv"))
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import qins
    from qins.kv._compat import kv_shape
    tok, model = qins.load_default_model()
    layers, heads, head_dim = kv_shape(model.config)
    try:
        import hqq  # noqa: F401
        have_hqq = not a.no_hqq
    except ImportError:
        have_hqq = False
        print("hqq not installed: QuantizedCache(hqq) rows skipped")

    rows = []
    meta = dict(date=datetime.date.today().isoformat(), machine=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), command="python benchmarks/kv_memory.py " +
                " ".join(f"--contexts {' '.join(map(str, a.contexts))}".split()))
    for ctx in a.contexts:
        for name, make, dtype, timed in make_caches(model, a.bits, a.residuals, have_hqq):
            gc.collect()
            r0 = rss()
            cache = make()
            fill(cache, layers, heads, head_dim, ctx, dtype)
            gc.collect()
            r1 = rss()
            nb = cache_bytes(cache)
            elems = 2 * layers * heads * head_dim * ctx
            lat = decode_steps(model, cache, ctx, a.steps) if timed and not a.no_latency else float("nan")
            row = dict(context=ctx, cache=name, kv_bytes=nb, bits_per_element=8 * nb / elems,
                       rss_delta=r1 - r0, decode_step_ms=1000 * lat)
            rows.append(row)
            print(row, flush=True)
            del cache
    base = {(r["context"]): r for r in rows if r["cache"] == "dynamic-fp32"}
    b16 = {(r["context"]): r for r in rows if r["cache"] == "dynamic-fp16"}
    for r in rows:
        r["x_smaller_than_fp16"] = b16[r["context"]]["kv_bytes"] / r["kv_bytes"]
        r["latency_vs_dynamic_fp32"] = r["decode_step_ms"] / base[r["context"]]["decode_step_ms"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as f:
        f.write(f"# {meta}\n")
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {out}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        for name in dict.fromkeys(r["cache"] for r in rows):
            rs = [r for r in rows if r["cache"] == name]
            ax1.plot([r["context"] for r in rs], [r["kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
            if any(r["decode_step_ms"] == r["decode_step_ms"] for r in rs):
                ax2.plot([r["context"] for r in rs], [r["decode_step_ms"] for r in rs], marker="o", label=name)
        for ax, yl in ((ax1, "KV MiB held"), (ax2, "decode step, ms (CPU, 1 thread)")):
            ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xlabel("context tokens"), ax.set_ylabel(yl)
        ax1.legend(fontsize=7)
        fig.suptitle(f"SmolLM2-135M KV cache, {meta['date']}")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
