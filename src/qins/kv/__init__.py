"""kv: QINSCache, a paged, bit-packed KV cache for transformers.

    config.py  KVConfig            codec.py   the KV quantizer (keys per channel, values per token)
    layout.py  packed token rows   store.py   the page pool and block tables of one layer
    layer.py   QINSLayer (state)   cache.py   QINSCache (the transformers adapter)
    plan.py    key plans (calibrated per-channel key widths)
    attention.py  which path reads a layer (Triton kernels or the reference), paged attention
"""
from .config import KVConfig, parse_kv_bits

__all__ = ["KVConfig", "KeyPlan", "QINSCache", "QINSLayer", "calibrate_keys", "model_samples", "parse_kv_bits"]


def __getattr__(name):
    if name == "QINSCache":
        from .cache import QINSCache
        return QINSCache
    if name == "QINSLayer":
        from .layer import QINSLayer
        return QINSLayer
    if name in ("KeyPlan", "calibrate_keys", "model_samples"):
        from . import plan
        return getattr(plan, name)
    raise AttributeError(f"module 'qins.kv' has no attribute {name!r}")
