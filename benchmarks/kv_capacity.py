"""Tokens a fixed KV memory budget holds: QINSCache pages against a bf16 cache (issue 12).

    PYTHONPATH=src python benchmarks/kv_capacity.py [--heads 8] [--head-dim 128] [--budgets-mib 64 256 1024]

Per layer and sequence, for the Llama-3-8B KV shape by default (8 KV heads, head dim 128): a
bf16 cache holds budget / (2 H D 2 bytes) tokens. A QINSLayer with the cache's defaults per
width (kv/config.py: key group, zero points, page_kb) keeps its float segment (the residual
window, up to G - 1 staging tokens and the sink copies, in bf16) and fills the rest of the budget
with whole pages; the bytes of one page are those of a real `PagePool` of one page (every plane,
scales and zero points included), allocated here. Nothing is estimated: pages x page tokens +
the float segment's tokens. Prints a Markdown table; --json writes the rows.
"""
from __future__ import annotations

import argparse
import json

from qins.kv.config import KVConfig
from qins.kv.store import PagePool, page_tokens


def capacity(bits: int, H: int, D: int, budget: int) -> dict:
    cfg = KVConfig(k_bits=bits)
    G = cfg.group_for(bits)
    kz, vz = cfg.zero_for(bits, "k"), cfg.zero_for(bits, "v")
    P = page_tokens(cfg.page_kb, H, D, bits, bits, G, kz, vz)
    pool = PagePool(H, D, P, G, bits, bits, "cpu", k_zero=kz, v_zero=vz, pages=1)
    pb = pool.page_nbytes()
    float_tokens = cfg.residual + G - 1 + cfg.sink
    float_bytes = float_tokens * 2 * H * D * 2
    pages = max(0, (budget - float_bytes) // pb)
    tokens = pages * P + float_tokens
    bf16 = budget // (2 * H * D * 2)
    return dict(bits=bits, group=G, page_tokens=P, page_bytes=pb, bytes_per_paged_token=pb / P,
                float_tokens=float_tokens, budget=budget, pages=pages, tokens=tokens, bf16_tokens=bf16,
                ratio=tokens / bf16)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--bits", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--budgets-mib", type=int, nargs="*", default=[64, 256, 1024])
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    rows = [capacity(b, a.heads, a.head_dim, m << 20) for m in a.budgets_mib for b in a.bits]
    print("| budget per layer | bits | key group | page tokens | bytes per paged token | tokens | bf16 tokens | x bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['budget'] >> 20} MiB | {r['bits']} | {r['group']} | {r['page_tokens']} | "
              f"{r['bytes_per_paged_token']:.0f} | {r['tokens']} | {r['bf16_tokens']} | {r['ratio']:.2f} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
