"""kv: QINSCache, a paged, bit-packed KV cache for transformers (see cache.py, pages.py)."""
from .config import KVConfig, parse_kv_bits

__all__ = ["KVConfig", "QINSCache", "QINSLayer", "parse_kv_bits"]


def __getattr__(name):
    if name in ("QINSCache", "QINSLayer"):
        from . import cache
        return getattr(cache, name)
    raise AttributeError(f"module 'qins.kv' has no attribute {name!r}")
