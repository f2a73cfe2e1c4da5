"""Question: which mixed-precision plan packs the default model to >= 8x FP32 with the least
perplexity, when the allocator charges each candidate its entropy-coded archive bytes
(issue 14)? One sensitivity measurement serves many plans.

    # 1. Hessians, Fisher and every tensor under every candidate, once (about 25 minutes on
    #    2 cores for 8 candidates); each candidate charged raw and archive-coded sizes
    PYTHONPATH=src python benchmarks/coded_plans.py measure /tmp/s6/sens.pt \
        --candidates 3:64 3:128 4:64 4:128 5:64 5:128 6:64 6:128 [--threshold 0.05]
    # 2. a plan from it (a minute): the candidates a subset of the measured ones, charged
    #    coded (archive bytes) or raw; --embeddings fixes the tied embedding's candidate
    PYTHONPATH=src python benchmarks/coded_plans.py plan /tmp/s6/sens.pt -o DIR --target-bpw 3.95 \
        [--charge coded|raw] [--candidates 3:64 4:64 ...] [--embeddings 5:128] [--threshold 0.05]
    # predict: charged and raw bytes of the plans at several targets, without building them
    PYTHONPATH=src python benchmarks/coded_plans.py predict /tmp/s6/sens.pt --targets 3.9 3.95 4.0 [same options]
    # 3. measure DIRs with benchmarks/archive_curve.py (same --threshold)

A plan from a subset of the measured candidates is the plan `qins compress --target-bpw T
[--coded] --candidates SUBSET` makes: each candidate quantizes each tensor on its own from the
float weights and the same statistics (32 windows of the corpus's start, Fisher seed 0).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from qins.cli import DEFAULT_CALIBRATION_WINDOWS, _parse_menu
from qins.codec.config import WeightConfig
from qins.entropy.archive import WeightCodedSize
from qins.metrics.models import load_model, read_corpus, resolve_dtype
from qins.metrics.quality import token_windows
from qins.weights import allocate as alloc
from qins.weights.budget import measure_sensitivity, plan_table, quantize_to_budget

EXCLUDED = 1 << 60          # bits and loss of a candidate a plan may not take


def _setup(n_windows):
    tok, model = load_model(None, dtype="float32")
    wins = token_windows(tok, read_corpus(None), 512, max_windows=n_windows)
    return tok, model, wins


def measure(a):
    tok, model, wins = _setup(a.calibration_windows)
    cands = alloc.default_candidates(menu=_parse_menu(a.candidates))
    size = WeightCodedSize(a.threshold)
    ts = measure_sensitivity(model, wins, cands, size=size)
    torch.save({"candidates": [c.to_dict() for c in cands], "threshold": a.threshold,
                "windows": a.calibration_windows, "tensors": ts}, a.out)
    for j, c in enumerate(cands):
        raw = sum(t.stored[j] for t in ts)
        cod = sum(t.bits[j] for t in ts)
        print(f"{c.label}: raw {raw / 8:.0f} B, coded {cod / 8:.0f} B ({cod / raw:.4f})")


def _menu(a):
    """(candidates, [tensors restricted to --candidates, --embeddings and --charge], threshold)."""
    doc = torch.load(a.sens, weights_only=False)
    cands = [WeightConfig.from_dict(c) for c in doc["candidates"]]
    labels = [(c.bits, c.group_size) for c in cands]
    menu = _parse_menu(a.candidates) if a.candidates else labels
    keep = [labels.index(m) for m in menu]
    emb = _parse_menu([a.embeddings])[0] if a.embeddings else None
    threshold = doc["threshold"] if a.threshold is None else a.threshold
    if a.charge == "coded" and threshold != doc["threshold"]:       # coding only: seconds per candidate
        size = WeightCodedSize(threshold)
        for t in doc["tensors"]:
            t.bits = [8 * size(qw, t.name) for qw in t.weights]
    tensors = []
    for t in doc["tensors"]:
        charged = t.bits if a.charge == "coded" else t.stored
        bits = [charged[j] for j in keep]
        loss = [t.loss[j] for j in keep]
        if emb is not None and t.embedding:
            k = labels.index(emb)
            if k not in keep:
                raise SystemExit(f"--embeddings {a.embeddings} is not among --candidates")
            bits = [charged[j] if j == k else EXCLUDED for j in keep]
            loss = [t.loss[j] if j == k else EXCLUDED for j in keep]
        tensors.append(alloc.Tensor(t.name, t.numel, t.linear, t.embedding, bits, loss,
                                    [t.weights[j] for j in keep], [t.stored[j] for j in keep]))
    coded = [[t.bits[j] for j in keep] for t in doc["tensors"]]        # archive-coded bits at `threshold`
    return [cands[j] for j in keep], tensors, threshold, doc["windows"], coded


def predict(a):
    """Charged and raw tensor bytes of the plan at each target (no model is built)."""
    from qins.weights.budget import _float_bits
    cands, tensors, threshold, n_win, coded = _menu(a)
    _, model, _ = _setup(1)
    other, params = _float_bits(model, tensors)
    for target in a.targets:
        ch = alloc.allocate(tensors, max_bits=target * params - other)
        charged = sum(t.bits[i] for t, i in zip(tensors, ch)) / 8
        raw = sum(t.stored_bits(i) for t, i in zip(tensors, ch)) / 8
        cod = sum(c[i] for c, i in zip(coded, ch)) / 8
        est = sum(t.loss[i] for t, i in zip(tensors, ch))
        print(f"target {target:.4f}: quantized tensors charged {charged:.0f} B, raw {raw:.0f} B, "
              f"coded (threshold {threshold:g}) {cod:.0f} B, "
              f"floats {other / 8:.0f} B raw, estimated KL {est:.5f}", flush=True)


def plan(a):
    cands, tensors, threshold, n_win, _ = _menu(a)
    tok, model, wins = _setup(n_win)
    size = WeightCodedSize(threshold) if a.charge == "coded" else None
    rep = quantize_to_budget(model, wins, target_bpw=a.target_bpw, candidates=cands,
                             sensitivity=tensors, size=size, describe="first windows of the default corpus")
    rep["command"] = "PYTHONPATH=src python " + " ".join(sys.argv)
    print(plan_table(rep))
    store = resolve_dtype("auto", None)
    model.to(store)
    model.config.dtype = store
    import qins
    qins.save(model, a.out, tokenizer=tok)
    print(f"wrote {a.out}: {rep['bpw_all']:.4f} bpw raw, {rep['charged_bpw_all']:.4f} bpw charged ({rep['charged']})")


ap = argparse.ArgumentParser()
sub = ap.add_subparsers(dest="cmd", required=True)
p = sub.add_parser("measure")
p.add_argument("out")
p.add_argument("--candidates", nargs="+", default=["3:64", "3:128", "4:64", "4:128", "5:64", "5:128", "6:64", "6:128"])
p.add_argument("--threshold", type=float, default=0.05, help="the `qins pack --threshold` the coded sizes assume")
p.add_argument("--calibration-windows", type=int, default=DEFAULT_CALIBRATION_WINDOWS)
p.set_defaults(fn=measure)
for name in ("plan", "predict"):
    p = sub.add_parser(name)
    p.add_argument("sens")
    if name == "plan":
        p.add_argument("-o", "--out", required=True)
        p.add_argument("--target-bpw", type=float, required=True)
    else:
        p.add_argument("--targets", type=float, nargs="+", required=True)
    p.add_argument("--charge", choices=("coded", "raw"), default="coded")
    p.add_argument("--candidates", nargs="*", default=None)
    p.add_argument("--embeddings", default=None, metavar="BITS:GROUP")
    p.add_argument("--threshold", type=float, default=None,
                   help="the `qins pack --threshold` to charge for (default: the measurement's)")
    p.set_defaults(fn=plan if name == "plan" else predict)
a = ap.parse_args()
a.fn(a)
