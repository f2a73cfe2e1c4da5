"""Question: how close does each coder get to the order-0 entropy of every tensor of a saved
model, tables included? (issue 14: every coder within 1% of H0 + table overhead)

    PYTHONPATH=src python benchmarks/entropy_coders.py DIR [--out benchmarks/results/entropy_coders]

DIR is a directory written by qins.save / `qins compress` (default model: `qins compress -o DIR`).
Writes OUT.json (every tensor) and OUT.md (summary + worst tensors). Sizes in bytes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time

from qins.entropy import policy

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--out", default="benchmarks/results/entropy_coders")
args = ap.parse_args()

t0 = time.time()
stats = policy.measure(args.dir)
took = time.time() - t0
rows = policy.stats_doc(stats, with_histograms=False)
for s, r in zip(stats, rows):
    r["over_entropy"] = {c: s.over_entropy(c) for c in ("zstd", "ans")}
json.dump({"dir": args.dir, "date": datetime.date.today().isoformat(), "tensors": rows}, open(args.out + ".json", "w"), indent=1)

lines = [f"# Entropy coders vs order-0 entropy, per tensor ({len(stats)} tensors of {args.dir})", "",
         f"{datetime.date.today()}, {platform.processor() or platform.machine()}, python {sys.version.split()[0]}; "
         f"command: `PYTHONPATH=src python {' '.join(sys.argv)}` ({took:.0f} s, machine shared with other jobs).", "",
         "over = coded / (n * H0 / 8 + table) - 1 (table: ANS's histogram and both coders' chunk index; "
         "zstd's own Huffman/FSE tables are inside its frames and counted as payload).", ""]
for tr in ("codes", "shuffle", "bytes"):
    sel = [s for s in stats if s.transform == tr]
    if not sel:
        continue
    raw = sum(s.stored_bytes for s in sel)
    ideal = sum(s.ideal_bytes for s in sel)
    lines += [f"## transform `{tr}`: {len(sel)} tensors, {raw} bytes raw, ideal {ideal:.0f} ({1 - ideal / raw:+.2%} saving)", "",
              "| coder | bytes | saving vs raw | max over H0+table | tensors over 1% |", "|---|---|---|---|---|"]
    for c in ("zstd", "ans"):
        tot = sum(s.coded[c] for s in sel)
        over = [s.over_entropy(c) for s in sel]
        lines.append(f"| {c} | {tot} | {1 - tot / raw:.2%} | {max(over):+.2%} | {sum(o > 0.01 for o in over)} |")
    lines.append("")
    big = [s for s in sel if s.stored_bytes >= 4096 and 1 - s.ideal_bytes / s.stored_bytes >= policy.DEFAULT_THRESHOLD]
    if big:
        lines += [f"Among the {len(big)} tensors of >= 4 KiB whose ideal saving is >= {policy.DEFAULT_THRESHOLD:.0%} "
                  f"(the ones the policy can code): max over H0+table "
                  + ", ".join(f"{c} {max(s.over_entropy(c) for s in big):+.2%}" for c in ("zstd", "ans")), ""]
lines += ["zstd stores literals raw when Huffman would gain little (its minimum-gain rule), so on near-uniform "
          "codes (H0 ~3.9 of 4 bits) it lands 1-2.6% above H0 and saves ~0 against raw; the policy stores those raw. "
          "Tensors of a few bytes (curvatures) pay zstd's frame header.", "",
          "## Every tensor over 1% (any coder)", "", "| tensor | transform | bytes raw | H0 bits | zstd over | ans over |", "|---|---|---|---|---|---|"]
for s in stats:
    if max(s.over_entropy("zstd"), s.over_entropy("ans")) > 0.01:
        lines.append(f"| {s.name} | {s.transform} | {s.stored_bytes} | {s.entropy_bits:.3f} | {s.over_entropy('zstd'):+.2%} | {s.over_entropy('ans'):+.2%} |")
open(args.out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines[:40]))
