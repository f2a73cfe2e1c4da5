"""qins: calibrated QINS compression of LLM weights and KV cache, measured honestly.

Importing does no work: heavy modules load on first use, and nothing registers with
transformers until `qins.register_transformers()` (or qins.load / qins.save / qins.quantize of
a transformers model) runs.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from ._version import __version__
from .codec.config import FORMAT_VERSION, WeightConfig


_LAZY = {
    "quantize": ("qins.weights.quantize", "quantize"),
    "quantize_to_budget": ("qins.weights.budget", "quantize_to_budget"),
    "plan_table": ("qins.weights.budget", "plan_table"),
    "input_hessians": ("qins.weights.calibration", "input_hessians"),
    "save": ("qins.weights.serialization", "save"),
    "load": ("qins.entropy", "load"),
    "QINSLinear": ("qins.weights.linear", "QINSLinear"),
    "QINSEmbedding": ("qins.weights.linear", "QINSEmbedding"),
    "load_default_model": ("qins.metrics.models", "load_default_model"),
    "load_model": ("qins.metrics.models", "load_model"),
    "default_corpus": ("qins.metrics.models", "default_corpus"),
    "register_transformers": ("qins.weights.hf", "register"),
    "QINSConfig": ("qins.weights.hf", "QINSConfig"),
    "eval": ("qins.eval", None),
    "QINSCache": ("qins.kv.cache", "QINSCache"),
    "KeyPlan": ("qins.kv.plan", "KeyPlan"),
    "calibrate_keys": ("qins.kv.plan", "calibrate_keys"),
    "model_samples": ("qins.kv.plan", "model_samples"),
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
