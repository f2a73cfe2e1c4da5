"""Prefill (batch 64-2048) through fused tiles against cuBLAS bf16 and decode-then-cuBLAS, and
batch-1 floor probes, per layer on the issue's three shapes (issue 11).

    PYTHONPATH=$PWD/src python3 benchmarks/gpu/prefill.py [--quick] [--no-probes]

- 4-bit g64: kprmt_mm over tiles of (BLOCK_M rows, BN outputs): the prmt decode of 64 codes
  joined into one (64, BN) tile per step feeding tl.dot (kernels/triton_kmajor.py), against the
  shipped route above 16 rows (dequantize to bf16, then cuBLAS) and kgemv's closed form.
- 8-bit g128: kgemv's closed form over row tiles against decode-then-cuBLAS.
- Probes at batch 1 (4096 x 14336, kprmt's default grid): the same walk over the codes that
  (0) only loads the words, (1) decodes them with prmt and sums the values (no x), (2) decodes
  and multiplies by x (kprmt without scales), (3) decodes 4-bit codes as uniform integers (shift,
  mask, exponent trick) and multiplies by x, (4) looks the codes up as fp16 pairs and multiplies
  them by x's fp16 pairs with packed half-precision FMAs (one fp32 per word: fewer instructions,
  half-precision rounding; a probe, not a kernel). Their times bound what any kernel with that
  decode can reach on this card; (2)-(4) are checked against float64 over the same codes.
Correctness first (float64 over the same codes, bound 4e-3 as qlinear.py), then medians of
CUDA-graph replays over weight copies rotated out of L2. Writes $OUT/gpu_prefill.json and
prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qins.codec import packing

sys.path.insert(0, os.path.dirname(__file__))
from qlinear import (BOUND, SHAPES, bench, copies_for, cublas_bf16, kernel_registers, print_rows, qbytes,  # noqa: E402
                     reference64, synth)
from qlinear import timed as run_timed  # noqa: E402

from qins.kernels import kmajor  # noqa: E402
from qins.kernels import triton_kmajor as km  # noqa: E402
from qins.kernels import triton_qlinear as tq  # noqa: E402
from qins.kernels.prmt import table_registers as _registers  # noqa: E402
from qins.kernels.triton_qlinear import _prmt_decode, _prmt_regs  # noqa: E402


# MODE 4: the prmt lookup into fp16 pairs (a fp16 table), multiplied by x's fp16 pairs and summed
# over the word with packed half-precision FMAs, one fp32 per word: fewer instructions per code
# (no widening to fp32 per code, 4 FMAs per 8 codes) at half-precision rounding. A probe only.
_LOOK = """prmt.b32 a, $2, $3, {s}; prmt.b32 b, $4, $5, {s}; lop3.b32 l, a, b, {m}, 0xD8;
prmt.b32 a, $6, $7, {s}; prmt.b32 b, $8, $9, {s}; lop3.b32 h, a, b, {m}, 0xD8;
"""
_F16DOT = tl.constexpr("{\n.reg .b32 s, sh, t, m0, m1, a, b, l, h, p, acc;\n.reg .b16 lo, hi;\n.reg .f32 f0, f1;\n"
                       "and.b32 s, $1, 0x77777777;\nshr.b32 sh, s, 16;\nshl.b32 t, $1, 4;\n"
                       "prmt.b32 m0, t, $1, 0xd9c8;\nprmt.b32 m1, t, $1, 0xfbea;\n"
                       + _LOOK.format(s="s", m="m0")
                       + "prmt.b32 p, l, h, 0x5140;\nmul.rn.f16x2 acc, p, $10;\n"
                       "prmt.b32 p, l, h, 0x7362;\nfma.rn.f16x2 acc, p, $11, acc;\n"
                       + _LOOK.format(s="sh", m="m1")
                       + "prmt.b32 p, l, h, 0x5140;\nfma.rn.f16x2 acc, p, $12, acc;\n"
                       "prmt.b32 p, l, h, 0x7362;\nfma.rn.f16x2 acc, p, $13, acc;\n"
                       "mov.b32 {lo, hi}, acc;\ncvt.f32.f16 f0, lo;\ncvt.f32.f16 f1, hi;\n"
                       "add.f32 f0, f0, f1;\nmov.b32 $0, f0;\n}")
_F16DOT_C = tl.constexpr(",".join(["=r"] + ["r"] * 13))


@triton.jit
def _probe_kernel(x_ptr, qw_ptr, tab_ptr, y_ptr, N, K, STEPS, stride_qn, stride_qw,
                  MODE: tl.constexpr, BKW: tl.constexpr, BN: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)
    col_ok = cols < N
    wi0 = tl.arange(0, BKW)
    r0, r1, r2, r3, r4, r5, r6, r7 = _prmt_regs(tab_ptr)
    acc2 = tl.zeros((BKW, BN), dtype=tl.float32)
    acci = tl.zeros((BKW, BN), dtype=tl.int32)
    for step in range(STEPS):
        w0 = (pid_k * STEPS + step) * BKW
        wi = w0 + wi0
        k8 = wi * 8
        w_ok = k8 < K
        words = tl.load(qw_ptr + wi[:, None] * stride_qw + cols[None, :] * stride_qn,
                        mask=w_ok[:, None] & col_ok[None, :], other=0)
        if MODE == 0:
            acci = acci ^ words
        elif MODE == 4:                                 # x_ptr: x as fp16 pairs (int32)
            z = tl.zeros(words.shape, dtype=tl.int32)
            xp = wi * 4
            d = tl.inline_asm_elementwise(
                _F16DOT, _F16DOT_C,
                [words, r0 + z, r1 + z, r2 + z, r3 + z, r4 + z, r5 + z, r6 + z, r7 + z,
                 tl.load(x_ptr + xp)[:, None] + z, tl.load(x_ptr + xp + 1)[:, None] + z,
                 tl.load(x_ptr + xp + 2)[:, None] + z, tl.load(x_ptr + xp + 3)[:, None] + z],
                dtype=tl.int32, is_pure=True, pack=1)
            acc2 += d.to(tl.float32, bitcast=True)
        elif MODE == 3:
            for i in tl.static_range(8):
                v = (((words >> (4 * i)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388615.0
                xi = tl.load(x_ptr + k8 + i).to(tl.float32)
                acc2 += v * xi[:, None]
        else:
            v0, v1, v2, v3, v4, v5, v6, v7 = _prmt_decode(words, r0, r1, r2, r3, r4, r5, r6, r7)
            if MODE == 1:
                acc2 += ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7))
            else:
                x0 = tl.load(x_ptr + k8).to(tl.float32)
                x1 = tl.load(x_ptr + k8 + 1).to(tl.float32)
                x2 = tl.load(x_ptr + k8 + 2).to(tl.float32)
                x3 = tl.load(x_ptr + k8 + 3).to(tl.float32)
                x4 = tl.load(x_ptr + k8 + 4).to(tl.float32)
                x5 = tl.load(x_ptr + k8 + 5).to(tl.float32)
                x6 = tl.load(x_ptr + k8 + 6).to(tl.float32)
                x7 = tl.load(x_ptr + k8 + 7).to(tl.float32)
                acc2 += v0 * x0[:, None] + v1 * x1[:, None] + v2 * x2[:, None] + v3 * x3[:, None]
                acc2 += v4 * x4[:, None] + v5 * x5[:, None] + v6 * x6[:, None] + v7 * x7[:, None]
    if MODE == 0:
        out = tl.sum(acci, axis=0).to(tl.float32)
    else:
        out = tl.sum(acc2, axis=0)
    tl.atomic_add(y_ptr + cols, out, mask=col_ok)


def _probe_setup():
    """The first shape's cuBLAS bf16 time at batch 1, 4-bit g64 weight copies stored K-major
    with their bf16 and fp16 table registers, x and a zeroed fp32 output."""
    K, N = SHAPES[0]
    base = cublas_bf16(K, N, (1,))[1]
    q0 = synth(N, K, 4, 64)
    qs = [q0] + [synth(N, K, 4, 64) for _ in range(copies_for(qbytes(q0)) - 1)]
    for q in qs:
        q["qweight"], q["scales"] = kmajor(q["qweight"]), kmajor(q["scales"])
        q["regs"] = _registers(q["table"])
        q["regs16"] = _registers(q["table"], torch.float16)
    x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
    return K, N, base, q0, qs, x, torch.zeros(N, device="cuda")


def probes(record, sms):
    K, N, base, q0, qs, x, y = _probe_setup()
    xp16 = x.to(torch.float16).view(torch.int32).contiguous()          # (1, K/2) fp16 pairs
    cfg = km.kprmt_config(N, K, 64)
    steps, split = km._steps(K, cfg["BK"], cfg["SPLIT_K"])
    codes = packing.unpack(q0["qweight"].contiguous(), 4, K).long()
    names = ["load-only", "prmt-decode-only", "prmt-decode-x", "uniform-int-decode-x", "prmt-fp16-pairs-hfma2-x"]
    for mode, name in enumerate(names):
        xin = xp16 if mode == 4 else x
        rk = "regs16" if mode == 4 else "regs"

        def run(q, mode=mode, xin=xin, rk=rk):
            _probe_kernel[(triton.cdiv(N, cfg["BN"]), split)](
                xin, q["qweight"], q[rk], y, N, K, steps, q["qweight"].stride(0), q["qweight"].stride(1),
                MODE=mode, BKW=cfg["BK"] // 8, BN=cfg["BN"], num_warps=cfg["num_warps"])
        err = None
        if mode in (2, 3, 4):                          # the product over the same codes, float64
            y.zero_()
            run(q0)
            if mode == 3:
                vals = (codes - 7).double()
            else:
                vals = q0["table"][0].to(torch.float16 if mode == 4 else torch.bfloat16).double()[codes]
            ref = vals @ (x.to(torch.float16) if mode == 4 else x).double()[0]
            err = float((y.double() - ref).norm() / ref.norm())
        it = itertools.cycle(qs)
        us = bench(lambda: run(next(it)))
        record(shape=f"{K}x{N}", variant=f"probe-{name}", M=1, us=us, speedup=base / us, cfg=cfg,
               gbps=qbytes(q0) / us / 1e3, err=err)
    it = itertools.cycle(qs)
    us = bench(lambda: (lambda q: km.kprmt(x, q["qweight"], q["scales"], None, q["regs"], None, 64, K))(next(it)))
    record(shape=f"{K}x{N}", variant="kprmt-4b (shipped)", M=1, us=us, speedup=base / us, cfg=cfg)
    record(shape=f"{K}x{N}", variant="cublas-bf16", M=1, us=base, speedup=1.0)


def probe_sweep(record):
    """Which (BKW, BN, split, warps) walk streams the 4-bit codes fastest (load-only), and how
    the prmt decode with x does on the best five walks and kprmt's default."""
    K, N, base, q0, qs, x, y = _probe_setup()

    def time_walk(mode, bkw, bn, split, w):
        steps, split = km._steps(K, 8 * bkw, split)

        def run(q):
            _probe_kernel[(triton.cdiv(N, bn), split)](
                x, q["qweight"], q["regs"], y, N, K, steps, q["qweight"].stride(0), q["qweight"].stride(1),
                MODE=mode, BKW=bkw, BN=bn, num_warps=w)
        it = itertools.cycle(qs)
        return bench(lambda: run(next(it)))
    loads = []
    for bkw in (8, 16, 32):
        for bn in (256, 512, 1024):
            for split in (4, 16, 64):
                for w in (4, 8):
                    us = time_walk(0, bkw, bn, split, w)
                    cfg = dict(BKW=bkw, BN=bn, SPLIT_K=split, num_warps=w)
                    loads.append((us, cfg))
                    record(shape=f"{K}x{N}", variant="probe-load-only", M=1, us=us, speedup=base / us, cfg=cfg,
                           gbps=qbytes(q0) / us / 1e3, sweep=True)
    loads.sort(key=lambda t: t[0])
    default = dict(BKW=8, BN=256, SPLIT_K=32, num_warps=4)
    for us0, cfg in loads[:5] + [(None, default)]:
        us = time_walk(2, cfg["BKW"], cfg["BN"], cfg["SPLIT_K"], cfg["num_warps"])
        record(shape=f"{K}x{N}", variant="probe-prmt-decode-x", M=1, us=us, speedup=base / us, cfg=cfg,
               load_only_us=us0)
    record(shape=f"{K}x{N}", variant="probe-load-only (best)", M=1, us=loads[0][0], speedup=base / loads[0][0],
           cfg=loads[0][1], gbps=qbytes(q0) / loads[0][0] / 1e3)
    record(shape=f"{K}x{N}", variant="cublas-bf16", M=1, us=base, speedup=1.0)


