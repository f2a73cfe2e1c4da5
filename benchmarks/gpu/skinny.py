"""Batch-1 8-bit and batch-16 4-bit kernels over K-major codes against cuBLAS bf16 and the
routes they would replace (kernels/triton_kmajor.py), per layer, on the issue's three shapes.

    PYTHONPATH=$PWD/src python3 benchmarks/gpu/skinny.py [--quick]

- 4-bit g64, batch 1: kprmt (shipped) over a wider tile sweep (BN up to 1024, 8 warps).
- 8-bit g128, batch 1: kbyte (byte positions of (words, outputs) tiles, closed form) against
  kgemv's closed form (shipped).
- 4-bit g64, batch 16: kprmt_mm (prmt decode joined into one tl.dot per step) against kgemv's
  closed form (shipped).
Correctness first (float64 over the same codes, bound 4e-3 as in qlinear.py), then medians of
CUDA-graph replays over enough weight copies that they come from HBM. The first shape sweeps
the tiles; later shapes time the first shape's best three and the launcher's default. Writes
$OUT/gpu_skinny.json, prints the registers of each compiled variant and a table last.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from qlinear import (BOUND, SHAPES, bench, copies_for, cublas_bf16, kernel_registers, print_rows, qbytes,  # noqa: E402
                     reference64, synth)
from qlinear import timed as run_timed  # noqa: E402

from qins.kernels import kmajor  # noqa: E402
from qins.kernels import triton_kmajor as km  # noqa: E402
from qins.kernels.prmt import table_registers as _registers  # noqa: E402


def _split(n, k_steps, bn, sms, mult):
    split = 1
    while triton.cdiv(n, bn) * split < 4 * sms * mult and k_steps // (split * 2) >= 2:
        split *= 2
    return split


def sweep(kind, N, K, sms):
    out = []
    if kind == "kprmt":
        for bn in (128, 256, 512, 1024):
            for w in (4, 8):
                for mult in (0.5, 1, 2):
                    c = dict(BK=64, BN=bn, SPLIT_K=_split(N, triton.cdiv(K, 64), bn, sms, mult), num_warps=w)
                    out.append(c)
    elif kind == "kbyte":
        for bkw in (8, 16, 32):
            for bn in (128, 256, 512):
                for w in (4, 8):
                    for mult in (1, 2):
                        for acc1d in (False, True):
                            out.append(dict(BKW=bkw, BN=bn, SPLIT_K=_split(N, triton.cdiv(K, 4 * bkw), bn, sms, mult),
                                            num_warps=w, ACC1D=acc1d))
    elif kind == "kprmt_mm":
        for bn in (16, 32, 64, 128):
            for w in (2, 4, 8):
                for mult in (0.5, 1, 2):
                    out.append(dict(BK=64, BN=bn, SPLIT_K=_split(N, triton.cdiv(K, 64), bn, sms, mult), num_warps=w))
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    return unique


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first shape, default tiles only")
    ap.add_argument("--defaults", action="store_true", help="every shape, the launchers' default tiles only")
    ap.add_argument("--json", default="gpu_skinny.json", help="file name under $OUT")
    ap.add_argument("--only", default=None, help="comma-separated kernels to time: kprmt,kprmt_mm,kbyte")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = SHAPES[:1] if a.quick else SHAPES
    rows, best_of = [], {}

    def record(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    timed = functools.partial(run_timed, record)

    def tuned(shape, name, M, kind, make, store, ref, base, N, K, default, first):
        if a.quick or a.defaults:
            cfgs = []
        else:
            cfgs = sweep(kind, N, K, sms) if first else list(best_of.get(kind, []))
        if default not in cfgs:
            cfgs.append(default)
        results = []
        for c in cfgs:
            r = timed(shape, name, M, make(c), store, ref, base, c)
            if r is not None:
                results.append(r)
                rows.append(dict(r, sweep=True))
        results.sort(key=lambda r: r["us"])
        if first:
            best_of[kind] = [r["cfg"] for r in results[:3]]
        if results:
            record(**results[0])
            d = [r for r in results if r["cfg"] == default]
            if d:
                record(**dict(d[0], variant=name + "-default"))

    for si, (K, N) in enumerate(shapes):
        first = si == 0
        shape = f"{K}x{N}"
        base = cublas_bf16(K, N, (1, 16), dev)
        for M, us in base.items():
            record(shape=shape, variant="cublas-bf16", M=M, us=us, speedup=1.0)
        only = set(a.only.split(",")) if a.only else {"kprmt", "kprmt_mm", "kbyte"}
        widths = ([(4, 64)] if only & {"kprmt", "kprmt_mm"} else []) + ([(8, 128)] if "kbyte" in only else [])
        for bits, g in widths:
            q0 = synth(N, K, bits, g)
            qs = [q0] + [synth(N, K, bits, g) for _ in range(copies_for(qbytes(q0)) - 1)]
            kq = [dict(q, qweight=kmajor(q["qweight"]), scales=kmajor(q["scales"])) for q in qs]
            if bits == 4:
                for q in kq:
                    q["regs"] = _registers(q["table"])
            Ms = tuple(m for m, k in ((1, "kprmt"), (16, "kprmt_mm")) if k in only) if bits == 4 else (1,)
            for M in Ms:
                x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
                ref = reference64(q0, x)

                def shipped(q, x=x):
                    return km.kgemv(x, q["qweight"], q["scales"], None, q["table"], q["curvature"], None,
                                    bits, g, K, mode="closed")
                if bits == 8 or M == 16:
                    r = timed(shape, f"kgemv-closed-{bits}b", M, shipped, kq, ref, base[M],
                              km.kgemv_config(M, N, K, bits, g, sms))
                    if r:
                        record(**r)
                if bits == 4 and M == 1:
                    def make(c, x=x):
                        return lambda q: km.kprmt(x, q["qweight"], q["scales"], None, q["regs"], None, g, K,
                                                  config=dict(c))
                    default = km.kprmt_config(N, K, g)
                    tuned(shape, "kprmt-4b", M, "kprmt", make, kq, ref, base[M], N, K, default, first)
                elif bits == 4:
                    def make(c, x=x):
                        return lambda q: km.kprmt_mm(x, q["qweight"], q["scales"], q["regs"], None, g, K,
                                                     config=dict(c))
                    default = km.kprmt_mm_config(N, K, g)
                    tuned(shape, "kprmt_mm-4b", M, "kprmt_mm", make, kq, ref, base[M], N, K, default, first)
                else:
                    def make(c, x=x):
                        return lambda q: km.kbyte(x, q["qweight"], q["scales"], None, q["curvature"], None,
                                                  g, K, config=dict(c))
                    tuned(shape, "kbyte-8b", M, "kbyte", make, kq, ref, base[M], N, K,
                          km.kbyte_config(N, K, g), first)
            del qs, kq, q0
            torch.cuda.empty_cache()
    regs = kernel_registers((km._kprmt_kernel, km._kbyte_kernel, km._kprmt_mm_kernel, km._kgemv_kernel))
    out = dict(card=torch.cuda.get_device_name(0), date=datetime.date.today().isoformat(),
               torch=torch.__version__, triton=triton.__version__,
               command=" ".join(["python3"] + sys.argv), bound=BOUND, rows=rows, registers=regs)
    with open(os.path.join(os.environ.get("OUT", "."), a.json), "w") as f:
        json.dump(out, f, indent=1)
    print_rows(out, rows)
    for r in regs:
        print("regs", r.get("kernel"), r.get("n_regs"), r.get("n_spills"))


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"wall {time.time() - t0:.0f} s")
