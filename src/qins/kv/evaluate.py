"""Quality with the KV cache in the loop: chunked-prefill perplexity/KL/top-1, token match.

Each 512-token window is prefilled in chunks of `chunk` tokens through a fresh cache, so
every later chunk attends to the earlier tokens as the cache returns them (read back from
compressed pages unless they are in the residual window). The same chunked path with
transformers' DynamicCache is the like-for-like baseline.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import _compat
from .config import KVConfig


def chunked_logprobs(model, ids: torch.Tensor, make_cache, chunk: int = 32) -> torch.Tensor:
    """(B, T-1, V) float32 next-token log-probs of ids (B, T), prefilled `chunk` tokens at a time."""
    cache = make_cache()
    key = _compat.cache_kwarg(model)
    outs = []
    for i in range(0, ids.shape[1], chunk):
        outs.append(model(input_ids=ids[:, i:i + chunk], use_cache=True, **{key: cache}).logits.float())
    lp = F.log_softmax(torch.cat(outs, 1)[:, :-1], dim=-1)
    return lp.clamp_min_(torch.finfo(torch.float32).min)


def evaluate_cache(model, ref, make_cache, chunk: int = 32, batch_size: int = 4) -> dict:
    """ppl, kl, top1 against `ref` (eval.quality.Reference) with `make_cache()` in the loop."""
    nll = kl = 0.0
    hits = 0
    with torch.inference_mode():
        for i in range(0, ref.windows.shape[0], batch_size):
            ids = ref.windows[i:i + batch_size]
            lp = chunked_logprobs(model, ids, make_cache, chunk)
            lp_ref = ref.logprobs_slice(i, i + ids.shape[0])
            nll += -lp.gather(-1, ids[:, 1:, None]).double().sum().item()
            kl += F.kl_div(lp, lp_ref, reduction="none", log_target=True).sum(-1).double().sum().item()
            hits += int((lp.argmax(-1) == lp_ref.argmax(-1)).sum())
    n = ref.tokens
    return {"ppl": math.exp(nll / n), "nll": nll / n, "kl": kl / n, "top1": hits / n,
            "windows": ref.windows.shape[0], "tokens": n, "chunk": chunk}


def generate_with_cache(model, tok, prompts, make_cache, new_tokens: int = 64, batch_size: int = 16):
    """Greedy generations with a fresh cache per batch (eval.generation.greedy_generate)."""
    from ..eval.generation import greedy_generate
    out = []
    key = _compat.cache_kwarg(model)
    for i in range(0, len(prompts), batch_size):
        out += greedy_generate(model, tok, prompts[i:i + batch_size], new_tokens, batch_size, False,
                               **{key: make_cache()})
    return out


def bits_per_element_at(model_config, config: KVConfig, context: int = 4096, batch: int = 1,
                        key_plan=None) -> tuple[int, float]:
    """(nbytes, bits/element) of a QINSCache holding `context` tokens; the accounting depends
    on shapes only, so zeros of the model's K/V shape stand in for real states."""
    from .cache import QINSCache
    cache = QINSCache(model_config, config=config, key_plan=key_plan)
    _, heads, head_dim = cache.shape
    dtype = getattr(model_config, "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    x = torch.zeros(batch, heads, context, head_dim, dtype=dtype)
    for i in range(len(cache.layers)):
        cache.update(x, x, i)
    return cache.nbytes(), cache.bits_per_element()


def measure_kv(harness, model, config: KVConfig, chunk: int = 32, match: bool = True, label: str | None = None,
               key_plan=None) -> dict:
    """One report row for `config`: quality with the cache in the loop, greedy token match
    against the float model's generations, bits/element at 4k context. `key_plan`: see
    plan.resolve_key_plan; "auto" calibrates on the harness's calibration windows (not
    counted in `seconds`)."""
    from .cache import QINSCache
    import time
    from .plan import resolve_key_plan
    plan = resolve_key_plan(key_plan, model, config, lambda: harness.calibration_windows,
                            f"calibration {harness.describe()['calibration_windows']}",
                            harness.protocol.batch_size, harness.progress)
    t0 = time.perf_counter()
    q = evaluate_cache(model, harness.reference, lambda: QINSCache(model, config=config, key_plan=plan), chunk,
                       harness.protocol.batch_size)
    label = label or config.label + ("-keyplan" if plan is not None else "")
    row = {"label": label, "ppl": q["ppl"], "ppl_ref": harness.reference.ppl,
           "ppl_increase_pct": 100 * (q["ppl"] / harness.reference.ppl - 1), "kl": q["kl"], "top1": q["top1"],
           "windows": q["windows"], "tokens": q["tokens"], "chunk": chunk, "kv_config": config.to_dict()}
    if plan is not None:
        row["key_plan"] = {"source": plan.source, "mean_bits": plan.mean_bits(), "layers": len(plan.layers),
                           "histogram": plan.histogram()}
    nb, bpe = bits_per_element_at(model.config, config, 4096, key_plan=plan)
    row.update(bpw=bpe, bpw_all=bpe, kv_bytes_4k=nb)
    if match:
        from ..eval.generation import token_match
        p = harness.protocol
        tm = token_match(harness.reference_generations(),
                         generate_with_cache(model, harness.tok, harness._prompts,
                                             lambda: QINSCache(model, config=config, key_plan=plan), p.new_tokens,
                                             p.gen_batch_size))
        row.update(match=tm["match"], identical=tm["identical"], sequences=tm["sequences"],
                   first_divergence=tm["first_divergence_mean"])
    row["seconds"] = time.perf_counter() - t0
    return row


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor storage reachable from obj (lists, tuples, dicts,
    attributes): the held memory of caches that have no nbytes() (DynamicCache, QuantizedCache)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return sum(tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


def cache_nbytes(cache) -> int:
    return cache.nbytes() if hasattr(cache, "nbytes") else tensor_bytes(cache.layers)


def measure_quantized_cache(harness, model, backend: str = "hqq", nbits: int = 4, residual_length: int = 128,
                            chunk: int = 32, context: int = 4096) -> dict:
    """transformers' QuantizedCache(backend, nbits, residual_length) through the same chunked
    path; bits/element from the tensors it holds after `context` tokens of model-shaped K/V."""
    from transformers import QuantizedCache
    make = lambda: QuantizedCache(backend, model.config, nbits=nbits, residual_length=residual_length)
    q = evaluate_cache(model, harness.reference, make, chunk, harness.protocol.batch_size)
    c = make()
    n_layers, heads, head_dim = _compat.kv_shape(model.config)
    dtype = next(model.parameters()).dtype
    g = torch.Generator().manual_seed(0)
    for t in range(0, context, 512):
        for i in range(n_layers):
            x = torch.randn(1, heads, 512, head_dim, generator=g).to(dtype)
            c.update(x, x, i)
    nb = cache_nbytes(c)
    return {"label": f"QuantizedCache({backend}, {nbits} bits, residual_length {residual_length})",
            "ppl": q["ppl"], "ppl_ref": harness.reference.ppl,
            "ppl_increase_pct": 100 * (q["ppl"] / harness.reference.ppl - 1), "kl": q["kl"], "top1": q["top1"],
            "windows": q["windows"], "tokens": q["tokens"], "chunk": chunk,
            "bpw": 8 * nb / (2 * n_layers * heads * head_dim * context), "kv_bytes_4k": nb}


def measure_dynamic(harness, model, chunk: int = 32) -> dict:
    """The same chunked path through transformers' DynamicCache (the like-for-like baseline)."""
    from transformers import DynamicCache
    q = evaluate_cache(model, harness.reference, lambda: DynamicCache(config=model.config), chunk,
                       harness.protocol.batch_size)
    return {"label": f"DynamicCache (chunked {chunk})", "ppl": q["ppl"], "ppl_ref": harness.reference.ppl,
            "ppl_increase_pct": 100 * (q["ppl"] / harness.reference.ppl - 1), "kl": q["kl"], "top1": q["top1"],
            "windows": q["windows"], "tokens": q["tokens"], "chunk": chunk,
            "bpw": 32.0 if next(model.parameters()).dtype == torch.float32 else 16.0}
