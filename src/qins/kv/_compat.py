"""The few transformers names QINSCache needs that moved between the supported versions
(`qins._compat.SUPPORTED_TRANSFORMERS`)."""
from __future__ import annotations

import contextlib


def layer_types(config) -> tuple[list[str], list[dict]]:
    """(layer type, init kwargs) per decoder layer, from transformers' own helper.

    transformers 5.2x returns one kwargs dict per layer; earlier 5.x (measured on 5.17)
    returns one dict shared by all layers (e.g. {} or {"sliding_window": N}), which is
    spread here over the sliding and chunked layers that take it."""
    from transformers.cache_utils import get_layer_types_and_kwargs
    types, kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    types = list(types)
    if isinstance(kwargs, dict):
        kwargs = [dict(kwargs) if t in ("sliding_attention", "chunked_attention") else {} for t in types]
    return types, list(kwargs)


def other_layer(layer_type: str, kwargs: dict):
    """transformers' own (uncompressed) dynamic layer for a type QINSCache does not compress
    (linear-attention, hybrid, indexed, dummy KV-sharing layers), or None when unknown."""
    from transformers import cache_utils
    cls = getattr(cache_utils, "DYNAMIC_LAYER_TYPE_MAPPING", {}).get(layer_type)
    return None if cls is None else cls(**kwargs)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, KV heads, head dim) of a decoder config."""
    c = config.get_text_config(decoder=True)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_hidden_layers, heads, head_dim


@contextlib.contextmanager
def attention_hook(model, name: str, fn):
    """Route every attention call of `model` through fn(module, q, k, v, mask, **kw) while
    inside the block (registered in transformers' AttentionInterface as `name`), restoring
    each config's implementation after. fn sees q, k, v after RoPE, as a cache does."""
    from transformers import AttentionInterface
    AttentionInterface.register(name, fn)
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    before = [getattr(c, "_attn_implementation", None) for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b
