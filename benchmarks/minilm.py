"""all-MiniLM-L6-v2: sentence-embedding cosine similarity of quantized encoders to the float one.

Question: on a second real model with genuine float weights, does 4-bit QINS keep the mean
cosine similarity of sentence embeddings to the float model >= 0.99, without data ("none"),
with activation-weighted calibration ("act") and with GPTQ-style rounding ("gptq")?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/minilm.py \
        [--methods none act gptq] [--eval 300] [--calib 256] [--seed 0]

Writes benchmarks/results/minilm.md and minilm.json (rewritten after every row) and prints
the table. Definitions: src/qins/eval/embeddings.py.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from datetime import date
from pathlib import Path

import torch

from qins.codec.config import WeightConfig
from qins.eval.embeddings import (DEFAULT_CONFIGS, METHODS, EmbeddingHarness, format_table,
                                  measure_embeddings)

RESULTS = Path(__file__).parent / "results"


def _config(s: str) -> WeightConfig:
    """'qins:4:64' -> WeightConfig("qins", 4, 64); group 'ch' = per output channel."""
    f, b, g = s.split(":")
    return WeightConfig(f, int(b), None if g == "ch" else int(g))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", type=_config, nargs="+", default=list(DEFAULT_CONFIGS),
                    help="format:bits:group, e.g. qins:4:64 nf4:4:64 int-asym:4:64 qins:8:ch")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--eval", type=int, default=300, help="evaluation sentences (second half of the corpus)")
    ap.add_argument("--calib", type=int, default=256, help="calibration sentences (first half)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "minilm"), help="path without suffix")
    a = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    t0 = time.perf_counter()
    h = EmbeddingHarness.build(n_eval=a.eval, n_calib=a.calib, seed=a.seed)
    meta = {
        "command": ("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/minilm.py " + shlex.join(sys.argv[1:])).strip(),
        "machine": f"{platform.machine()} {platform.system()}, {platform.processor() or 'cpu'}, "
                   f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
        "date": str(date.today()),
        "seed": a.seed,
        **h.describe(),
    }
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    total = len(a.configs) * len(a.methods)

    def write(rows: list[dict]) -> None:
        partial = "" if len(rows) == total else f" (PARTIAL: {len(rows)} of {total} rows)"
        out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
        pool = meta["pooling"]
        lines = [
            "# all-MiniLM-L6-v2: sentence-embedding cosine similarity to the float model",
            "",
            f"Command: `{meta['command']}`",
            "",
            f"- machine: {meta['machine']}",
            f"- date: {meta['date']}",
            f"- model: {meta['model']}; every encoder nn.Linear quantized (36 layers), word/position "
            f"embeddings and LayerNorms left in float",
            f"- embedding: tokenizer (truncation at {pool['max_length']} tokens), BertModel, "
            f"{pool['mode'].replace('_', ' ')} pooling over the attention mask, "
            f"{'L2 normalised' if pool['normalize'] else 'not normalised'} (the package's modules.json)",
            f"- evaluation: {meta['evaluation']} ({meta['eval_tokens']} tokens); "
            f"calibration: {meta['calibration']}; corpus = CPython doc topics (qins.metrics.models.default_corpus), "
            f"split by qins.eval.embeddings.split_sentences (5..60 words, deduplicated), seed {a.seed}{partial}",
            "",
            "Cosine = cosine similarity of each evaluation sentence's embedding to its float embedding; "
            "mean, minimum and 5th percentile over the sentences. bpw counts codes + fp16 scales/offsets "
            "+ curvature of the quantized layers. Methods: none = data-free weight-MSE fit; act = error "
            "weighted by each input channel's mean square on the calibration sentences; gptq = "
            "error-compensating rounding with the full input Hessians (rounding=\"gptq\"). "
            "s = seconds for calibration statistics (first use, then cached) + quantization + "
            "encoding, one CPU thread on a shared machine.",
            "",
            format_table(rows),
            "",
        ]
        out.with_suffix(".md").write_text("\n".join(lines))

    rows = measure_embeddings(a.configs, method=tuple(a.methods), harness=h, on_row=write)
    print(format_table(rows))
    print(f"wrote {out.with_suffix('.md')} and .json in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
