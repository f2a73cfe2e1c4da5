"""The KV quality table: QINSCache at every width against DynamicCache, INT through the same
cache and transformers' QuantizedCache(hqq), with the cache in the loop (chunked prefill).

    OMP_NUM_THREADS=1 python benchmarks/kv_quality.py --windows 4 --out benchmarks/results/kv_quality

Writes OUT.jsonl (one row per line, as measured) and OUT.md (the table, protocol, command,
date). Every row runs in one process on the same windows (DESIGN.md protocol).
"""
from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from qins.eval.harness import Harness, Protocol
from qins.eval.kv import measure_dynamic, measure_kv, measure_quantized_cache
from qins.kv.config import KVConfig
from qins.kv.plan import SAMPLE_TOKENS, SAMPLES, calibrate_keys, model_samples, resolve_key_plan, samples_source
from qins.metrics.render import Column, markdown_table

# (label, KVConfig fields, token match?)
ROWS: list[tuple[str, dict, bool]] = [
    ("qins 8 bits, residual 0", dict(k_bits=8, residual=0), True),
    ("int-sym 8 bits, residual 0", dict(k_bits=8, residual=0, format="int-sym"), True),
    ("qins 6 bits, residual 0", dict(k_bits=6, residual=0), False),
    ("qins 4 bits, residual 0", dict(k_bits=4, residual=0), False),
    ("qins 4 bits, residual 0, key plan", dict(k_bits=4, residual=0, plan=True), False),
    ("qins 4 bits, residual 0, pre-RoPE keys", dict(k_bits=4, residual=0, k_prerope=True), False),
    ("qins 4 bits, residual 0, pre-RoPE keys, key plan", dict(k_bits=4, residual=0, k_prerope=True, plan=True),
     False),
    ("qins 4 bits, residual 0, rotated values", dict(k_bits=4, residual=0, v_rotate=True), False),
    ("qins 4 bits, residual 0, pre-RoPE keys, rotated values", dict(k_bits=4, residual=0, k_prerope=True,
                                                                    v_rotate=True), False),
    ("qins 4 bits, residual 0, pre-RoPE keys, rotated values, key plan",
     dict(k_bits=4, residual=0, k_prerope=True, v_rotate=True, plan=True), False),
    # key plans calibrated on text the model writes itself (kv.plan.model_samples): no text needed
    ("qins 4 bits, residual 0, sampled key plan", dict(k_bits=4, residual=0, plan="sampled"), False),
    ("qins 4 bits, residual 0, pre-RoPE keys, sampled key plan",
     dict(k_bits=4, residual=0, k_prerope=True, plan="sampled"), False),
    ("qins 4 bits, residual 0, pre-RoPE keys, rotated values, sampled key plan",
     dict(k_bits=4, residual=0, k_prerope=True, v_rotate=True, plan="sampled"), False),
    ("qins 3 bits, residual 0, pre-RoPE keys, rotated values, sampled key plan",
     dict(k_bits=3, residual=0, k_prerope=True, v_rotate=True, plan="sampled"), False),
    ("qins 4 bits, residual 0, key plan, value curvature 1", dict(k_bits=4, residual=0, v_curvature=1.0, plan=True),
     False),
    ("qins 4 bits, residual 0, no sink", dict(k_bits=4, residual=0, sink=0), False),
    ("qins 4 bits, residual 0, value curvature 1", dict(k_bits=4, residual=0, v_curvature=1.0), False),
    ("int-sym 4 bits, residual 0", dict(k_bits=4, residual=0, format="int-sym"), False),
    ("qins 4 bits, residual 0, key group 32 (over budget)", dict(k_bits=4, residual=0, group=32), False),
    ("qins 3 bits, residual 0", dict(k_bits=3, residual=0), False),
    ("qins 3 bits, residual 0, key plan", dict(k_bits=3, residual=0, plan=True), False),
    ("qins 3 bits, residual 0, pre-RoPE keys", dict(k_bits=3, residual=0, k_prerope=True), False),
    ("qins 3 bits, residual 0, pre-RoPE keys, key plan", dict(k_bits=3, residual=0, k_prerope=True, plan=True),
     False),
    ("qins 3 bits, residual 0, pre-RoPE keys, rotated values, key plan",
     dict(k_bits=3, residual=0, k_prerope=True, v_rotate=True, plan=True), False),
    ("qins 2 bits, residual 0", dict(k_bits=2, residual=0), False),
    ("qins 2 bits, residual 0, key plan", dict(k_bits=2, residual=0, plan=True), False),
    ("qins 2 bits, residual 0, pre-RoPE keys, key plan", dict(k_bits=2, residual=0, k_prerope=True, plan=True),
     False),
    ("qins 2 bits, residual 0, pre-RoPE keys, rotated values, key plan",
     dict(k_bits=2, residual=0, k_prerope=True, v_rotate=True, plan=True), False),
    ("qins 2 bits, residual 0, key group 128", dict(k_bits=2, residual=0, group=128), False),
    ("qins 8 bits, residual 128 (default)", dict(k_bits=8), False),
    ("qins 4 bits, residual 128 (default)", dict(k_bits=4), False),
    ("qins 4 bits, residual 128, pre-RoPE keys", dict(k_bits=4, k_prerope=True), False),
    ("qins 2 bits, residual 128 (default)", dict(k_bits=2), False),
]


