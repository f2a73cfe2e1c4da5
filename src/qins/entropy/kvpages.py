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

`park(cache)` / `unpark(cache, parked)` do it for real: every layer's pool, plane by plane
(all its pages in one stream), coded by the policy rule into host memory and the pools freed;
restored bit for bit on their device.
"""
from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import coders, rle
from .archive import code_tensor, decode_tensor
from .policy import DEFAULT_THRESHOLD
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



# -- parking: a cache's pages entropy-coded on the host, the device pools given back ----------
@dataclass
class ParkedPages:
    """What `park` took from a QINSCache: per layer, per plane of its page pool, the record and
    blob of `archive.code_tensor` (the policy rule: the smaller of zstd and ANS where it saves at
    least `threshold`, else the raw bytes), in host memory."""
    layers: dict[int, dict[str, tuple[dict, bytes, tuple[int, ...]]]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def raw_bytes(self) -> int:
        return sum(rec["raw_bytes"] for planes in self.layers.values() for rec, _, _ in planes.values())

    @property
    def coded_bytes(self) -> int:
        return sum(len(blob) for planes in self.layers.values() for _, blob, _ in planes.values())

    def summary(self) -> dict[str, dict]:
        """{plane: {"raw_bytes", "coded_bytes", "saving", "codecs": {codec: count}}} plus "total"."""
        out: dict[str, dict] = {}
        for planes in self.layers.values():
            for name, (rec, blob, _) in planes.items():
                row = out.setdefault(name, {"raw_bytes": 0, "coded_bytes": 0, "codecs": {}})
                row["raw_bytes"] += rec["raw_bytes"]
                row["coded_bytes"] += len(blob)
                row["codecs"][rec["codec"]] = row["codecs"].get(rec["codec"], 0) + 1
        out["total"] = {"raw_bytes": self.raw_bytes, "coded_bytes": self.coded_bytes, "codecs": {}}
        for row in out.values():
            row["saving"] = 1 - row["coded_bytes"] / row["raw_bytes"] if row["raw_bytes"] else 0.0
        return out


def _plane_view(layer, name: str, t: torch.Tensor) -> tuple[torch.Tensor, str, int | None]:
    """(2-D tensor, transform, bits) of one parked plane: code planes as packed rows of one
    token (one symbol per code where the width is uniform), scale planes as shuffled fp16."""
    if name.endswith("codes"):
        bits = layer.v_codec.bits if name == "v_codes" else (layer.k_codec.bits if layer.k_widths is None else None)
        t2 = t.reshape(-1, t.shape[-1])
        if bits is not None and (t2.shape[1] * 32) % bits == 0:
            return t2, "codes", bits
        return t2, "bytes", None
    return t.reshape(-1, t.shape[-1]) if t.dim() > 1 else t.reshape(1, -1), "shuffle", None


def park(cache, threshold: float = DEFAULT_THRESHOLD, threads: int | None = None) -> ParkedPages:
    """Entropy-code every QINS layer's page pool into host memory and free the pools: what a
    cache kept for later (a paused session, pages leaving the GPU) costs at rest. The float
    segment (residual window, staging, sink copies) and the block tables stay where they are.
    While parked the layers refuse to be used (a clear error); `unpark` restores every page
    bit for bit on its device. Planes are coded in `threads` threads (default: one per core)."""
    from ..kv.layer import QINSLayer
    t0 = time.perf_counter()
    parked = ParkedPages()
    jobs = []
    for li, layer in enumerate(cache.layers):
        if not isinstance(layer, QINSLayer) or not layer.is_initialized:
            continue
        for name, t in layer.pool.park().items():
            jobs.append((li, name, tuple(t.shape), *_plane_view(layer, name, t.detach().cpu().contiguous())))

    def code(job):
        li, name, shape, t2, transform, bits = job
        return li, name, (*code_tensor(t2, transform, bits, None, threshold), shape)
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as ex:
        for li, name, rec in ex.map(code, jobs):
            parked.layers.setdefault(li, {})[name] = rec
    parked.seconds = time.perf_counter() - t0
    return parked


def unpark(cache, parked: ParkedPages, threads: int | None = None) -> None:
    """Decode what `park` took and give every layer its pool back on the pool's device (every
    plane of a layer decodes before its pool is restored: a damaged blob leaves it parked)."""
    def decode(job):
        li, name, (rec, blob, shape) = job
        try:
            return li, name, decode_tensor(rec, blob).reshape(shape)
        except ValueError as e:
            raise ValueError(f"layer {li}, plane {name}: {e}") from None
    jobs = [(li, name, v) for li, planes in parked.layers.items() for name, v in planes.items()]
    with ThreadPoolExecutor(threads or os.cpu_count() or 1) as ex:
        decoded = list(ex.map(decode, jobs))
    out: dict[int, dict[str, torch.Tensor]] = {}
    for li, name, t in decoded:
        out.setdefault(li, {})[name] = t
    for li, planes in out.items():
        cache.layers[li].pool.unpark(planes)
