"""The CUDA tensor-core weight kernel (kernels/cuda_qlinear.py) against cuBLAS bf16, the Triton
routes it replaces (kprmt at batch 1, kprmt_mm at 2-16) and gemlite, per layer, on the issue's
three shapes, 4-bit g64, bf16 activations.

    PYTHONPATH=$PWD/src python3 benchmarks/gpu/mma.py [--batches 1 4 8 16] [--sweep] [--no-gemlite]
        [--tiled]

Correctness first (float64 over the same codes, bound 4e-3 as in qlinear.py; a variant over it
is recorded and not timed), then medians of CUDA-graph replays over enough weight copies that
they come from HBM. --sweep also times every built (warps, depth) with splits 1, 2, 4 and either
table (wide: 64 KB) and records the best; --tiled also times the tiled code layout
(cuda_qlinear.tile_codes) as cuda-mma-tiled. Writes $OUT/gpu_mma.json and prints a table last
(>1x: faster than cuBLAS bf16).
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(__file__))
from qlinear import SHAPES, copies_for, cublas_bf16, gemlite_rows, qbytes, reference64, synth  # noqa: E402
from qlinear import timed as run_timed  # noqa: E402

from qins.kernels import cuda_qlinear, kmajor  # noqa: E402
from qins.kernels import triton_kmajor as km  # noqa: E402
from qins.kernels.prmt import table_registers  # noqa: E402

BITS, GROUP = 4, 64


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--sweep", action="store_true", help="time every (warps, depth, table) at splits 1, 2, 4")
    ap.add_argument("--no-gemlite", action="store_true")
    ap.add_argument("--shapes", default=None, help="KxN,KxN (default: the issue's three)")
    ap.add_argument("--json", default="gpu_mma.json", help="file name under $OUT")
    ap.add_argument("--tiled", action="store_true", help="also time the tiled code layout (cuda_qlinear.tile_codes)")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    dev = "cuda"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    shapes = SHAPES if a.shapes is None else [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    rows = []

    def record(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)

    timed = functools.partial(run_timed, record)
    for K, N in shapes:
        shape = f"{K}x{N}"
        base = cublas_bf16(K, N, tuple(a.batches), dev)
        for M, us in base.items():
            record(shape=shape, variant="cublas-bf16", M=M, us=us, speedup=1.0,
                   tbps=(N * K * 2 + M * (K + N) * 2) / us / 1e6)
        if not a.no_gemlite:
            gemlite_rows(record, shape, K, N, BITS, GROUP, a.batches, base, dev)
        q0 = synth(N, K, BITS, GROUP)
        qs = [q0] + [synth(N, K, BITS, GROUP) for _ in range(copies_for(qbytes(q0)) - 1)]
        kq = [dict(q, qweight=kmajor(q["qweight"]), scales=kmajor(q["scales"]), regs=table_registers(q["table"]))
              for q in qs]
        if a.tiled:
            for q in kq:
                q["tiled"] = cuda_qlinear.tile_codes(q["qweight"], K)
        nbytes = qbytes(q0)
        for M in a.batches:
            x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
            ref = reference64(q0, x)
            moved = nbytes + M * (K + N) * 2

            def row(r):
                if r is not None:
                    r["tbps"] = moved / r["us"] / 1e6
                    record(**r)
                return r

            if M == 1:
                row(timed(shape, "triton-kprmt", M, lambda q, x=x: km.kprmt(
                    x, q["qweight"], q["scales"], None, q["regs"], None, GROUP, K), kq, ref, base[M]))
            else:
                row(timed(shape, "triton-kprmt_mm", M, lambda q, x=x: km.kprmt_mm(
                    x, q["qweight"], q["scales"], q["regs"], None, GROUP, K), kq, ref, base[M]))
            why = cuda_qlinear.unsupported(x, kq[0]["qweight"], kq[0]["scales"], None, kq[0]["table"], BITS, GROUP, K)
            if why is not None:
                record(shape=shape, variant="cuda-mma", M=M, error=why)
                continue
            cfgs = [(*cuda_qlinear.default_config(M, N, K, GROUP, x.device), None)]
            if a.sweep:
                cfgs += [(s, w, d, wide) for (w, d) in cuda_qlinear.SHAPES for s in (1, 2, 4) for wide in (False, True)
                         if (s, w, d, wide) not in cfgs]
            for layout in ("", "-tiled") if a.tiled else ("",):
                results = []
                for s, w, d, wide in cfgs:
                    r = timed(shape, f"cuda-mma{layout}", M, lambda q, x=x, s=s, w=w, d=d, wide=wide, layout=layout:
                              cuda_qlinear.qlinear(x, q["tiled"] if layout else q["qweight"], q["scales"], q["table"],
                                                   None, GROUP, K, splits=s, warps=w, depth=d, wide=wide, out_features=N),
                              kq, ref, base[M], cfg=dict(splits=s, warps=w, depth=d, wide=wide))
                    if r is not None:
                        r["tbps"] = moved / r["us"] / 1e6
                        results.append(r)
                        rows.append(dict(r, sweep=True))
                if results:
                    record(**dict(results[0], variant=f"cuda-mma{layout}-default"))
                    best = min(results, key=lambda r: r["us"])
                    record(**dict(best, variant=f"cuda-mma{layout}-best"))

    out = dict(card=torch.cuda.get_device_name(0), sms=sms, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               torch=torch.__version__, triton=triton.__version__, command=" ".join(["python3"] + sys.argv),
               rows=rows)
    with open(os.path.join(os.environ.get("OUT", "."), a.json), "w") as f:
        json.dump(out, f, indent=1)
    print(f"\n{out['card']}  {out['date']}  torch {out['torch']}")
    for r in rows:
        if "error" in r:
            print("FAILED/OVER", r["shape"], r["variant"], r.get("M"), r.get("cfg"), str(r["error"])[:200], r.get("err"))
    for r in rows:
        if r.get("sweep") or "us" not in r:
            continue
        print(f"{r['shape']:>11} {r['variant']:>18} {r['M']:>3} {r['us']:8.1f} us {r['speedup']:5.2f}x "
              f"{r.get('tbps', 0):5.2f} TB/s {r.get('err') or 0:8.1e} {r.get('cfg') or ''}")


if __name__ == "__main__":
    main()
