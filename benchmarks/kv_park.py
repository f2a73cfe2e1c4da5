"""What parking a QINSCache's pages entropy-coded in host memory saves (issue 14's KV offload).

    PYTHONPATH=src python benchmarks/kv_park.py [--tokens 4096] [--bits 4] [--out benchmarks/results/kv_park]

The default model (float) prefills `tokens - 64` tokens of the default corpus into a QINSCache
(residual 0: every token in pages) and generates 64 greedily (entropy.kvpages.generation_cache,
as `qins analyze --kv-tokens`); then `park` codes every layer's page pool (per plane, the
policy rule: the smaller of zstd and ANS where it saves >= 5%, else raw) and frees it, and
`unpark` restores it, checked bit for bit against a copy taken before. Writes OUT.json and
OUT.md (raw vs coded bytes per plane, codecs chosen, park / unpark seconds).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import time

import torch

import qins
from qins.entropy.kvpages import generation_cache, park, unpark
from qins.kv.store import PagePool


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/kv_park")
    a = ap.parse_args(argv)
    tok, model = qins.load_default_model()
    t0 = time.perf_counter()
    cache, held = generation_cache(model, tok, a.tokens, 64, a.bits)
    gen_s = time.perf_counter() - t0
    before = [{n: getattr(layer.pool, n).clone() for n in PagePool.PLANES if getattr(layer.pool, n) is not None}
              for layer in cache.layers]
    pool_bytes = sum(layer.pool.nbytes() for layer in cache.layers)
    parked = park(cache)
    t1 = time.perf_counter()
    unpark(cache, parked)
    unpark_s = time.perf_counter() - t1
    exact = all(torch.equal(getattr(layer.pool, n), t) for layer, planes in zip(cache.layers, before)
                for n, t in planes.items())
    s = parked.summary()
    res = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
               machine=f"{platform.machine()}, {torch.get_num_threads()} torch threads",
               command=f"PYTHONPATH=src python benchmarks/kv_park.py --tokens {a.tokens} --bits {a.bits}",
               tokens=held, bits=a.bits, pool_bytes=pool_bytes, generate_seconds=gen_s, park_seconds=parked.seconds,
               unpark_seconds=unpark_s, exact=exact, planes=s)
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    lines = [f"# Parking a QINSCache's pages entropy-coded ({a.bits}-bit, {held} tokens, default model)", "",
             f"Command: `{res['command']}`, {res['date']}, this 2-core machine ({res['machine']}).", "",
             "| plane | raw bytes | coded bytes | saving | codecs (layers) |", "|---|---|---|---|---|"]
    for name, r in s.items():
        lines.append(f"| {name} | {r['raw_bytes']} | {r['coded_bytes']} | {100 * r['saving']:.2f}% | "
                     + ", ".join(f"{k} {v}" for k, v in sorted(r["codecs"].items())) + " |")
    mb = s["total"]["raw_bytes"] / 1e6
    lines += ["", f"Pools before parking: {pool_bytes} bytes (allocated pages, free or not); park "
              f"{parked.seconds:.2f} s ({mb / parked.seconds:.0f} MB/s of pages), unpark {unpark_s:.2f} s "
              f"({mb / unpark_s:.0f} MB/s); every page restored bit for bit: {exact}."]
    open(a.out + ".md", "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
