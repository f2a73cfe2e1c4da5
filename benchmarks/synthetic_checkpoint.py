"""Write a synthetic Phi-3.5-mini-instruct checkpoint (real shapes, random heavy-tailed weights).

    python benchmarks/synthetic_checkpoint.py OUT_DIR [--layers N] [--hidden H] [--seed S]

Full size by default: 32 layers, hidden 3072, 3.82B parameters, ~7.6 GB of bf16 in ~2 GB
shards, written one tensor at a time (qins.eval.synthetic_checkpoint).
"""
from __future__ import annotations

import argparse

from qins.eval.synthetic_checkpoint import expected_tensors, phi35_mini_config, write_checkpoint


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 32)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default 3072; heads = hidden / 96)")
    ap.add_argument("--intermediate", type=int, default=None, help="MLP width (default 8192, or ~8/3 hidden)")
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32064)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gb", type=float, default=2.0)
    a = ap.parse_args(argv)
    config = phi35_mini_config(a.layers, a.hidden, a.intermediate, a.heads, a.vocab)
    n = sum(s.nbytes // s.dtype.itemsize for s in expected_tensors(config))
    print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size}: {n / 1e9:.3f}B parameters")
    write_checkpoint(a.out, config, seed=a.seed, shard_bytes=int(a.shard_gb * 1e9))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
