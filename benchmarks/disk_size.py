"""Bytes on disk of the default model with every tensor quantized (embeddings included).

Question: is the saved directory within 1.05 x params x bpw / 8 bytes?
Run: .venv/bin/python benchmarks/disk_size.py [--bits 8] [--group-size 128]
Writes benchmarks/results/disk_size.md.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
from datetime import date
from pathlib import Path

import torch

import qins
from qins.metrics.memory import memory_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "disk_size.md"))
    a = ap.parse_args()

    tok, model = qins.load_default_model()
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    cfg = qins.WeightConfig("qins", a.bits, a.group_size)
    qins.quantize(model, cfg, include_embeddings=True)
    mem = memory_report(model)
    with tempfile.TemporaryDirectory() as d:
        path = qins.save(model, Path(d) / "m", tokenizer=tok)
        files = {f.name: f.stat().st_size for f in path.iterdir()}
    tensors = files["model.safetensors"]
    total = sum(files.values())
    bound = 1.05 * params * mem["bpw_all"] / 8
    lines = [
        "# Disk size, every tensor quantized",
        "",
        f"Command: `.venv/bin/python benchmarks/disk_size.py --bits {a.bits} --group-size {a.group_size}`",
        f"- machine: {platform.machine()} {platform.system()}, torch {torch.__version__}; date {date.today()}",
        f"- model: SmolLM2-135M-Instruct, {params:,} parameters (tied embedding counted once)",
        f"- config: {cfg.label}, include_embeddings=True (tied lm_head shares the embedding's codes)",
        "",
        "| what | bytes | ratio to params x bpw / 8 |",
        "|---|---|---|",
        f"| params x bpw_all / 8 (bpw_all = {mem['bpw_all']:.4f}) | {params * mem['bpw_all'] / 8:,.0f} | 1.000 |",
        f"| model.safetensors | {tensors:,} | {tensors / (params * mem['bpw_all'] / 8):.4f} |",
        f"| whole directory (config, tokenizer, plan) | {total:,} | {total / (params * mem['bpw_all'] / 8):.4f} |",
        f"| bound 1.05 x params x bpw / 8 | {bound:,.0f} | 1.050 |",
        "",
    ]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
