"""qins: calibrated QINS compression of LLM weights and KV cache, measured honestly.

Importing does no work: heavy modules load on first use.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import FORMAT_VERSION, WeightConfig

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("qins.weights.quantize", "quantize"),
    "save": ("qins.weights.serialization", "save"),
    "load": ("qins.weights.serialization", "load"),
    "QINSLinear": ("qins.weights.linear", "QINSLinear"),
    "QINSEmbedding": ("qins.weights.linear", "QINSEmbedding"),
    "load_default_model": ("qins.models", "load_default_model"),
    "load_model": ("qins.models", "load_model"),
    "default_corpus": ("qins.models", "default_corpus"),
    "eval": ("qins.eval", None),
}

__all__ = ["WeightConfig", "FORMAT_VERSION", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = import_module(mod)
        value = m if attr is None else getattr(m, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qins' has no attribute {name!r}")
