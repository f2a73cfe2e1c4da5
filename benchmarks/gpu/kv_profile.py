"""One decode-attention call per kernel variant, for a profiler (issue 12).

    ncu --clock-control none -k regex:_kv_ python3 benchmarks/gpu/kv_profile.py [--batch 1] [--context 32768]

Builds one paged cache (benchmarks/gpu/kv_attention.Paged, random bf16 K/V, the cache's
defaults per width) and runs the first kernel and the folded one twice each (the second call is
the one to read), then prints each compiled kernel's registers and spills (Triton's report).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kv_attention import HKV, HQ, D, Paged  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--bits", type=int, nargs="*", default=[4, 8])
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    B, T = args.batch, args.context
    K = (torch.randn(B, HKV, T, D, device="cuda", generator=g) * 2).to(torch.bfloat16)
    V = torch.randn(B, HKV, T, D, device="cuda", generator=g).to(torch.bfloat16)
    q = torch.randn(B, HQ, D, device="cuda", generator=g).to(torch.bfloat16)
    from qins.kernels import triton_kv
    for bits in args.bits:
        pg = Paged(K, V, bits)
        for fold in (False, True):
            for _ in range(2):
                pg.attend(q, fold=fold)
            torch.cuda.synchronize()
    for name in ("_kv_decode_kernel", "_kv_fold_kernel"):
        fn = getattr(triton_kv, name)
        for dev_cache in getattr(fn, "device_caches", {}).values():
            for key, k in dev_cache[0].items():
                print(name, "regs", getattr(k, "n_regs", "?"), "spills", getattr(k, "n_spills", "?"),
                      "shared", k.metadata.shared, "warps", k.metadata.num_warps)


if __name__ == "__main__":
    main()
