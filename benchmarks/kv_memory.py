"""KV bytes, process memory and CPU decode-step latency against context length: QINSCache at
every width vs DynamicCache (fp32, fp16) and transformers' QuantizedCache (HQQ backend).

    OMP_NUM_THREADS=1 python benchmarks/kv_memory.py                      # everything below
    OMP_NUM_THREADS=1 python benchmarks/kv_memory.py --contexts 1024 4096 --latency-contexts 4096

Three measurements, all on the default model's K/V shape (30 layers, 3 KV heads of 64):

1. kv_bytes at every context (1k..32k): each cache is filled by calling its `update` with
   random K/V (bytes do not depend on the values; a 32k CPU prefill would take far longer than
   the measurement), 4096 tokens per call, batch 1. QINSCache reports `nbytes()` (codes,
   scales, zero points, offsets, sink copies, fp regions, page slack); the others the bytes
   of every tensor storage they hold. bits_per_element = 8 kv_bytes / (K and V elements).
2. rss at --rss-context (8k): a fresh subprocess per cache imports torch, records its RSS,
   builds and fills the cache, frees the fill's temporaries (gc + malloc_trim) and records
   its RSS again; rss_delta is the growth (process memory held by the cache).
3. decode_step_ms at --latency-contexts (4k): the model (float32, 1 thread, batch 1) runs
   one-token decode steps on each filled cache; the median of --steps steps, best of
   --repeats rounds (the rounds interleave the caches, so a busy CPU slows all alike).
   QINSCache runs its reference path (decode pages, then SDPA). Ratios are meaningful within
   one run only.

Caches: dynamic-fp32 (the model's dtype: the latency baseline), dynamic-fp16 (the memory
baseline; not timed: a float32 model does not run on fp16 K/V), hqq-Nb =
QuantizedCache("hqq", nbits=N, residual_length=128) when hqq imports (bytes up to
--hqq-max-context), qins-Nb =
QINSCache(bits=N, residual=0) (defaults otherwise: one sink token, 32 KiB pages), qins-4b-plan =
the same at 4 bits with a key plan calibrated on the corpus's first 8 windows (saved beside
the CSV as kv_memory_key_plan.json).
Writes benchmarks/results/kv_memory.csv, kv_memory.md and kv_memory.png.
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"
QINS_BITS = (8, 6, 5, 4, 3, 2)
HQQ_BITS = (8, 4, 2)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)          # give freed heap pages back to the OS
    except OSError:
        pass


def cache_names(have_hqq: bool) -> list[str]:
    names = ["dynamic-fp32", "dynamic-fp16"]
    if have_hqq:
        names += [f"hqq-{b}b" for b in HQQ_BITS]
    return names + [f"qins-{b}b" for b in QINS_BITS] + ["qins-4b-plan"]


def make_cache(name: str, config):
    """(cache, dtype of the K/V it is filled with)."""
    from transformers import DynamicCache, QuantizedCache

    from qins import QINSCache
    if name.startswith("dynamic"):
        return DynamicCache(config=config), torch.float16 if name.endswith("fp16") else torch.float32
    bits = int(name.split("-")[1][:-1])
    if name.startswith("hqq"):
        return QuantizedCache("hqq", config, nbits=bits, residual_length=128), torch.float32
    plan = None
    if name.endswith("-plan"):
        from qins.kv import KeyPlan
        plan = KeyPlan.load(os.environ["QINS_KEY_PLAN"])
    return QINSCache(config, bits=bits, residual=0, key_plan=plan), torch.float32


def fill(cache, shape, context, dtype, chunk=4096):
    layers, heads, head_dim = shape
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for t in range(0, context, chunk):
            n = min(chunk, context - t)
            for i in range(layers):
                k = torch.randn(1, heads, n, head_dim, generator=g).to(dtype)
                v = torch.randn(1, heads, n, head_dim, generator=g).to(dtype)
                cache.update(k, v, i)


def kv_bytes(cache) -> int:
    from qins.metrics.memory import cache_nbytes
    return cache_nbytes(cache)


def rss_child(name: str, context: int, config_json: str) -> None:
    """Subprocess body: print {rss_before, rss_after, kv_bytes} for one filled cache."""
    from transformers import LlamaConfig

    from qins.kv._compat import kv_shape
    torch.set_num_threads(1)
    config = LlamaConfig.from_dict(json.loads(config_json))
    warm, _ = make_cache(name, config)                   # import and first-call costs outside the delta
    fill(warm, kv_shape(config), 256, torch.float32)
    del warm
    trim()
    before = rss()
    cache, dtype = make_cache(name, config)
    fill(cache, kv_shape(config), context, dtype)
    trim()
    print(json.dumps({"rss_before": before, "rss_after": rss(), "kv_bytes": kv_bytes(cache)}))


def decode_step_ms(model, cache, context, steps) -> float:
    times = []
    ids = torch.tensor([[1]])
    with torch.inference_mode():
        for s in range(steps + 1):
            pos = torch.tensor([[context + s]])
            t0 = time.perf_counter()
            model(input_ids=ids, cache=cache, position_ids=pos, use_cache=True)
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[1:])            # first step: warm-up


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--latency-contexts", nargs="*", type=int, default=[4096])
    ap.add_argument("--rss-context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-hqq", action="store_true")
    ap.add_argument("--hqq-max-context", type=int, default=8192,
                    help="skip QuantizedCache(hqq) above this context (its CPU fill re-quantizes the whole "
                         "history with HQQ's iterative optimizer at every update: minutes per row at 16k+)")
    ap.add_argument("--out", default=str(RESULTS / "kv_memory.csv"))
    ap.add_argument("--rss-child", nargs=3, metavar=("NAME", "CONTEXT", "CONFIG_JSON"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        return rss_child(a.rss_child[0], int(a.rss_child[1]), a.rss_child[2])
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    import qins
    from qins.kv._compat import kv_shape
    tok, model = qins.load_default_model()
    shape = kv_shape(model.config)
    try:
        import hqq  # noqa: F401
        have_hqq = not a.no_hqq
    except ImportError:
        have_hqq = False
        print("hqq not installed: QuantizedCache(hqq) rows skipped")
    names = cache_names(have_hqq)
    # qins-4b-plan: a key plan calibrated on the corpus's first 8 windows (its widths change
    # which channels get which width, not the bytes; the decode path differs, so it is timed)
    from qins.metrics.quality import token_windows
    from qins.kv import KVConfig, calibrate_keys
    plan_path = Path(a.out).with_name("kv_memory_key_plan.json")
    calibrate_keys(model, token_windows(tok, qins.default_corpus(), 512, max_windows=8),
                   KVConfig(k_bits=4, residual=0), source="default corpus, windows 0..7").save(plan_path)
    os.environ["QINS_KEY_PLAN"] = str(plan_path)
    command = "OMP_NUM_THREADS=1 python benchmarks/kv_memory.py " + " ".join(sys.argv[1:])
    meta = dict(date=datetime.date.today().isoformat(), machine=f"{platform.machine()} {platform.processor()}".strip(),
                threads=torch.get_num_threads(), torch=torch.__version__, command=command)
    rows = {}                                             # (context, name) -> row

    # 1. bytes at every context
    for ctx in a.contexts:
        for name in names:
            if name.startswith("hqq") and ctx > a.hqq_max_context:
                continue
            cache, dtype = make_cache(name, model.config)
            fill(cache, shape, ctx, dtype)
            nb = kv_bytes(cache)
            elems = 2 * shape[0] * shape[1] * shape[2] * ctx
            rows[ctx, name] = dict(context=ctx, cache=name, kv_bytes=nb, bits_per_element=8 * nb / elems,
                                   rss_delta="", decode_step_ms="")
            print(rows[ctx, name], flush=True)
            del cache
            trim()

    # 2. process memory at one context, one subprocess per cache
    cfg_json = json.dumps({k: v for k, v in model.config.to_dict().items()
                           if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                    "num_attention_heads", "num_key_value_heads", "head_dim",
                                    "max_position_embeddings", "rope_theta")})
    if a.rss_context:
        for name in names:
            out = subprocess.run([sys.executable, __file__, "--rss-child", name, str(a.rss_context), cfg_json],
                                 capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            if out.returncode:
                print(f"rss child {name} failed: {out.stderr[-2000:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            row = rows.setdefault((a.rss_context, name), dict(context=a.rss_context, cache=name, kv_bytes=r["kv_bytes"],
                                                              bits_per_element=8 * r["kv_bytes"] /
                                                              (2 * shape[0] * shape[1] * shape[2] * a.rss_context),
                                                              rss_delta="", decode_step_ms=""))
            row["rss_delta"] = r["rss_after"] - r["rss_before"]
            print(name, "rss_delta", row["rss_delta"], flush=True)

    # 3. decode-step latency, caches interleaved, best of --repeats rounds
    timed = [n for n in names if n != "dynamic-fp16"]
    for ctx in a.latency_contexts:
        best = {}
        for rep in range(a.repeats):
            for name in timed:
                cache, dtype = make_cache(name, model.config)
                fill(cache, shape, ctx, dtype)
                ms = decode_step_ms(model, cache, ctx, a.steps)
                best[name] = min(best.get(name, float("inf")), ms)
                print(f"ctx {ctx} round {rep} {name}: {ms:.1f} ms", flush=True)
                del cache
                trim()
        for name, ms in best.items():
            row = rows.setdefault((ctx, name), dict(context=ctx, cache=name, kv_bytes="", bits_per_element="",
                                                    rss_delta="", decode_step_ms=""))
            row["decode_step_ms"] = ms

    # ratios against the baselines of the same context
    for (ctx, name), r in rows.items():
        b16, b32 = rows.get((ctx, "dynamic-fp16"), {}), rows.get((ctx, "dynamic-fp32"), {})
        r["x_smaller_than_fp16"] = b16["kv_bytes"] / r["kv_bytes"] if b16.get("kv_bytes") and r["kv_bytes"] else ""
        r["rss_x_smaller_than_fp16"] = (b16["rss_delta"] / r["rss_delta"]
                                        if b16.get("rss_delta") and r["rss_delta"] else "")
        r["latency_vs_dynamic_fp32"] = (r["decode_step_ms"] / b32["decode_step_ms"]
                                        if b32.get("decode_step_ms") and r["decode_step_ms"] != "" else "")
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ordered = [rows[k] for k in sorted(rows, key=lambda k: (k[0], names.index(k[1])))]
    fields = ["context", "cache", "kv_bytes", "bits_per_element", "x_smaller_than_fp16", "rss_delta",
              "rss_x_smaller_than_fp16", "decode_step_ms", "latency_vs_dynamic_fp32"]
    with open(out, "w", newline="") as f:
        f.write(f"# {json.dumps(meta)}\n")
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(ordered)
    write_markdown(out.with_suffix(".md"), ordered, meta, a)
    print(f"wrote {out}")
    plot(out.with_suffix(".png"), ordered, names, meta)


def _num(x, fmt):
    return format(x, fmt) if isinstance(x, (int, float)) else ""


def write_markdown(path: Path, rows, meta, a) -> None:
    md = [f"# KV cache memory and CPU decode latency ({meta['date']})", "",
          f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}, {meta['threads']} torch thread(s), "
          f"torch {meta['torch']}. Default model (SmolLM2-135M, float32), batch 1; see the script's docstring "
          "for how each column is measured.", ""]
    for title, keep in [(f"Held at {a.rss_context} tokens (bytes and process memory)",
                         lambda r: r["context"] == a.rss_context),
                        ("Decode-step latency (CPU, reference path)", lambda r: r["decode_step_ms"] != ""),
                        ("Bytes against context", lambda r: r["kv_bytes"] != "")]:
        md += [f"## {title}", "", "| context | cache | KV MiB | bits/element | x smaller than fp16 | RSS MiB | "
               "RSS x smaller | decode step ms | vs DynamicCache fp32 |", "|---|---|---|---|---|---|---|---|---|"]
        for r in filter(keep, rows):
            md.append(f"| {r['context']} | {r['cache']} | {_num(r['kv_bytes'] and r['kv_bytes'] / 2**20, '.2f')} | "
                      f"{_num(r['bits_per_element'], '.3f')} | {_num(r['x_smaller_than_fp16'], '.2f')} | "
                      f"{_num(r['rss_delta'] and r['rss_delta'] / 2**20, '.2f')} | "
                      f"{_num(r['rss_x_smaller_than_fp16'], '.2f')} | {_num(r['decode_step_ms'], '.1f')} | "
                      f"{_num(r['latency_vs_dynamic_fp32'], '.2f')} |")
        md.append("")
    path.write_text("\n".join(md))


def plot(path: Path, rows, names, meta) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in names:
        rs = [r for r in rows if r["cache"] == name and r["kv_bytes"] != ""]
        ax1.plot([r["context"] for r in rs], [r["kv_bytes"] / 2**20 for r in rs], marker="o", label=name)
        rs = [r for r in rows if r["cache"] == name and r["decode_step_ms"] != ""]
        if rs:
            ax2.bar(name, rs[-1]["decode_step_ms"])
    ax1.set_xscale("log", base=2), ax1.set_yscale("log")
    ax1.set_xlabel("context tokens"), ax1.set_ylabel("KV MiB held (batch 1)")
    ax1.legend(fontsize=7)
    ax2.set_ylabel("decode step, ms (CPU, 1 thread)")
    ax2.tick_params(axis="x", labelrotation=60, labelsize=7)
    ax2.set_title(f"context {max(r['context'] for r in rows if r['decode_step_ms'] != '')}", fontsize=9)
    fig.suptitle(f"SmolLM2-135M KV cache, {meta['date']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
