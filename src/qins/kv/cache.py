"""QINSCache: a transformers Cache whose full-attention layers hold bit-packed QINS pages.

The thin adapter to transformers' Cache API: one QINSLayer (layer.py) per full-attention
layer, all-or-nothing batch operations, and the memory accounting.

Sliding-window layers stay uncompressed: they are transformers' DynamicSlidingWindowLayer,
whose bytes `nbytes` counts. Layer types with no keys and values to page (linear-attention,
hybrid, dummy KV-sharing layers of transformers' DYNAMIC_LAYER_TYPE_MAPPING) get
transformers' own dynamic layer, uncompressed (their keys and values, if any, are counted).
"""
from __future__ import annotations

import os

import torch
from transformers.cache_utils import Cache, DynamicSlidingWindowLayer

from .._compat import check_transformers
from . import _compat
from .config import KVConfig
from .layer import QINSLayer, _nbytes
from .rope import model_ropes


def _heads_per_rank(model, heads: int) -> int:
    """KV heads this rank's attention sees: all of them, unless transformers' tensor
    parallelism shards k_proj with a local output (Llama's "colwise"; Phi-3's qkv_proj is
    "colwise_gather_output", so its ranks see every head)."""
    tp = getattr(model, "_tp_size", None) or 1
    plan = getattr(model, "tp_plan", None) if tp > 1 else None
    if not plan:
        return heads
    from ..weights.parallel import plan_matches

    names = [n for n, _ in model.named_modules() if n.endswith(("self_attn.k_proj", "self_attn.qkv_proj"))]
    style = plan_matches(plan, names[0]) if names else None
    if style not in ("colwise", "packed_colwise"):
        return heads
    if heads % tp:
        raise ValueError(f"tensor parallelism over {tp} ranks: {heads} KV heads do not divide")
    return heads // tp


def _named_plan(model, cfg: KVConfig, name):
    """QINSCache's key_plan given by name: "sampled" or a saved plan's path (plan.resolve_key_plan)."""
    from .plan import resolve_key_plan
    if name == "auto":
        raise ValueError("key_plan='auto' calibrates on text: pass qins.calibrate_keys(model, windows, config), "
                         "'sampled' (no text) or a saved plan's path")
    return resolve_key_plan(name, model, cfg)


