"""`qins analyze`: measure every tensor (policy.py) and, optionally, KV pages (kvpages.py); write
the policy `qins pack --policy` applies, a JSON of every figure and a Markdown report.

    OUT/policy.json     {"version", "threshold", "tensors": {name: codec}}
    OUT/analysis.json   {"source", "command", "summary", "tensors": [TensorStats + histogram], "kv"}
    OUT/analysis.md     the summary, the KV page table and one row per tensor
    OUT/analysis.png    saving per tensor, ideal / zstd / ANS (when matplotlib is installed)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .._files import atomic_write
from .policy import DEFAULT_THRESHOLD, TensorStats, decide, measure, stats_doc, summary


def analyze(path: str | os.PathLike, out: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
            cold: tuple[str, ...] = (), kv_tokens: int = 0, kv_bits: int = 4, command: str = "",
            progress=None) -> dict:
    """Measure the saved directory `path`; write policy.json, analysis.json, analysis.md to `out`."""
    out = Path(out)
    stats = measure(path, cold=cold, progress=progress)
    policy = decide(stats, threshold)
    doc = {"source": str(path), "command": command, "threshold": threshold,
           "summary": summary(stats, policy), "tensors": stats_doc(stats)}
    if kv_tokens:
        import torch
        from transformers import AutoTokenizer

        from .kvpages import generation_cache, measure_cache
        from ..weights.serialization import load
        model = load(path)
        tok = AutoTokenizer.from_pretrained(path)
        with torch.inference_mode():
            cache, held = generation_cache(model, tok, tokens=kv_tokens, bits=kv_bits)
        doc["kv"] = {"tokens": held, "bits": kv_bits, "cache_nbytes": cache.nbytes(), "planes": measure_cache(cache)}
    atomic_write(out / "policy.json", json.dumps(policy, indent=1))
    atomic_write(out / "analysis.json", json.dumps(doc, indent=1))
    atomic_write(out / "analysis.md", markdown(doc, stats, policy))
    _plot(stats, out / "analysis.png")
    return doc


def _pct(x: float) -> str:
    return f"{x:+.2%}" if x else "0"


def markdown(doc: dict, stats: list[TensorStats], policy: dict) -> str:
    s = doc["summary"]
    lines = [f"# qins analyze {doc['source']}", "", f"command: `{doc['command']}`", "",
             f"{s['tensors']} tensors, {s['raw_bytes']} bytes raw (bit-packed codes + float tensors). "
             f"Order-0 ideal {s['ideal_bytes']:.0f} bytes ({1 - s['ideal_bytes'] / s['raw_bytes']:.2%} saving); "
             f"zstd on every tensor {s['zstd_bytes']} ({1 - s['zstd_bytes'] / s['raw_bytes']:.2%}), "
             f"ANS on every tensor {s['ans_bytes']} ({1 - s['ans_bytes'] / s['raw_bytes']:.2%}); "
             f"the policy (code a tensor only where it saves >= {doc['threshold']:.0%}) "
             f"{s['policy_bytes']} bytes ({s['policy_saving']:.2%}).", ""]
    lines += ["| group | tensors | raw bytes | ideal saving | zstd saving | ANS saving | policy saving | coded by policy |",
              "|---|---|---|---|---|---|---|---|"]
    groups: dict[str, list[TensorStats]] = {}
    for t in stats:
        key = f"{t.access} {t.transform}" + (f" {t.bits}-bit" if t.bits else "")
        groups.setdefault(key, []).append(t)
    for key, ts in sorted(groups.items()):
        raw = sum(t.stored_bytes for t in ts)
        pol = sum(t.coded[policy["tensors"][t.name]] for t in ts)
        coded = sum(policy["tensors"][t.name] != "raw" for t in ts)
        lines.append(f"| {key} | {len(ts)} | {raw} | {1 - sum(t.ideal_bytes for t in ts) / raw:.2%} | "
                     f"{1 - sum(t.coded['zstd'] for t in ts) / raw:.2%} | {1 - sum(t.coded['ans'] for t in ts) / raw:.2%} | "
                     f"{1 - pol / raw:.2%} | {coded} |")
    if "kv" in doc:
        kv = doc["kv"]
        lines += ["", f"## KV pages: {kv['tokens']} tokens, QINSCache {kv['bits']}-bit, residual 0 "
                      f"(every token in pages); each plane of each sealed page coded on its own (ANS, "
                      f"table per layer: one ANS table per layer and plane, stored once)", "",
                  "| plane | pages | raw bytes | H0 bits/symbol | ideal saving | zstd saving | ANS saving | "
                  "ANS saving, table per layer | RLE saving |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in kv["planes"].items():
            raw = r["raw_bytes"] or 1
            h = f"{r['entropy_bits']:.3f}" if "entropy_bits" in r else ""
            layer = f"{1 - r['ans_layer'] / raw:.2%}" if "ans_layer" in r else ""
            lines.append(f"| {name} | {r['pages']} | {r['raw_bytes']} | {h} | {1 - r['ideal_bytes'] / raw:.2%} | "
                         f"{1 - r['zstd'] / raw:.2%} | {1 - r['ans'] / raw:.2%} | {layer} | "
                         f"{1 - r['rle'] / raw:.2%} |")
    lines += ["", "## Every tensor", "",
              "saving = 1 - bytes / raw bytes; over = coded / (n H0 / 8 + table) - 1", "",
              "| tensor | access | transform | raw bytes | H0 bits | ideal saving | zstd saving (over) | "
              "ANS saving (over) | policy |", "|---|---|---|---|---|---|---|---|---|"]
    for t in stats:
        tr = t.transform + (f" {t.bits}b" if t.bits else "")
        lines.append(f"| {t.name} | {t.access} | {tr} | {t.stored_bytes} | {t.entropy_bits:.3f} | "
                     f"{1 - t.ideal_bytes / t.stored_bytes if t.stored_bytes else 0:.2%} | "
                     f"{t.saving('zstd'):.2%} ({_pct(t.over_entropy('zstd'))}) | "
                     f"{t.saving('ans'):.2%} ({_pct(t.over_entropy('ans'))}) | {policy['tensors'][t.name]} |")
    return "\n".join(lines) + "\n"


def _plot(stats: list[TensorStats], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    big = [t for t in stats if t.stored_bytes >= 4096]
    fig, ax = plt.subplots(figsize=(10, 4))
    x = range(len(big))
    ax.plot(x, [1 - t.ideal_bytes / t.stored_bytes for t in big], ".", label="order-0 ideal", ms=3)
    ax.plot(x, [t.saving("zstd") for t in big], "x", label="zstd", ms=3)
    ax.plot(x, [t.saving("ans") for t in big], "+", label="ANS", ms=3)
    ax.set_xlabel("tensor (>= 4 KiB, file order)")
    ax.set_ylabel("saving vs raw")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