def sweep(kind):
    out = []
    if kind == "kprmt_mm":
        for bm in (64, 128, 256):
            for bn in (64, 128, 256):
                for w in (4, 8):
                    for st in (2, 3):
                        if bm * bn >= 256 * 256 and w == 4:
                            continue
                        out.append(dict(BK=64, BN=bn, SPLIT_K=1, BLOCK_M=bm, num_warps=w, num_stages=st))
    else:
        for bm in (64, 128):
            for bn in (64, 128):
                for w in (4, 8):
                    out.append(dict(BK=64, BN=bn, SPLIT_K=1, BLOCK_M=bm, num_warps=w, num_stages=3))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="first shape, default tiles only")
    ap.add_argument("--no-probes", action="store_true")
    ap.add_argument("--probe-sweep", action="store_true", help="only the batch-1 probes, over walks")
    ap.add_argument("--batches", type=int, nargs="*", default=[512, 2048, 64],
                    help="the first one sweeps the tiles (on the first shape); the others time its best three")
    ap.add_argument("--json", default="gpu_prefill.json", help="file name under $OUT")
    a = ap.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    torch.manual_seed(0)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows, best_of = [], {}

    path = os.path.join(os.environ.get("OUT", "."), a.json)

    def record(**r):
        rows.append(r)
        print(json.dumps(r), flush=True)
        with open(path, "w") as f:                     # kept whole if the run is cut short
            json.dump(dict(partial=True, rows=rows), f)

    if a.probe_sweep:
        probe_sweep(record)
        a.batches = []
    elif not a.no_probes:
        probes(record, sms)

    timed = functools.partial(run_timed, record)

    shapes = [] if a.probe_sweep or not a.batches else (SHAPES[:1] if a.quick else SHAPES)
    for si, (K, N) in enumerate(shapes):
        shape = f"{K}x{N}"
        base = cublas_bf16(K, N, tuple(a.batches))
        for M, us in base.items():
            record(shape=shape, variant="cublas-bf16", M=M, us=us, speedup=1.0)
        for bits, g in ((4, 64), (8, 128)):
            q0 = synth(N, K, bits, g)
            qs = [q0] + [synth(N, K, bits, g) for _ in range(copies_for(qbytes(q0)) - 1)]
            kq = [dict(q, qweight=kmajor(q["qweight"]), scales=kmajor(q["scales"])) for q in qs]
            for q in kq:
                q["regs"] = _registers(q["table"]) if bits == 4 else None
            for M in a.batches:
                x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
                ref = reference64(q0, x)

                def unfused(q, x=x):
                    w = tq.dequantize(q["qweight"], q["scales"], None, q["table"], q["curvature"], bits, g, K,
                                      torch.bfloat16, mode="table")
                    return F.linear(x, w)
                r = timed(shape, f"unfused-{bits}b (shipped)", M, unfused, kq, ref, base[M])
                if r:
                    record(**r)
                kinds = [("kprmt_mm", f"kprmt_mm-{bits}b")] if bits == 4 else []
                kinds.append(("kgemv", f"kgemv-closed-{bits}b"))
                for kind, name in kinds:
                    if kind == "kprmt_mm":
                        def make(c, x=x):
                            return lambda q: km.kprmt_mm(x, q["qweight"], q["scales"], q["regs"], None, g, K,
                                                         config=dict(c))
                        default = km.kprmt_mm_config(N, K, g, M)
                    else:
                        def make(c, x=x):
                            return lambda q: km.kgemv(x, q["qweight"], q["scales"], None, q["table"],
                                                      q["curvature"], None, bits, g, K, mode="closed",
                                                      config=dict(c))
                        default = km.kgemv_config(M, N, K, bits, g, sms)
                    key = (kind, bits)
                    first = key not in best_of
                    cfgs = [] if a.quick else (sweep(kind) if first else list(best_of[key]))
                    if default not in cfgs:
                        cfgs.append(default)
                    results = []
                    for c in cfgs:
                        rr = timed(shape, name, M, make(c), kq, ref, base[M], c)
                        if rr is not None:
                            results.append(rr)
                            rows.append(dict(rr, sweep=True))
                    results.sort(key=lambda r: r["us"])
                    if first:
                        best_of[key] = [r["cfg"] for r in results[:3]]
                    if results:
                        record(**results[0])
                        d = [r for r in results if r["cfg"] == default]
                        if d:
                            record(**dict(d[0], variant=name + "-default"))
            del qs, kq, q0
            torch.cuda.empty_cache()
    regs = kernel_registers((km._kprmt_mm_kernel, km._kgemv_kernel, _probe_kernel))
    out = dict(card=torch.cuda.get_device_name(0), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
               torch=torch.__version__, triton=triton.__version__,
               command=" ".join(["python3"] + sys.argv), bound=BOUND, rows=rows, registers=regs)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print_rows(out, rows)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"wall {time.time() - t0:.0f} s")