class QINSCache(Cache):
    """A transformers Cache that stores full-attention K/V as bit-packed QINS pages.

        cache = qins.QINSCache(model, bits=4, residual=128, page_kb=32)
        model.generate(**inputs, past_key_values=cache)      # 'cache=' on transformers 5.2x
        cache.nbytes(); cache.bits_per_element()

    `model` is a PreTrainedModel or its config. Keyword fields of KVConfig (v_bits, sink,
    group, format, layer_bits, k_curvature, ...) override `config` (default KVConfig()).
    `bits` sets k_bits (and v_bits unless given). `key_plan` (a KeyPlan from
    `qins.kv.calibrate_keys`, the path of a saved one, or "sampled": calibrated on text the model
    writes itself, once per model and config, kv.plan.model_samples) gives the keys of each layer
    it covers calibrated widths per channel at the same bits per element (plan.py). `max_tokens` (per sequence) preallocates
    each layer's page pool (store.PoolExhausted past it); None grows it.

    Paths (`paths()` says which ran): on CUDA, with `model` a model on SDPA, decode steps run
    the Triton kernels over the pages (quantize-on-append, decode attention; the model's
    attention is routed through `qins_paged`, which runs SDPA for everything else); on the
    CPU, or `paged=False`, every step decodes the pages to float (the reference; with rotated
    values and a model on SDPA, also routed through `qins_paged`, which reads the values in their
    rotated frame and turns the attention output back). The QINS_KERNELS environment variable
    forces either (kernels/__init__.py).
    """

    def __init__(self, model, bits: int | None = None, residual: int | None = None, page_kb: int | None = None,
                 *, config: KVConfig | None = None, key_plan=None, max_tokens: int | None = None,
                 paged: bool | None = None, **fields):
        check_transformers()
        cfg = config or KVConfig()
        changes = dict(fields)
        if bits is not None:
            changes["k_bits"] = bits
            changes.setdefault("v_bits", bits)
        if residual is not None:
            changes["residual"] = residual
        if page_kb is not None:
            changes["page_kb"] = page_kb
        if changes:
            if config is not None and "v_bits" not in fields and "k_bits" in changes and bits is None:
                changes.setdefault("v_bits", changes["k_bits"])
            cfg = cfg.replace(**changes)
        self.config = cfg
        model_config = getattr(model, "config", model)
        n_layers, heads, head_dim = _compat.kv_shape(model_config)
        heads = _heads_per_rank(model, heads)
        if isinstance(key_plan, (str, os.PathLike)):
            key_plan = _named_plan(model, cfg, key_plan)
        if key_plan is not None and heads != _compat.kv_shape(model_config)[1]:
            raise ValueError("a key plan is per KV head of the whole model; it is not supported with the "
                             "heads split by tensor parallelism")
        types, kwargs = _compat.layer_types(model_config)
        for i, _, _ in cfg.layer_bits:
            if i >= n_layers:
                raise ValueError(f"layer_bits names layer {i}; the model has {n_layers} layers")
        if key_plan is not None and any(i >= n_layers for i in key_plan.layers):
            raise ValueError(f"the key plan names layer {max(key_plan.layers)}; the model has {n_layers} layers")
        self.key_plan = key_plan
        ropes = model_ropes(model, types, head_dim, cfg)
        layers = []
        for i, (t, kw) in enumerate(zip(types, kwargs)):
            if t == "full_attention":
                kb, vb = cfg.bits_for(i)
                widths = None if key_plan is None else key_plan.widths_for(i, kb, cfg.group_for(kb), i in ropes)
                layers.append(QINSLayer(kb, vb, format=cfg.format, residual=cfg.residual, sink=cfg.sink,
                                        page_kb=cfg.page_kb, group=cfg.group_for(kb),
                                        k_zero=cfg.zero_for(kb, "k"), v_zero=cfg.zero_for(vb, "v"),
                                        k_curvature=cfg.curvature_for(kb, "k"),
                                        v_curvature=cfg.curvature_for(vb, "v"), k_widths=widths,
                                        expect_heads=heads, expect_head_dim=head_dim, max_tokens=max_tokens,
                                        rope=ropes.get(i), v_rotate=cfg.v_rotate))
            elif t in ("sliding_attention", "chunked_attention"):
                layers.append(DynamicSlidingWindowLayer(**kw))       # uncompressed, counted
            elif (other := _compat.other_layer(t, kw)) is not None:
                layers.append(other)                                  # transformers' own layer, uncompressed
            else:
                raise ValueError(f"QINSCache supports full and sliding-window attention layers; layer {i} is {t!r}")
        self.shape = (n_layers, heads, head_dim)
        super().__init__(layers=layers)
        self.paged = self._install(model, paged, cfg.v_rotate)
        for layer in layers:
            if isinstance(layer, QINSLayer):
                layer.paged = self.paged

    @staticmethod
    def _install(model, paged: bool | None, v_rotate: bool = False) -> bool:
        """Whether the model's attention reads the layers through PagedKV handles (kv/attention.py):
        decode steps in the Triton kernel, and with rotated values the reference in the rotated
        frame (its output turned back once instead of every cached value). `paged` None = when
        `model` is a model whose attention is SDPA, on CUDA or with rotated values; True = always
        (a model is needed; on the CPU the kernels then need QINS_KERNELS=triton
        TRITON_INTERPRET=1); False = never (every call gets the history decoded to float)."""
        if paged is False:
            return False
        params = getattr(model, "parameters", None)
        if params is None:
            if paged:
                raise ValueError("paged=True needs the model (not its config): its attention is routed to the kernels")
            return False
        if paged is None:
            first = next(params(), None)
            if first is None or (first.device.type != "cuda" and not v_rotate):
                return False
        from .attention import install
        ok = install(model)
        if paged and not ok:
            raise ValueError("paged=True needs a model whose attention is SDPA (attn_implementation='sdpa')")
        return ok

    def paths(self) -> dict[int, str | None]:
        """{layer index: "cuda", "triton" or "reference"}: how the last attention call read each QINS
        layer (None before the first)."""
        return {i: layer.last_path for i, layer in enumerate(self.layers) if isinstance(layer, QINSLayer)}

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        if not 0 <= layer_idx < len(self.layers):
            raise ValueError(f"this QINSCache has {len(self.layers)} layers, got layer_idx {layer_idx}: "
                             f"a cache is built for one model")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def _all_or_nothing(self, method: str, *args) -> None:
        # validate on the first initialized QINS layer, so a bad argument changes nothing
        for layer in self.layers:
            if isinstance(layer, QINSLayer) and layer.is_initialized:
                if method in ("reorder_cache", "batch_select_indices"):
                    layer._check_index(args[0], "beam_idx" if method == "reorder_cache" else "indices")
                break
        for layer in self.layers:
            getattr(layer, method)(*args)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._all_or_nothing("reorder_cache", beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self._all_or_nothing("batch_select_indices", indices)

    def crop(self, tokens_to_remove: int) -> None:
        if (isinstance(tokens_to_remove, torch.Tensor) and tokens_to_remove.numel() == 1
                and not tokens_to_remove.is_floating_point()):
            tokens_to_remove = int(tokens_to_remove)    # transformers 5.17's assisted decoding passes a 0-d tensor
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative int (tokens to remove) or 0, got {tokens_to_remove!r}")
        held = self.get_seq_length()
        if -tokens_to_remove > held:
            raise ValueError(f"cannot crop {-tokens_to_remove} tokens: the cache holds {held}")
        super().crop(tokens_to_remove)

    # -- accounting ----------------------------------------------------------------------------
    def _layer_sizes(self):
        """(bytes held, K and V elements) of each layer; full-precision layers count their tensors."""
        for layer in self.layers:
            if isinstance(layer, QINSLayer):
                yield layer.nbytes(), layer.n_elements()
            elif getattr(layer, "is_initialized", False):
                k, v = getattr(layer, "keys", None), getattr(layer, "values", None)
                n = sum(t.numel() for t in (k, v) if isinstance(t, torch.Tensor))
                yield _nbytes(k if isinstance(k, torch.Tensor) else None) + \
                    _nbytes(v if isinstance(v, torch.Tensor) else None), n

    def nbytes(self) -> int:
        """Bytes held by every layer: codes, scales, page slack, sink, staging and residual."""
        return sum(b for b, _ in self._layer_sizes())

    def n_elements(self) -> int:
        return sum(n for _, n in self._layer_sizes())

    def bits_per_element(self) -> float:
        """8 * nbytes() / K and V elements held (nan when empty)."""
        n = self.n_elements()
        return 8.0 * self.nbytes() / n if n else float("nan")
