"""Launch sweep of the paged decode-attention kernel, with a load-only probe (issue 12).

    PYTHONPATH=$PWD/src python3 benchmarks/gpu/kv_sweep.py [--contexts 32768] [--batches 1 8]

Why: the kernel reached 106-814 GB/s of a 4.2 TB/s card (gpu_kv_attention.md), and 8-bit
pages (twice the bytes) ran as fast as 4-bit ones, so it is bound by latency or per-tile
work, not bytes. This separates the two:
- `probe_load`: a kernel with the attention kernel's grid and page walk that only loads the
  K and V code tiles and the scales (and folds them into one word per program so that the
  loads stay): the bandwidth this access pattern can reach at each launch;
- the attention kernel over splits (programs per SM), tokens per tile, warps and stages.
Each is timed with CUDA graphs over copies of the cache (kv_attention.time_graph), against SDPA
(flash) over bf16 in the same process. Writes $OUT/gpu_kv_sweep.json, prints a table last.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv_attention import HKV, HQ, D, L2_ROTATE, Paged, reference_out, sdpa_fns, time_graph  # noqa: E402


NAMES = ("kernel", "fold", "fold_noasm")
LAUNCH = (dict(fold=False), dict(fold=True, asm=True), dict(fold=True, asm=False))


@triton.jit
def _probe_load(kc_ptr, ks_ptr, vc_ptr, vs_ptr, table_ptr, out_ptr, H, Q, P, COLS, TPS,
                G: tl.constexpr, W: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    tt = tl.arange(0, BLOCK_T)
    w = tl.arange(0, W)
    d = tl.arange(0, 128)
    acc = tl.zeros((BLOCK_T, W), tl.int32)
    facc = tl.zeros((128,), tl.float32)
    start = pid_s * TPS
    end = tl.minimum(start + TPS, Q)
    for t0 in range(start, end, BLOCK_T):
        page = tl.load(table_ptr + b * COLS + t0 // P).to(tl.int64)
        slot = t0 % P
        base = page * H + h
        ok = (t0 + tt) < end
        kw = tl.load(kc_ptr + (base * P + slot + tt)[:, None] * W + w[None, :], mask=ok[:, None], other=0)
        vw = tl.load(vc_ptr + (base * P + slot + tt)[:, None] * W + w[None, :], mask=ok[:, None], other=0)
        acc ^= kw ^ vw
        facc += tl.load(ks_ptr + (base * (P // G) + slot // G) * 128 + d).to(tl.float32)
        facc += tl.sum(tl.load(vs_ptr + base * P + slot + tt, mask=ok, other=0.0).to(tl.float32), 0)
    tot = tl.reduce(tl.reshape(acc, (BLOCK_T * W,)), 0, _xor) + tl.sum(facc, 0).to(tl.int32)
    tl.store(out_ptr + pid_bh * tl.num_programs(1) + pid_s, tot)


@triton.jit
def _xor(a, b):
    return a ^ b


def probe(pg: Paged, splits: int, block_t: int, num_warps: int):
    kc, ks, _, vc, vs, _ = pg.planes
    B = pg.table.shape[0]
    tps = -(-(-(-pg.Q // splits)) // block_t) * block_t
    out = torch.empty(B * HKV * splits, dtype=torch.int32, device=kc.device)

    def f():
        _probe_load[(B * HKV, splits)](kc, ks, vc, vs, pg.table, out, HKV, pg.Q, pg.P, pg.table.shape[1], tps,
                                       G=pg.G, W=kc.shape[3], BLOCK_T=block_t, num_warps=num_warps)
        return out
    return f


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="*", default=[32768])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--per-sm", type=int, nargs="*", default=[2, 4, 8, 16], help="programs per SM (splits)")
    ap.add_argument("--tiles", type=int, nargs="*", default=[32, 64, 128])
    ap.add_argument("--warps", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--stages", type=int, nargs="*", default=[1, 2, 3])
    ap.add_argument("--replays", type=int, default=10)
    ap.add_argument("--kernels", type=int, nargs="*", default=[0, 1, 2],
                    help="0: the first kernel, 1: the folded one, 2: the folded one without inline PTX decode")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    out_path = args.json or os.path.join(os.environ.get("OUT", "out"), "gpu_kv_sweep.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    meta = dict(card=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                torch=torch.__version__, triton=triton.__version__, command=" ".join([sys.executable] + sys.argv),
                sms=sms)
    rows = []
    t0 = time.time()
    for T, B in itertools.product(args.contexts, args.batches):
        g = torch.Generator(device="cuda").manual_seed(T + B)
        K = (torch.randn(B, HKV, T, D, device="cuda", generator=g) * 2).to(torch.bfloat16)
        V = torch.randn(B, HKV, T, D, device="cuda", generator=g).to(torch.bfloat16)
        q = torch.randn(B, HQ, D, device="cuda", generator=g).to(torch.bfloat16)
        n = max(1, -(-L2_ROTATE // (4 * K.numel())))
        copies = [(K, V)] + [(K.clone(), V.clone()) for _ in range(n - 1)]
        sd = min(time_graph([dict(sdpa_fns(q, k, v))[name] for k, v in copies], max(n, 8), args.replays)
                 for name in ("sdpa_flash_gqa", "sdpa_flash_folded"))
        rows.append(dict(batch=B, context=T, variant="sdpa", ms=sd, bytes=4 * K.numel()))
        print(rows[-1], file=sys.stderr, flush=True)
        del copies
        for bits in args.bits:
            pg = Paged(K, V, bits)
            nb = pg.nbytes()
            n = max(1, -(-L2_ROTATE // nb))
            pgs = [pg] + [pg.copy() for _ in range(n - 1)]
            Kr, Vr = pg.decode_reference()
            ref = reference_out(q, Kr, Vr)
            del Kr, Vr
            chk = {}
            for kern in args.kernels:
                try:
                    got = pg.attend(q, **LAUNCH[kern]).float()
                    chk[NAMES[kern]] = float((got - ref).abs().max() / ref.abs().max())
                except Exception as e:                                 # noqa: BLE001
                    chk[NAMES[kern]] = f"{type(e).__name__}: {e}"[:300]
            rows.append(dict(batch=B, context=T, bits=bits, variant="check", check=chk))
            print(rows[-1], file=sys.stderr, flush=True)
            for per_sm, bt, nw in itertools.product(args.per_sm, args.tiles, args.warps):
                if pg.G % bt:
                    continue
                splits = max(1, min(-(-per_sm * sms // (B * HKV)), -(-pg.Q // bt)))
                base = dict(batch=B, context=T, bits=bits, per_sm=per_sm, splits=splits, block_t=bt, warps=nw,
                            bytes=nb)
                try:
                    ms = time_graph([probe(p, splits, bt, nw) for p in pgs], max(n, 8), args.replays)
                    rows.append(dict(base, variant="probe_load", ms=ms, gbps=nb / ms / 1e6, x_sdpa=sd / ms))
                except Exception as e:                                 # noqa: BLE001
                    rows.append(dict(base, variant="probe_load", error=f"{type(e).__name__}: {e}"[:300]))
                for st, kern in itertools.product(args.stages, args.kernels):
                    var = NAMES[kern]
                    if (not kern and bt > 64) or (not kern and per_sm > 4):
                        continue
                    try:
                        ms = time_graph([lambda p=p: p.attend(q, splits=splits, block_t=bt, num_warps=nw,
                                                              num_stages=st, **LAUNCH[kern]) for p in pgs],
                                        max(n, 8), args.replays)
                        rows.append(dict(base, variant=var, stages=st, ms=ms, gbps=nb / ms / 1e6, x_sdpa=sd / ms))
                    except Exception as e:                             # noqa: BLE001
                        rows.append(dict(base, variant=var, stages=st, error=f"{type(e).__name__}: {e}"[:300]))
                print({k: v for k, v in rows[-1].items()}, file=sys.stderr, flush=True)
            del pgs, pg
            torch.cuda.empty_cache()
        with open(out_path, "w") as f:
            json.dump(dict(meta, rows=rows, seconds=time.time() - t0), f, indent=1)
    print(f"# kv sweep, {meta['card']}, {meta['date'][:16]}; JSON {out_path}")
    for B, T, bits in itertools.product(args.batches, args.contexts, args.bits):
        sel = [r for r in rows if r.get("batch") == B and r.get("context") == T and r.get("bits") == bits]
        for var in ("probe_load", *NAMES):
            rr = sorted([r for r in sel if r["variant"] == var and "ms" in r], key=lambda r: r["ms"])
            if rr:
                r = rr[0]
                print(f"b{B} T{T} {bits}b {var:10s} best {r['ms'] * 1e3:7.1f} us {r['gbps']:6.0f} GB/s x_sdpa "
                      f"{r['x_sdpa']:.2f}  per_sm {r['per_sm']} tile {r['block_t']} warps {r['warps']} "
                      f"stages {r.get('stages')}")
        err = [r for r in sel if "check" in r]
        for r in err:
            print(f"b{B} T{T} {bits}b check {r['check']}")


if __name__ == "__main__":
    main()
