"""Entropy of QINSCache pages: what coding a page that leaves the GPU or the process would save.

Every sealed page of every QINS layer (kv/store.py) is cut into its planes (k_codes, k_scale,
k_zero, v_codes, v_scale, v_zero); each plane of each page is one stream, coded on its own as
an offloaded page would be. Codes planes become one symbol per code (symbols.unpack_codes;
keys with per-channel widths from a key plan stay bytes), scale planes shuffled fp16 bytes.
Per plane kind the totals: raw bytes, n * H0 / 8 of each page summed, and the blob sizes of
zstd, ANS and RLE (rle.py) summed over pages. "ans_layer": ANS with one table per layer and
plane, built from that layer's pages and stored once (4 bytes per symbol of the alphabet),
each page's blob then holding only its payload: what a coder of a whole cache at rest pays
(an offload coder that codes pages as they seal would need its tables fixed beforehand).
"""
from __future__ import annotations

import numpy as np
import torch

from . import coders, rle
from .stats import entropy_bits, histogram
from .symbols import to_symbols, unpack_codes


def page_streams(cache):
    """(layer index, page index, plane name, (n,) uint8 symbols, alphabet, raw bytes) of every
    sealed page of every batch row of a QINSCache (kv/store.py: a page pool per layer, pages
    addressed through the block table; a page rows share is counted once)."""
    from ..kv.layer import QINSLayer
    from ..kv.store import PagePool, PageView

    for li, layer in enumerate(cache.layers):
        pool = getattr(layer, "pool", None) if isinstance(layer, QINSLayer) else None
        table = getattr(layer, "table", None)
        if pool is None or table is None:
            continue
        names = [n for n in PagePool.PLANES if getattr(pool, n) is not None]
        seen: set[int] = set()
        for row in range(table.batch):
            for i in range(len(layer.pages)):
                page = PageView(pool, table, i, row)
                if not page.sealed or page.page_id in seen:
                    continue
                seen.add(page.page_id)
                for name, t in zip(names, page.tensors()):
                    t = t.detach().cpu().contiguous()
                    raw = t.numel() * t.element_size()
                    bits = {"k_codes": layer.k_codec.bits if layer.k_widths is None else None,
                            "v_codes": layer.v_codec.bits}.get(name)
                    if name.endswith("codes") and bits is not None:
                        words = t.reshape(-1, t.shape[-1]).numpy()
                        yield li, page.page_id, name, unpack_codes(words, bits).reshape(-1), 1 << bits, raw
                    elif name.endswith("codes"):
                        yield li, page.page_id, name, *to_symbols(t, "bytes"), raw
                    else:
                        yield li, page.page_id, name, *to_symbols(t, "shuffle"), raw


def measure_cache(cache) -> dict:
    """{plane: {"pages", "raw_bytes", "ideal_bytes", "zstd", "ans", "ans_layer", "rle"}} plus a "total" row."""
    out: dict[str, dict] = {}
    streams = list(page_streams(cache))
    hists = [histogram(sym, alphabet) for _, _, _, sym, alphabet, _ in streams]
    shared: dict[tuple[int, str], np.ndarray] = {}
    for (li, _, name, *_), h in zip(streams, hists):
        shared[(li, name)] = h if (li, name) not in shared else shared[(li, name)] + h
    for li, name in shared:
        row = out.setdefault(name, {"pages": 0, "raw_bytes": 0, "ideal_bytes": 0.0, "zstd": 0, "ans": 0, "rle": 0,
                                    "ans_layer": 0, "entropy_bits_sum": 0.0, "symbols": 0})
        row["ans_layer"] += 4 * shared[(li, name)].size                  # the table, once
    for (li, _, name, sym, alphabet, raw), hist in zip(streams, hists):
        row = out[name]
        level = coders.level_for("codes" if name.endswith("codes") else "shuffle", sym.size)
        row["pages"] += 1
        row["raw_bytes"] += raw
        h = entropy_bits(hist)
        row["ideal_bytes"] += sym.size * h / 8
        row["entropy_bits_sum"] += h * sym.size
        row["symbols"] += sym.size
        row["zstd"] += len(coders.encode(sym, "zstd", alphabet, level=level))
        row["ans"] += len(coders.encode(sym, "ans", alphabet))
        row["ans_layer"] += len(coders.encode(sym, "ans", alphabet, counts=shared[(li, name)]))
        row["rle"] += rle.rle_bytes(sym)
    total = {k: sum(r[k] for r in out.values())
             for k in ("pages", "raw_bytes", "ideal_bytes", "zstd", "ans", "ans_layer", "rle")}
    for r in out.values():
        r["entropy_bits"] = r.pop("entropy_bits_sum") / max(1, r.pop("symbols"))
    out["total"] = total
    return out


def generation_cache(model, tok, tokens: int = 4096, new_tokens: int = 64, bits: int = 4, text: str | None = None):
    """A QINSCache (bits, residual 0: every token in pages) after prefilling `tokens - new_tokens`
    tokens of `text` (default corpus) and generating `new_tokens` greedily. Returns (cache, tokens held)."""
    from .._compat import cache_kwarg
    from ..kv import QINSCache
    from ..metrics.models import default_corpus

    ids = tok(text or default_corpus(), return_tensors="pt", add_special_tokens=False)["input_ids"]
    prompt = ids[:, :tokens - new_tokens]
    if prompt.shape[1] < tokens - new_tokens:
        raise ValueError(f"the text has {prompt.shape[1]} tokens, fewer than the {tokens - new_tokens} asked")
    cache = QINSCache(model, bits=bits, residual=0)
    with torch.inference_mode():
        model.generate(prompt.to(next(model.parameters()).device), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, pad_token_id=tok.eos_token_id, **{cache_kwarg(model): cache})
    return cache, cache.get_seq_length()

