"""kv: QINSCache, a paged, bit-packed KV cache for transformers (see cache.py, pages.py, plan.py)."""
from .config import KVConfig, parse_kv_bits

__all__ = ["KVConfig", "KeyPlan", "QINSCache", "QINSLayer", "calibrate_keys", "parse_kv_bits"]


def __getattr__(name):
    if name in ("QINSCache", "QINSLayer"):
        from . import cache
        return getattr(cache, name)
    if name in ("KeyPlan", "calibrate_keys"):
        from . import plan
        return getattr(plan, name)
    raise AttributeError(f"module 'qins.kv' has no attribute {name!r}")
