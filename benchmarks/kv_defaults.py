"""Choose QINSCache's per-width defaults on calibration windows, never on evaluation windows.

For each key/value width, every candidate setting runs with the cache in the loop (chunked
prefill of 32 tokens, residual 0, so every token is read back from codes) on the FIRST
windows of the default corpus; `qins eval`, `qins compare` and the README report on the
LAST windows, so the choice never sees the text it is reported on. The rule, fixed before
measuring: the lowest perplexity (the KV issue's target), ties (within 0.05 points of
percent) going to the simpler setting (curvature 0, then the larger group).

    OMP_NUM_THREADS=2 python benchmarks/kv_defaults.py --windows 4 --out benchmarks/results/kv_defaults

Writes OUT.json (every measured row and the choice per width) and OUT.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import shlex
import sys

import torch
from tqdm.auto import tqdm

import qins
from qins.kv.cache import QINSCache
from qins.kv.config import KVConfig
from qins.metrics.quality import Reference, evaluate, token_windows
from qins.metrics.render import Column, markdown_table, write_json
from qins.metrics.rows import quality_row
from qins._files import atomic_write

TIE = 0.05          # percentage points of perplexity


def candidates(bits: int) -> list[dict]:
    """The settings compared at one width (value curvature; key group where it varies)."""
    out = [dict(v_curvature=a) for a in (0.0, 0.5, 1.0)]
    if bits in (3, 4, 5):
        out += [dict(v_curvature=None, group=g) for g in (64, 128)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kv_defaults.py")
    ap.add_argument("--windows", type=int, default=4, help="calibration windows (from the start of the corpus)")
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 3, 4, 5, 6])
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--out", default="benchmarks/results/kv_defaults")
    a = ap.parse_args(argv)
    command = "python benchmarks/kv_defaults.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    tok, model = qins.load_default_model()
    windows = token_windows(tok, qins.default_corpus(), 512, max_windows=a.windows)
    ref = Reference.build(model, windows, progress=False)
    rows, choice = [], {}
    jobs = [(b, c) for b in a.bits for c in candidates(b)]
    for bits, fields in tqdm(jobs, desc="kv defaults"):
        cfg = KVConfig(k_bits=bits, residual=0, **fields)
        q = evaluate(model, ref, 4, False, make_cache=lambda: QINSCache(model, config=cfg), chunk=a.chunk)
        rows.append(quality_row(f"{bits} bits, " + ", ".join(f"{k} {v}" for k, v in fields.items()), q,
                                bits=bits, setting=fields, v_curvature=cfg.curvature_for(cfg.v_bits, "v"),
                                group=cfg.group_for(bits)))
        tqdm.write(markdown_table(rows[-1:], COLUMNS).splitlines()[-1])
    for bits in a.bits:
        mine = [r for r in rows if r["bits"] == bits]
        best = min(r["ppl_increase_pct"] for r in mine)
        # simplest within the tie: curvature 0 first, then the larger group
        ok = sorted((r for r in mine if r["ppl_increase_pct"] <= best + TIE),
                    key=lambda r: (r["v_curvature"], -r["group"]))
        choice[bits] = {"v_curvature": ok[0]["v_curvature"], "group": ok[0]["group"], "label": ok[0]["label"]}
    meta = {"command": command, "date": datetime.date.today().isoformat(),
            "windows": f"windows 0..{a.windows - 1} of the default corpus ({ref.tokens} predicted tokens)",
            "ppl_ref": ref.ppl, "machine": f"{platform.machine()}, torch {torch.__version__}, "
                                           f"{torch.get_num_threads()} threads"}
    write_json(a.out + ".json", {"meta": meta, "rows": rows, "choice": choice})
    md = [f"# QINSCache defaults chosen on calibration windows ({meta['date']})", "", f"Command: `{command}`", "",
          f"Calibration text: {meta['windows']}, disjoint from the evaluation windows (the corpus's last). "
          f"Cache in the loop, residual 0, chunked prefill of {a.chunk}. Reference perplexity {ref.ppl:.4f}. "
          f"Rule: lowest perplexity, ties within {TIE} points to curvature 0 and the larger group.", "",
          markdown_table(rows, COLUMNS), "", "Chosen:", ""]
    md += [f"- {b} bits: value curvature {c['v_curvature']}, key group {c['group']}" for b, c in choice.items()]
    atomic_write(a.out + ".md", "\n".join(md) + "\n")
    print("\n".join(md[-len(choice):]))
    return 0


COLUMNS = (Column("label", "setting", left=True), Column("ppl", "ppl", "{:.4f}"),
           Column("ppl_increase_pct", "vs ref %", "{:+.2f}"), Column("kl", "KL", "{:.4f}"),
           Column("top1", "top-1 %", lambda r: f"{100 * r['top1']:.2f}"))

if __name__ == "__main__":
    raise SystemExit(main())
