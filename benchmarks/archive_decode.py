"""Question: how fast does a whole .qins archive decode, and with how many threads?
(issue 14: >= 300 MB/s of codes on the 2-core machine)

    PYTHONPATH=src python benchmarks/archive_decode.py DIR [--repeats 7] [--out benchmarks/results/archive_decode]
        [--threshold 0.05]

Packs DIR (a qins.save directory) with the measured policy, then decodes every tensor
(Archive.tensors) with 1 and 2 threads, `repeats` times each, alternating; reports the median.
MB/s counts decoded tensor bytes (MB = 1e6 bytes): all tensors, and the packed codes alone
(the qweight tensors). Also times qins.load of the archive against qins.load of DIR.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import qins
from qins.entropy import archive

ap = argparse.ArgumentParser()
ap.add_argument("dir")
ap.add_argument("--repeats", type=int, default=7)
ap.add_argument("--out", default="benchmarks/results/archive_decode")
ap.add_argument("--threshold", type=float, default=0.05, help="qins pack's threshold (the policy's rule)")
args = ap.parse_args()

tmp = Path(tempfile.mkdtemp())
qfile = tmp / "model.qins"
t0 = time.perf_counter()
packed = archive.pack(args.dir, qfile, threshold=args.threshold)
pack_s = time.perf_counter() - t0
with archive.Archive(qfile) as a:
    recs = a.records
    total = sum(r["raw_bytes"] for r in recs.values())
    codes = sum(r["raw_bytes"] for n, r in recs.items() if n.endswith(".qweight"))
    coded_codes = sum(r["raw_bytes"] for n, r in recs.items() if n.endswith(".qweight") and r["codec"] != "raw")
    a.tensors(2)                                           # warm the page cache
    times = {1: [], 2: []}
    for _ in range(args.repeats):
        for th in (1, 2):
            t0 = time.perf_counter()
            a.tensors(th)
            times[th].append(time.perf_counter() - t0)
med = {th: statistics.median(v) for th, v in times.items()}
loads = {}
for what, src in (("dir", args.dir), ("archive", qfile)):
    qins.load(src)                                         # warm
    t0 = time.perf_counter()
    qins.load(src)
    loads[what] = time.perf_counter() - t0
dir_bytes = sum(p.stat().st_size for p in Path(args.dir).iterdir() if p.is_file())
doc = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
       "torch_threads": torch.get_num_threads(), "command": "PYTHONPATH=src python " + " ".join(sys.argv),
       "dir_bytes": dir_bytes, "archive_bytes": packed["archive_bytes"], "codecs": packed["codecs"], "pack_s": pack_s,
       "tensor_bytes": total, "code_bytes": codes, "entropy_coded_code_bytes": coded_codes,
       "decode_s": med, "decode_all_MBps": {th: total / s / 1e6 for th, s in med.items()},
       "decode_codes_MBps": {th: codes / s / 1e6 for th, s in med.items()}, "load_s": loads}
json.dump(doc, open(args.out + ".json", "w"), indent=1)
lines = [f"# .qins whole-archive decode ({args.dir})", "",
         f"{doc['date']}, {doc['machine']} (shared with other jobs: figures are medians of {args.repeats}, "
         f"compare within this run); command: `{doc['command']}`", "",
         f"archive {packed['archive_bytes']} bytes vs directory {dir_bytes} ({packed['archive_bytes'] / dir_bytes:.4f}x), "
         f"codecs {packed['codecs']}, packed in {pack_s:.1f} s", "",
         "| threads | decode s | all tensors MB/s | codes (qweight) MB/s |", "|---|---|---|---|"]
for th in (1, 2):
    lines.append(f"| {th} | {med[th]:.3f} | {doc['decode_all_MBps'][th]:.0f} | {doc['decode_codes_MBps'][th]:.0f} |")
lines += ["", f"{codes} bytes of codes ({coded_codes} of them entropy-coded), {total} tensor bytes in all.", "",
          f"qins.load: directory {loads['dir']:.2f} s, archive {loads['archive']:.2f} s (default threads)."]
open(args.out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
