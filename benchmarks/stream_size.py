"""Bytes `qins compress --stream` writes for Phi-3.5-mini's shapes, per config, without running it.

    python benchmarks/stream_size.py [--layers 32]

The plan and every output tensor's dtype and shape come from the same code the streamed run
uses (`stream.predicted_bytes`: the plan and output specs on the meta skeleton), so the sum is exact for
model.safetensors' tensor data (its JSON header, ~0.1 MB, and config/tokenizer files are
not counted). GB = 1e9 bytes; GiB beside it.
"""
from __future__ import annotations

import argparse

from qins.codec.config import WeightConfig
from qins.eval.synthetic_checkpoint import phi35_mini_config
from qins.weights.stream import predicted_bytes

CONFIGS = [  # (label, linears, embeddings or None)
    ("4-bit g64, embeddings 6-bit g128 (the compress defaults before log8 scales)", WeightConfig("qins", 4, 64), WeightConfig("qins", 6, 128)),
    ("4-bit g64, embeddings 4-bit g128", WeightConfig("qins", 4, 64), WeightConfig("qins", 4, 128)),
    ("4-bit g128, embeddings 6-bit g128", WeightConfig("qins", 4, 128), WeightConfig("qins", 6, 128)),
    ("4-bit g128, embeddings 5-bit g128", WeightConfig("qins", 4, 128), WeightConfig("qins", 5, 128)),
    ("4-bit g128, embeddings 4-bit g128", WeightConfig("qins", 4, 128), WeightConfig("qins", 4, 128)),
    ("4-bit g64, embeddings bf16", WeightConfig("qins", 4, 64), None),
    ("4-bit g64, embeddings 6-bit g128, log8 scales (the compress defaults)", WeightConfig("qins", 4, 64, scale_dtype="log8"),
     WeightConfig("qins", 6, 128, scale_dtype="log8")),
    ("4-bit g64, embeddings 5-bit g128, log8 scales", WeightConfig("qins", 4, 64, scale_dtype="log8"),
     WeightConfig("qins", 5, 128, scale_dtype="log8")),
    ("4-bit g64, embeddings 5-bit g64, log8 scales", WeightConfig("qins", 4, 64, scale_dtype="log8"),
     WeightConfig("qins", 5, 64, scale_dtype="log8")),
    ("4-bit g64, embeddings 4-bit g64, log8 scales", WeightConfig("qins", 4, 64, scale_dtype="log8"),
     WeightConfig("qins", 4, 64, scale_dtype="log8")),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None)
    a = ap.parse_args(argv)
    config = phi35_mini_config(a.layers)
    print("| config | bytes | GB | GiB | bpw all-in |\n|---|---|---|---|---|")
    for label, cfg, emb in CONFIGS:
        total, n_params = predicted_bytes(config, cfg, embeddings=emb)
        print(f"| {label} | {total:,} | {total / 1e9:.3f} | {total / 2**30:.3f} | {8 * total / n_params:.3f} |")


if __name__ == "__main__":
    main()
