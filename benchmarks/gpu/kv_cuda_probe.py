"""Where the CUDA decode-attention kernel's time goes (kernels/cuda_kv.py): the same call with
parts left out, against SDPA (flash) over bf16 and the Triton kernel, in one process.

    PYTHONPATH=$PWD/src python3 benchmarks/gpu/kv_cuda_probe.py [--contexts 4096 32768] [--batches 1 8]

Probes (the result is then wrong; timing only): 1 no values (keys and softmax), 2 no float
segment, 4 no merge launch, 8 the page loads alone (no decode, no math). Same pages, shape and
CUDA-graph timing as kv_attention.py. Writes $OUT/gpu_kv_cuda_probe.json and prints a table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv_attention import HKV, HQ, L2_ROTATE, D, Paged, reference_out, sdpa_fns, time_graph  # noqa: E402

from qins.kernels import cuda_kv  # noqa: E402
from qins.kernels.triton_kv import CUDA_PER_SM, CUDA_SPLIT_TOKENS, splits_for  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="*", default=[4096, 32768])
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8])
    ap.add_argument("--replays", type=int, default=20)
    args = ap.parse_args()
    rows = []
    for T in args.contexts:
        for B in args.batches:
            g = torch.Generator(device="cuda").manual_seed(T + B)
            K = (torch.randn(B, HKV, T, D, device="cuda", generator=g)
                 + torch.randn(1, HKV, 1, D, device="cuda", generator=g) * 2).to(torch.bfloat16)
            V = torch.randn(B, HKV, T, D, device="cuda", generator=g).to(torch.bfloat16)
            q = torch.randn(B, HQ, D, device="cuda", generator=g).to(torch.bfloat16)
            n = max(1, -(-L2_ROTATE // (4 * K.numel())))
            kv = [(K, V)] + [(K.clone(), V.clone()) for _ in range(n - 1)]
            sd = time_graph([dict(sdpa_fns(q, k, v))["sdpa_flash_gqa"] for k, v in kv], max(n, 20), args.replays)
            del kv
            for bits in args.bits:
                pg = Paged(K, V, bits)
                ref = reference_out(q, *pg.decode_reference())
                n = max(1, -(-L2_ROTATE // pg.nbytes()))
                copies = [pg] + [pg.copy() for _ in range(n - 1)]
                splits = splits_for(B, HKV, pg.Q, CUDA_SPLIT_TOKENS, "cuda", per_sm=CUDA_PER_SM)

                def call(c, probe=0, minb=None, s=splits):
                    return cuda_kv.decode(q, c.planes, c.table, c.Q, 1, c.k_offset, c.v_lut, c.k_aff, c.v_aff, bits,
                                          bits, c.G, c.fk, c.fv, D ** -0.5, s, minb=minb, probe=probe)
                err = float((call(pg).float() - ref).abs().max() / ref.abs().max())
                variants = {"triton": lambda c: c.attend(q, cuda=False), "cuda": call}
                for probe in (1, 2, 4, 8, 6, 14):
                    variants[f"probe{probe}"] = lambda c, p=probe: call(c, p)
                variants["minb1"] = lambda c: call(c, minb=1)
                for f in (0.5, 2, 4):
                    s2 = max(1, int(splits * f))
                    variants[f"splits{s2}"] = lambda c, s2=s2: call(c, s=s2)
                row = dict(batch=B, context=T, bits=bits, sdpa_us=sd * 1e3, splits=splits, err=err, us={})
                for name, fn in variants.items():
                    try:
                        row["us"][name] = time_graph([lambda c=c, fn=fn: fn(c) for c in copies], max(n, 20),
                                                     args.replays) * 1e3
                    except Exception as e:                            # noqa: BLE001
                        row["us"][name] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
                del copies, pg
                torch.cuda.empty_cache()
    out = os.path.join(os.environ.get("OUT", "out"), "gpu_kv_cuda_probe.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    meta = dict(card=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                command=" ".join([sys.executable] + sys.argv))
    with open(out, "w") as f:
        json.dump(dict(meta, rows=rows), f, indent=1)
    names = list(rows[0]["us"]) if rows else []
    print(f"# {meta['card']} {meta['date'][:16]}: microseconds per call (SDPA flash over bf16 first)")
    print(f"{'B':>2} {'ctx':>6} {'bits':>4} {'sdpa':>7} " + " ".join(f"{k:>9}" for k in names) + "  err")
    for r in rows:
        vals = " ".join(f"{v:>9.1f}" if isinstance(v, float) else f"{'fail':>9}" for v in r["us"].values())
        print(f"{r['batch']:>2} {r['context']:>6} {r['bits']:>4} {r['sdpa_us']:>7.1f} {vals}  {r['err']:.1e}")


if __name__ == "__main__":
    main()
