"""Question: where do saved models land on the size/quality curve against FP32 once packed as a
.qins archive? (issue 14: >= 8x smaller than FP32 on disk at <= +5% ppl; the curve 6x-10x)

    PYTHONPATH=src python benchmarks/archive_curve.py DIR [DIR ...] [--out benchmarks/results/archive_curve]
        [--also code=/path/to/argparse.py legal=/usr/share/common-licenses/GPL-3] [--threshold 0.05]

For each DIR (qins compress output of the default model): the directory's model.safetensors
size, the .qins archive size (measured policy, `qins pack --threshold`, default 5%; tokenizer and configs included),
both as x vs the FP32 size of the same parameters (4 bytes each), and the perplexity of
`qins eval DIR --windows 16 --prompts 0` (the archive restores the same bytes, so the same ppl:
tests/entropy/test_archive.py checks logits are equal).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

from qins.cli import main
from qins.entropy import archive

ap = argparse.ArgumentParser()
ap.add_argument("dirs", nargs="+")
ap.add_argument("--out", default="benchmarks/results/archive_curve")
ap.add_argument("--also", nargs="*", default=[], metavar="NAME=FILE",
                help="also evaluate every DIR on the last 10 windows of these texts (other kinds than the corpus)")
ap.add_argument("--threshold", type=float, default=0.05,
                help="qins pack's threshold: a tensor is entropy-coded where that saves at least this share")
args = ap.parse_args()
also = dict(a.split("=", 1) for a in args.also)

rows = []
tmp = Path(tempfile.mkdtemp())
for d in args.dirs:
    q = tmp / (Path(d).name + ".qins")
    packed = archive.pack(d, q, threshold=args.threshold)
    ev = tmp / (Path(d).name + ".eval.json")
    assert main(["eval", d, "--windows", "16", "--prompts", "0", "--json", str(ev)]) == 0
    r = json.loads(ev.read_text())["rows"][0]
    params = r["params"] if "params" in r else round(r["total_bytes"] * 8 / r["bpw_all"])
    fp32 = 4 * params
    st = (Path(d) / "model.safetensors").stat().st_size
    rows.append({"dir": d, "params": params, "fp32_bytes": fp32, "safetensors_bytes": st,
                 "archive_bytes": packed["archive_bytes"], "codecs": packed["codecs"], "threshold": args.threshold,
                 "x_safetensors": fp32 / st, "x_archive": fp32 / packed["archive_bytes"],
                 "bpw_all": r["bpw_all"], "ppl": r["ppl"], "ppl_ref": r["ppl_ref"],
                 "ppl_increase_pct": r["ppl_increase_pct"], "kl": r["kl"], "windows": r["windows"], "tokens": r["tokens"]})
    for name, path in also.items():
        ev = tmp / f"{Path(d).name}.{name}.json"
        assert main(["eval", d, "--windows", "10", "--prompts", "0", "--text", path, "--json", str(ev)]) == 0
        r = json.loads(ev.read_text())["rows"][0]
        rows[-1][name] = {"text": path, "ppl_increase_pct": r["ppl_increase_pct"], "kl": r["kl"], "ppl_ref": r["ppl_ref"]}
    print(rows[-1], flush=True)
json.dump({"date": datetime.date.today().isoformat(), "command": "PYTHONPATH=src python " + " ".join(sys.argv),
           "rows": rows}, open(args.out + ".json", "w"), indent=1)
lines = [f"# Size vs quality of packed archives ({datetime.date.today()})", "",
         f"command: `PYTHONPATH=src python {' '.join(sys.argv)}`; ppl on {rows[0]['windows']} windows "
         f"({rows[0]['tokens']} tokens) of the default corpus's held-out end, reference ppl {rows[0]['ppl_ref']:.4f}; "
         f"archives packed with threshold {args.threshold:g}", "",
         *([f"also on the last 10 windows of: " + ", ".join(f"{k} = `{v}`" for k, v in also.items()), ""] if also else []),
         "| dir | bpw (all-in) | model.safetensors | x vs FP32 | .qins archive | x vs FP32 | ppl | ppl vs float | KL |"
         + "".join(f" {k} ppl vs float | {k} KL |" for k in also),
         "|---|---|---|---|---|---|---|---|---|" + "---|---|" * len(also)]
for r in rows:
    lines.append(f"| {r['dir']} | {r['bpw_all']:.3f} | {r['safetensors_bytes']} | {r['x_safetensors']:.2f}x | "
                 f"{r['archive_bytes']} | {r['x_archive']:.2f}x | {r['ppl']:.4f} | {r['ppl_increase_pct']:+.2f}% | {r['kl']:.4f} |"
                 + "".join(f" {r[k]['ppl_increase_pct']:+.2f}% | {r[k]['kl']:.4f} |" for k in also))
open(args.out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
