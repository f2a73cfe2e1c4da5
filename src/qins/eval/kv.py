"""KV rows of a report: QINSCache, DynamicCache and transformers' QuantizedCache, each with the
cache in the loop (chunked prefill through `metrics.quality.evaluate(make_cache=...)`), greedy
token match against the float model's generations, and bits per element at 4k context.
"""
from __future__ import annotations

import time

import torch

from ..kv import _compat
from ..kv.cache import QINSCache
from ..kv.config import KVConfig
from ..kv.plan import resolve_key_plan
from ..metrics.generation import greedy_generate, token_match
from ..metrics.memory import cache_nbytes
from ..metrics.quality import evaluate
from ..metrics.rows import match_fields, quality_row


def bits_per_element_at(model_config, config: KVConfig, context: int = 4096, batch: int = 1,
                        key_plan=None) -> tuple[int, float]:
    """(nbytes, bits/element) of a QINSCache holding `context` tokens; the accounting depends
    on shapes only, so zeros of the model's K/V shape stand in for real states."""
    cache = QINSCache(model_config, config=config, key_plan=key_plan)
    _, heads, head_dim = cache.shape
    dtype = getattr(model_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    x = torch.zeros(batch, heads, context, head_dim, dtype=dtype)
    for i in range(len(cache.layers)):
        cache.update(x, x, i)
    return cache.nbytes(), cache.bits_per_element()


def _evaluate(harness, model, make_cache, chunk: int) -> dict:
    return evaluate(model, harness.reference, harness.protocol.batch_size, False, make_cache=make_cache, chunk=chunk)


def measure_kv(harness, model, config: KVConfig, chunk: int = 32, match: bool = True, label: str | None = None,
               key_plan=None) -> dict:
    """One report row for `config`: quality with the cache in the loop, greedy token match
    against the float model's generations, bits/element at 4k context. `key_plan`: see
    kv.plan.resolve_key_plan; "auto" calibrates on the harness's calibration windows (not
    counted in `seconds`)."""
    plan = resolve_key_plan(key_plan, model, config, lambda: harness.calibration_windows,
                            f"calibration {harness.describe()['calibration_windows']}",
                            harness.protocol.batch_size, harness.progress)
    make = lambda: QINSCache(model, config=config, key_plan=plan)      # noqa: E731
    t0 = time.perf_counter()
    q = _evaluate(harness, model, make, chunk)
    nb, bpe = bits_per_element_at(model.config, config, 4096, key_plan=plan)
    row = quality_row(label or config.label + ("-keyplan" if plan is not None else ""), q,
                      bpw=bpe, bpw_all=bpe, kv_bytes_4k=nb, kv_config=config.to_dict())
    if plan is not None:
        row["key_plan"] = {"source": plan.source, "mean_bits": plan.mean_bits(), "layers": len(plan.layers),
                           "histogram": plan.histogram()}
    if match:
        p = harness.protocol
        gen = greedy_generate(model, harness.tok, harness.prompts, p.new_tokens, p.gen_batch_size, False,
                              make_cache=make)
        row.update(match_fields(token_match(harness.reference_generations(), gen)))
    row["seconds"] = time.perf_counter() - t0
    return row


def measure_quantized_cache(harness, model, backend: str = "hqq", nbits: int = 4, residual_length: int = 128,
                            chunk: int = 32, context: int = 4096) -> dict:
    """transformers' QuantizedCache(backend, nbits, residual_length) through the same chunked
    path; bits/element from the tensors it holds after `context` tokens of model-shaped K/V."""
    from transformers import QuantizedCache
    make = lambda: QuantizedCache(backend, model.config, nbits=nbits, residual_length=residual_length)  # noqa: E731
    q = _evaluate(harness, model, make, chunk)
    c = make()
    n_layers, heads, head_dim = _compat.kv_shape(model.config)
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    for _ in range(0, context, 512):
        for i in range(n_layers):
            x = torch.randn(1, heads, 512, head_dim, generator=g).to(dtype)
            c.update(x, x, i)
    nb = cache_nbytes(c)
    return quality_row(f"QuantizedCache({backend}, {nbits} bits, residual_length {residual_length})", q,
                       bpw=8 * nb / (2 * n_layers * heads * head_dim * context), kv_bytes_4k=nb)


def measure_dynamic(harness, model, chunk: int = 32) -> dict:
    """The same chunked path through transformers' DynamicCache (the like-for-like baseline)."""
    from transformers import DynamicCache
    q = _evaluate(harness, model, lambda: DynamicCache(config=model.config), chunk)
    return quality_row(f"DynamicCache (chunked {chunk})", q,
                       bpw=32.0 if next(model.parameters()).dtype == torch.float32 else 16.0)
