"""Measure before compressing: per-tensor statistics, the coders' real sizes, the hot/cold policy.

For every tensor of a saved directory (weights/serialization.py) `measure` records

    name, dtype, shape, transform, bits     what the tensor is and how it becomes symbols
    stored_bytes                            its bytes in model.safetensors (raw packing)
    n, alphabet, histogram                  the symbol stream (symbols.py)
    entropy_bits                            order-0 entropy, bits per symbol
    ideal_bytes                             n * H0 / 8: what an ideal order-0 coder needs
    coded {codec: bytes}                    the real blob size of each coder, tables included
    table {codec: bytes}                    the part of it that is tables and chunk index
    access                                  hot (read whole every forward) or cold (rows
                                            gathered: embeddings), or user-marked

and `decide` turns the measurements into the policy `pack` applies: a tensor is entropy-coded
only where the best coder's measured saving against raw is >= `threshold` (default 5%).
Among coders within 1% of each other the faster one wins (zstd: its Huffman stage decodes
several times faster than constriction's ANS, benchmarks/results/entropy_coders.md).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import coders
from .stats import entropy_bits, histogram
from .symbols import choose_transform, to_symbols

POLICY_VERSION = 1
DEFAULT_THRESHOLD = 0.05
SPEED_ORDER = ("raw", "zstd", "ans")          # fastest decode first


@dataclass
class TensorStats:
    name: str
    dtype: str
    shape: list[int]
    transform: str
    bits: int | None
    stored_bytes: int
    n: int
    alphabet: int
    entropy_bits: float
    ideal_bytes: float
    coded: dict[str, int]
    table: dict[str, int]
    access: str
    histogram: list[int] = field(repr=False, default_factory=list)

    def saving(self, codec: str) -> float:
        """Measured saving of `codec` against the raw stored bytes (0.1 = 10% smaller)."""
        return 1.0 - self.coded[codec] / self.stored_bytes if self.stored_bytes else 0.0

    def over_entropy(self, codec: str) -> float:
        """coded / (ideal + table) - 1: how far a coder is from order-0 entropy plus its table."""
        ideal = self.ideal_bytes + self.table[codec]
        return self.coded[codec] / ideal - 1.0 if ideal else 0.0


def access_of(name: str, cold: tuple[str, ...] = ()) -> str:
    """cold: rows gathered (embeddings) or user-marked; hot: read whole every forward."""
    if "embed" in name or any(c in name for c in cold):
        return "cold"
    return "hot"


def measure_tensor(name: str, t: torch.Tensor, bits_of: dict[str, int], codecs=("zstd", "ans"),
                   cold: tuple[str, ...] = ()) -> TensorStats:
    transform, bits = choose_transform(name, t, bits_of)
    sym, alphabet = to_symbols(t, transform, bits)
    counts = histogram(sym, alphabet)
    coded = {"raw": t.numel() * t.element_size()}
    table = {"raw": 0}
    for c in codecs:
        coded[c] = len(coders.encode(sym, c, alphabet, level=coders.level_for(transform, sym.size)))
        table[c] = coders.table_bytes(c, alphabet, sym.size)
    h = entropy_bits(counts)
    return TensorStats(name, str(t.dtype).replace("torch.", ""), list(t.shape), transform, bits,
                       coded["raw"], int(sym.size), alphabet, h, sym.size * h / 8, coded, table,
                       access_of(name, cold), counts.tolist())


def bits_of_plan(modules: dict) -> dict[str, int]:
    """{module name: bits} of the quantized modules of a qins plan."""
    return {m: e["config"]["bits"] for m, e in modules.items() if isinstance(e, dict) and "config" in e}


def measure(path: str | os.PathLike, codecs=("zstd", "ans"), cold: tuple[str, ...] = (),
            progress=None) -> list[TensorStats]:
    """TensorStats of every tensor in a saved directory's model.safetensors (one at a time)."""
    from safetensors import safe_open

    from ..weights.plan import read_plan
    from ..weights.serialization import WEIGHTS_NAME

    path = Path(path)
    bits_of = bits_of_plan(read_plan(path)["modules"])
    out = []
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as f:
        names = list(f.keys())
        for name in (progress(names) if progress else names):
            out.append(measure_tensor(name, f.get_tensor(name), bits_of, codecs, cold))
    return out


def choose(coded: dict[str, int], raw_bytes: int, threshold: float = DEFAULT_THRESHOLD) -> str:
    """The codec for one tensor from its measured blob sizes {codec: bytes}: raw unless the
    smallest saves >= threshold of raw_bytes; then the fastest within 1% of the smallest."""
    sizes = {c: b for c, b in coded.items() if c != "raw"}
    if not sizes or not raw_bytes:
        return "raw"
    best = min(sizes, key=sizes.get)
    if 1.0 - sizes[best] / raw_bytes < threshold:
        return "raw"
    return next(c for c in SPEED_ORDER if c in sizes and sizes[c] <= sizes[best] * 1.01)


def decide(stats: list[TensorStats], threshold: float = DEFAULT_THRESHOLD) -> dict:
    """The policy: {"version", "threshold", "tensors": {name: codec}} from measured sizes."""
    return {"version": POLICY_VERSION, "threshold": threshold,
            "tensors": {s.name: choose(s.coded, s.stored_bytes, threshold) for s in stats}}


def read_policy(path: str | os.PathLike) -> dict:
    doc = json.loads(Path(path).read_text())
    if not isinstance(doc, dict) or doc.get("version") != POLICY_VERSION or not isinstance(doc.get("tensors"), dict):
        raise ValueError(f"{path}: not a qins entropy policy of version {POLICY_VERSION}")
    bad = {k: v for k, v in doc["tensors"].items() if v not in coders.CODECS}
    if bad:
        raise ValueError(f"{path}: unknown codecs {bad}; known: {coders.CODECS}")
    return doc


def stats_doc(stats: list[TensorStats], with_histograms: bool = True) -> list[dict]:
    rows = []
    for s in stats:
        d = asdict(s)
        if not with_histograms:
            d.pop("histogram")
        rows.append(d)
    return rows


def summary(stats: list[TensorStats], policy: dict) -> dict:
    """Whole-model totals: raw bytes, bytes under the policy, and each coder applied to all."""
    raw = sum(s.stored_bytes for s in stats)
    chosen = sum(s.coded[policy["tensors"][s.name]] for s in stats)
    out = {"tensors": len(stats), "raw_bytes": raw, "policy_bytes": chosen,
           "policy_saving": 1 - chosen / raw if raw else 0.0,
           "ideal_bytes": float(sum(s.ideal_bytes for s in stats))}
    for c in ("zstd", "ans"):
        if all(c in s.coded for s in stats):
            out[f"{c}_bytes"] = sum(s.coded[c] for s in stats)
    return out

