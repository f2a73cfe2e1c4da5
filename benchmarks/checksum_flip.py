"""Question: does a saved model with flipped bytes still load? (issue 14: it must not, silently)

    PYTHONPATH=src python benchmarks/checksum_flip.py DIR [--flips 64] [--out benchmarks/results/checksum_flip.md]

Re-saves DIR (a qins.save directory) with this qins (so it records per-tensor checksums), flips
`flips` random bytes inside the tensor data of model.safetensors, and loads it with and
without verification; also times the verification (xxh3_64 over every tensor).
"""
from __future__ import annotations

import argparse
import datetime
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import qins
from qins.weights import serialization

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--flips", type=int, default=64)
ap.add_argument("--out", default="benchmarks/results/checksum_flip.md")
args = ap.parse_args()

tmp = Path(tempfile.mkdtemp()) / "m"
qins.save(qins.load(args.dir), tmp)
f = tmp / serialization.WEIGHTS_NAME
data = bytearray(f.read_bytes())
(n,) = struct.unpack("<Q", data[:8])
header = json.loads(data[8:8 + n])
rng = random.Random(0)
for _ in range(args.flips):
    data[rng.randrange(8 + n, len(data))] ^= 1 << rng.randrange(8)
f.write_bytes(bytes(data))
try:
    qins.load(tmp)
    verified = "loaded (not detected)"
except ValueError as e:
    verified = f"ValueError: {e}"
qins.load(tmp, verify=False)
state = {k: v for k, v in __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(f)).items()}
t0 = time.perf_counter()
for t in state.values():
    serialization.tensor_checksum(t)
t_all = time.perf_counter() - t0
lines = [f"# Flipped bytes in a saved model ({datetime.date.today()})", "",
         f"command: `PYTHONPATH=src python {' '.join(sys.argv)}`", "",
         f"{args.flips} random bit flips in the tensor data of {f.name} ({len(data)} bytes, {len(header) - 1} tensors):", "",
         f"- `qins.load(dir)`: {verified}",
         "- `qins.load(dir, verify=False)`: loads (trusted storage: the damage goes unseen, as before checksums)",
         f"- hashing every tensor ({sum(t.numel() * t.element_size() for t in state.values())} bytes) took "
         f"{t_all:.3f} s (machine shared with other jobs)"]
Path(args.out).write_text("\n".join(lines) + "\n")
print("\n".join(lines))
