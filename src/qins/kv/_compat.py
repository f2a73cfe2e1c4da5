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


def model_configs(model) -> list:
    """The transformers configs a model's modules hold (the model's, its sub-models', its
    attention modules'), each once; other `.config` attributes (a QINSLinear's WeightConfig)
    are not the model's and are left out."""
    from transformers import PretrainedConfig
    out, seen = [], set()
    for m in model.modules():
        c = getattr(m, "config", None)
        if isinstance(c, PretrainedConfig) and id(c) not in seen:
            seen.add(id(c))
            out.append(c)
    return out


def _implementation(model) -> str:
    return getattr(model.config, "_attn_implementation", None) or "eager"


def original_attention(model):
    """attend(module, q, k, v, mask, **kw): the attention `model` is configured with (sdpa, flash,
    flex, a registered one, or eager: the module's own `eager_attention_forward`), so a hook that
    only watches q, k, v computes what the model would (eager is how Gemma 2 soft-caps scores)."""
    from transformers import AttentionInterface
    impl = _implementation(model)
    if impl != "eager":
        return AttentionInterface()[impl]

    def eager(module, *args, **kw):
        import sys
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise ValueError(f"{type(module).__name__} uses eager attention but its module defines no "
                             f"eager_attention_forward: load the model with attn_implementation='sdpa'")
        return fn(module, *args, **kw)
    return eager


@contextlib.contextmanager
def attention_hook(model, name: str, fn):
    """Route every attention call of `model` through fn(module, q, k, v, mask, **kw) while
    inside the block (registered in transformers' AttentionInterface as `name`, with the masks
    of the model's own implementation), restoring each config's implementation after. fn sees
    q, k, v after RoPE, as a cache does; it computes attention itself (`original_attention`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    AttentionInterface.register(name, fn)
    impl = _implementation(model)
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl] if impl in ALL_MASK_ATTENTION_FUNCTIONS
                                    else sdpa_mask)
    configs = model_configs(model)
    before = [getattr(c, "_attn_implementation", None) for c in configs]
    try:
        for c in configs:
            c._attn_implementation = name
        yield
    finally:
        for c, b in zip(configs, before):
            c._attn_implementation = b


def rope_frequencies(model, layer_types: list[str]) -> dict[int, "torch.Tensor"]:
    """{layer: inv_freq (R/2,) float32} of the model's rotary embedding, for the layers it turns.

    Read from the model's rotary module (a module named `...rotary_emb` holding `inv_freq`, or
    one `<layer type>_inv_freq` per layer type, as Gemma 3), so scaled variants (Llama 3, YaRN,
    ...) give their real frequencies. A config alone (no module) gives transformers' default
    rope from `rope_theta`, only when its rope type is the default. Empty when neither is found
    (a model without RoPE): keys then stay as the model gives them."""
    import torch
    modules = getattr(model, "named_modules", None)
    out: dict = {}
    if modules is not None:
        for name, m in modules():
            if not name.endswith("rotary_emb"):
                continue
            for i, t in enumerate(layer_types):
                f = getattr(m, f"{t}_inv_freq", None)
                if f is None:
                    f = getattr(m, "inv_freq", None)
                if isinstance(f, torch.Tensor) and f.dim() == 1 and f.numel():
                    out.setdefault(i, f.detach().float().cpu())
            if out:
                return out
        return out
    c = model.get_text_config(decoder=True) if hasattr(model, "get_text_config") else model
    params = getattr(c, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):      # one entry per layer type
        params = params.get("full_attention", {})
    theta = params.get("rope_theta", getattr(c, "rope_theta", None))
    if theta is None or params.get("rope_type", "default") != "default":
        return out
    _, _, head_dim = kv_shape(c)
    dim = int(head_dim * params.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0)))
    f = 1.0 / (float(theta) ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return {i: f for i in range(len(layer_types))}
