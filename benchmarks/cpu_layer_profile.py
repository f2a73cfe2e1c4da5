"""Where one generated token's linear-layer time goes on the CPU fast path (issue 16).

    python benchmarks/cpu_layer_profile.py DIR [--threads 2]

DIR: a saved QINS model (e.g. the /tmp/qins_cpu_speed_qins4-g64 that benchmarks/cpu_speed.py
prepares). For every QINSLinear, x of one row (a generated token), weights cache-warm: the
module's forward (Python dispatch included) against the raw extension call with the same
cached arguments, best of 3 loops; summed per layer shape. Wall-clock times on a shared
machine: compare within one run.
"""
from __future__ import annotations

import argparse
import time

import torch


def _best(f, n: int) -> float:
    for _ in range(5):
        f()
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(n):
            f()
        best = min(best, (time.perf_counter() - t) / n)
    return best * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import qins
    from qins import kernels
    from qins.weights.linear import QINSLinear
    if not kernels.cpu.available():
        raise SystemExit(f"no CPU fast path here: {kernels.cpu.why_not()}")
    torch.set_num_threads(args.threads)
    model = qins.load(args.model)
    rows: dict[tuple, list] = {}
    with torch.inference_mode():
        for mod in model.modules():
            if not isinstance(mod, QINSLinear):
                continue
            x = torch.randn(1, 1, mod.in_features)
            src = mod.tied_to if mod.tied_to is not None else mod
            plan = mod._cpu_plan(src, mod.bias)
            n = 40 if mod.out_features < 10000 else 6
            fwd = _best(lambda: mod(x), n)
            raw = _best(lambda: kernels.cpu._State.module.linear(x, *plan), n)
            r = rows.setdefault((mod.out_features, mod.in_features, mod.config.bits), [0, 0.0, 0.0])
            r[0] += 1
            r[1] += fwd
            r[2] += raw
    print(f"{args.model}, {args.threads} thread(s), one row of x")
    print("| out x in | bits | layers | forward us | raw call us | forward ms, all |")
    print("|---|---|---|---|---|---|")
    for (o, i, b), (n, f, r) in rows.items():
        print(f"| {o} x {i} | {b} | {n} | {f / n:.1f} | {r / n:.1f} | {f / 1e3:.2f} |")
    print(f"total: forward {sum(v[1] for v in rows.values()) / 1e3:.2f} ms, "
          f"raw calls {sum(v[2] for v in rows.values()) / 1e3:.2f} ms")


if __name__ == "__main__":
    main()
