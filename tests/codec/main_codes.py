"""The quantizer outputs that tests/codec/test_device_agnostic.py checks the current code against.

`cases()` lists (key, weight, WeightConfig, importance) on fixed random inputs; `build()`
quantizes each with whatever `qins` is importable and returns the stored tensors. The file
data/main_codes.safetensors was written by commit 9eaea91 (main before quantization ran on
the weight's device, when from_float forced the CPU) with

    PYTHONPATH=<checkout of 9eaea91>/src:tests python -m codec.main_codes tests/codec/data/main_codes.safetensors
"""
from __future__ import annotations

import math
import sys

import torch

from qins.codec import QuantizedWeight
from qins.codec.config import WeightConfig

# (format, bits): 4 and 8 bits where a format has them (nf4: 4 only, fp8: 8 only)
FORMATS = [("qins", 4), ("qins", 8), ("int-sym", 4), ("int-sym", 8), ("int-asym", 4), ("int-asym", 8),
           ("nf4", 4), ("fp8", 8)]
# (name, (O, I), group_size): 352 = 4 * 64 + 96, so the last group of a row takes 96 columns;
# (20, 200) per channel has an odd column count (codes padded to 224 in the packing)
MATRICES = [("gauss", (24, 352), 64), ("laplace", (20, 200), None)]


def _weight(dist: str, shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dist == "gauss":
        w = torch.randn(shape, generator=g) * 0.02
    else:
        u = torch.rand(shape, generator=g) - 0.5
        w = -torch.sign(u) * torch.log1p(-2 * u.abs()) * (0.02 / math.sqrt(2))
    w.view(-1)[::17] = 0.0
    return w


def _hessian(I: int, seed: int) -> torch.Tensor:
    """(I, I) float32 E[x x^T] of correlated inputs with one dead channel (H_jj = 0)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(I, I, generator=g, dtype=torch.float64) / I ** 0.5
    X = torch.randn(2 * I, I, generator=g, dtype=torch.float64) @ A + 0.3 * torch.randn(2 * I, I, generator=g, dtype=torch.float64)
    X[:, 3] = 0.0
    return (X.T @ X / X.shape[0]).float()


def cases():
    out = []
    for i, (dist, shape, gs) in enumerate(MATRICES):
        w = _weight(dist, shape, seed=10 + i)
        H = _hessian(shape[1], seed=20 + i)
        for fmt, bits in FORMATS:
            base = f"{dist}{shape[0]}x{shape[1]}-{fmt}{bits}"
            cfg = WeightConfig(format=fmt, bits=bits, group_size=gs)
            out.append((base, w, cfg, None))
            out.append((base + "-act", w, cfg, torch.diagonal(H).clone()))
            out.append((base + "-gptq", w, cfg.replace(rounding="gptq"), H))
        cfg = WeightConfig(format="qins", bits=4, group_size=gs, curvature="channel")
        out.append((f"{dist}{shape[0]}x{shape[1]}-qins4-channel", w, cfg, None))
        out.append((f"{dist}{shape[0]}x{shape[1]}-qins4-channel-gptq", w, cfg.replace(rounding="gptq"), H))
    return out


def build() -> dict[str, torch.Tensor]:
    tensors = {}
    for key, w, cfg, imp in cases():
        qw = QuantizedWeight.from_float(w, cfg, importance=imp, name=key)
        for name, t in qw.tensors().items():
            tensors[f"{key}.{name}"] = t.cpu().contiguous()
    return tensors


if __name__ == "__main__":
    from safetensors.torch import save_file
    torch.set_num_threads(1)
    save_file(build(), sys.argv[1])