COLUMNS = (
    Column("label", "cache", left=True), Column("bpw", "bits/element", "{:.3f}"), Column("ppl", "ppl", "{:.4f}"),
    Column("ppl_increase_pct", "vs ref", "{:+.2f}%"), Column("kl", "KL", "{:.2e}"),
    Column("top1", "top-1", lambda r: f"{100 * r['top1']:.1f}%"),
    Column("match", "token match / identical / first div.",
           lambda r: "" if r.get("match") is None else
           f"{100 * r['match']:.1f}% / {r['identical']} / {r['first_divergence']:.1f}"),
)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kv_quality.py")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None,
                    help="row labels to run: substrings, or =LABEL for exactly LABEL")
    ap.add_argument("--no-hqq", action="store_true")
    ap.add_argument("--also", nargs="*", default=[], metavar="NAME=FILE",
                    help="also evaluate every QINSCache row on the last --also-windows windows of these texts "
                         "(other kinds than the corpus; key plans stay calibrated on the corpus)")
    ap.add_argument("--also-windows", type=int, default=10)
    ap.add_argument("--out", default="benchmarks/results/kv_quality")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    import qins

    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    command = "OMP_NUM_THREADS=1 python benchmarks/kv_quality.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    tok, model = qins.load_default_model()
    h = Harness(tok, model, Protocol(windows=a.windows, prompts=a.prompts, new_tokens=a.new_tokens,
                                     calibration_windows=8), progress=True)
    rows = []
    jl = open(out.with_suffix(".jsonl"), "w")

    def emit(r):
        rows.append(r)
        jl.write(json.dumps(r) + "\n")
        jl.flush()
        print(markdown_table([r], COLUMNS).splitlines()[-1], flush=True)

    samples = {}
    also = {}
    for spec in a.also:
        name, path = spec.split("=", 1)
        also[name] = (path, Harness(tok, model, Protocol(windows=a.also_windows, prompts=0, calibration_windows=0),
                                    text=Path(path).read_text(), progress=True))
    emit(measure_dynamic(h, model, a.chunk))
    for label, fields, match in ROWS:
        if a.only and not any(label == s[1:] if s.startswith("=") else s in label for s in a.only):
            continue
        fields = dict(fields)
        want_plan = fields.pop("plan", False)
        config = KVConfig(**fields)
        # a key plan is calibrated once, on the corpus's windows 0..7 (or on the model's own samples,
        # written once per run), and used on every text
        if want_plan == "sampled":
            if "sampled" not in samples:
                samples["sampled"] = model_samples(model, SAMPLES, SAMPLE_TOKENS)
            w = samples["sampled"]
            plan = calibrate_keys(model, w, config, batch_size=h.protocol.batch_size,
                                  source=samples_source(w))
        else:
            plan = resolve_key_plan("auto", model, config, lambda: h.calibration_windows,
                                    f"calibration {h.describe()['calibration_windows']}", h.protocol.batch_size,
                                    True) if want_plan else None
        r = measure_kv(h, model, config, a.chunk, match=match and a.prompts > 0, label=label, key_plan=plan)
        for name, (path, ha) in also.items():
            ra = measure_kv(ha, model, config, a.chunk, match=False, label=label, key_plan=plan)
            r[name] = {"text": path, "windows": ha.describe()["eval_windows"], "ppl_ref": ra["ppl_ref"],
                       "ppl_increase_pct": ra["ppl_increase_pct"], "kl": ra["kl"], "top1": ra["top1"]}
        emit(r)
    if not a.no_hqq:
        try:
            import hqq  # noqa: F401
        except ImportError:
            print("hqq not installed: QuantizedCache(hqq) rows skipped")
        else:
            for nbits, res in ((4, 128), (4, 1), (8, 1)):
                if a.only and not any(s in f"hqq {nbits} r{res}" for s in a.only):
                    continue
                t0 = time.perf_counter()
                try:
                    r = measure_quantized_cache(h, model, "hqq", nbits, res, a.chunk)
                except Exception as e:                     # report the failure, keep the table
                    print(f"QuantizedCache(hqq, {nbits}, {res}) failed: {type(e).__name__}: {e}", flush=True)
                    continue
                r["seconds"] = time.perf_counter() - t0
                emit(r)
    jl.close()
    d = h.describe()
    md = [f"# KV cache quality, cache in the loop ({datetime.date.today().isoformat()})", "",
          f"Command: `{command}`", "",
          f"Model: default (SmolLM2-135M-Instruct, float32). {d['eval_windows']}; each 512-token window is "
          f"prefilled {a.chunk} tokens at a time through a fresh cache, so later chunks read earlier tokens "
          f"back from the cache. Reference perplexity (no cache, one pass) {d['ppl_ref']:.4f}. "
          f"Machine: {d['machine']}.", "",
          f"Key plan rows: per-channel key widths calibrated (qins.kv.calibrate_keys) on "
          f"{d['calibration_windows']}, disjoint from the evaluation windows, at the same bits per element; "
          f"'sampled key plan' rows: on {SAMPLES} x {SAMPLE_TOKENS} tokens the model wrote itself "
          f"(qins.kv.plan.model_samples, temperature 1, seed 0), no text read.", "",
          "bits/element: everything the cache holds at 4096 tokens of context, batch 1 (codes, scales, zero "
          "points, offsets, sink copies, fp regions, page slack), over K and V elements. "
          "Token match: greedy, "
          f"{a.prompts} prompts x {a.new_tokens} new tokens against the float model with its default cache: "
          "share of tokens equal / sequences identical / mean first divergence.", "",
          *([f"Other texts (key plans calibrated on the corpus as above): "
             + "; ".join(f"{k} = `{p}`, {ha.describe()['eval_windows']}, reference ppl {ha.reference.ppl:.4f}"
                         for k, (p, ha) in also.items()), ""] if also else []),
          markdown_table(rows, COLUMNS + tuple(
              c for k in also for c in (
                  Column(k, f"{k}: vs ref", lambda r, k=k: f"{r[k]['ppl_increase_pct']:+.2f}%" if k in r else ""),
                  Column(k, f"{k}: KL", lambda r, k=k: f"{r[k]['kl']:.2e}" if k in r else ""))))]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.jsonl')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
