"""Parking a QINSCache's pages entropy-coded in host memory (entropy/kvpages.park / unpark):
every page comes back bit for bit, the model continues exactly as from an untouched copy, a
parked cache refuses to be used, a damaged blob is an error naming the layer and plane."""
from __future__ import annotations

import copy

import pytest
import torch

from qins._compat import cache_kwarg
from qins.entropy.kvpages import park, unpark
from qins.kv import KVConfig
from qins.kv.cache import QINSCache
from qins.kv.store import PagePool


def _filled(model, ids, bits):
    """A cache with several sealed 16-token groups per row (80 tokens, residual 4)."""
    ids = torch.cat([ids, (ids * 7 + 3) % model.config.vocab_size, (ids * 5 + 1) % model.config.vocab_size,
                     ids.flip(1)], 1)[:, :80]
    cache = QINSCache(model, config=KVConfig(k_bits=bits, residual=4, group=16))
    with torch.inference_mode():
        model(ids, **{cache_kwarg(model): cache})
    assert cache.layers[0].n_quantized >= 64
    return cache


def _planes(cache):
    return [{n: getattr(layer.pool, n).clone() for n in PagePool.PLANES if getattr(layer.pool, n) is not None}
            for layer in cache.layers]


def _step(model, cache, tok):
    with torch.inference_mode():
        return model(tok, **{cache_kwarg(model): cache}).logits


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_park_round_trip_is_exact_and_generation_continues(make_model, token_ids, bits):
    model = make_model("llama")
    cache = _filled(model, token_ids, bits)
    twin = copy.deepcopy(cache)
    before = _planes(cache)
    held = cache.layers[0].nbytes()
    parked = park(cache)
    assert all(layer.pool.parked for layer in cache.layers)
    assert cache.layers[0].nbytes() < held                      # the pool's memory is gone
    assert parked.raw_bytes == sum(t[:layer.pool.next_id].numel() * t.element_size()
                                   for layer, planes in zip(cache.layers, before) for t in planes.values())
    with pytest.raises(RuntimeError, match="parked"):
        _step(model, cache, token_ids[:, -1:])
    unpark(cache, parked)
    for layer, planes in zip(cache.layers, before):
        for name, t in planes.items():
            assert torch.equal(getattr(layer.pool, name), t), name
    tok = token_ids[:, -1:]
    for _ in range(6):                                          # seals more groups after the round trip
        a, b = _step(model, cache, tok), _step(model, twin, tok)
        assert torch.equal(a, b)
        tok = a[:, -1:].argmax(-1)


def test_damaged_blob_is_a_clear_error_and_the_cache_stays_parked(make_model, token_ids):
    model = make_model("llama")
    cache = _filled(model, token_ids, 4)
    parked = park(cache, threshold=0.0)
    li, planes = next(iter(parked.layers.items()))
    rec, blob, shape = planes["v_codes"]
    bad = bytearray(blob)
    bad[len(bad) // 2] ^= 0x40
    planes["v_codes"] = (rec, bytes(bad), shape)
    with pytest.raises(ValueError, match=rf"layer {li}, plane v_codes"):
        unpark(cache, parked)
    assert cache.layers[li].pool.parked
    planes["v_codes"] = (rec, blob, shape)                      # the intact blob still restores it
    unpark(cache, parked)
    assert not cache.layers[li].pool.parked


def test_summary_counts_what_was_coded(make_model, token_ids):
    cache = _filled(make_model("llama"), token_ids, 4)
    s = park(cache).summary()
    assert s["total"]["raw_bytes"] == sum(r["raw_bytes"] for k, r in s.items() if k != "total")
    assert set(s) >= {"k_codes", "k_scale", "v_codes", "v_scale", "total"}
    assert all(sum(r["codecs"].values()) == len(cache.layers) for k, r in s.items() if k != "total")
