"""Measurement, policy and the analyze report (entropy/policy.py, report.py, kvpages.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qins
from qins.codec.config import WeightConfig
from qins.entropy import archive, coders, kvpages, policy, report, rle


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_model):
    model = qins.quantize(make_model("llama", True), WeightConfig("qins", 4, 32), include_embeddings=True,
                          embeddings=WeightConfig("qins", 6, 32), progress=False)
    return qins.save(model, tmp_path_factory.mktemp("saved") / "m")


def test_choose():
    # raw below the threshold; the fastest coder within 1% of the smallest above it
    assert policy.choose({"zstd": 960, "ans": 955}, 1000, 0.05) == "raw"
    assert policy.choose({"zstd": 900, "ans": 895}, 1000, 0.05) == "zstd"
    assert policy.choose({"zstd": 900, "ans": 850}, 1000, 0.05) == "ans"
    assert policy.choose({"zstd": 900, "ans": 850}, 0, 0.05) == "raw"


def test_measure_counts_real_sizes(saved):
    stats = policy.measure(saved)
    by = {s.name: s for s in stats}
    emb = by["model.embed_tokens.qweight"]
    assert emb.transform == "codes" and emb.bits == 6 and emb.alphabet == 64 and emb.access == "cold"
    assert by["model.layers.0.mlp.up_proj.qweight"].access == "hot"
    for s in stats:
        assert sum(s.histogram) == s.n
        assert s.coded["raw"] == s.stored_bytes
        # ANS: within 1% of n H0 / 8 + its table once a stream is long enough to matter
        if s.n >= 4096:
            assert s.over_entropy("ans") < 0.01, s.name


def test_analyze_writes_the_policy_pack_applies(tmp_path, saved):
    doc = report.analyze(saved, tmp_path / "a", threshold=0.05, command="test")
    pol = policy.read_policy(tmp_path / "a" / "policy.json")
    assert set(pol["tensors"]) == {t["name"] for t in doc["tensors"]}
    md = (tmp_path / "a" / "analysis.md").read_text()
    assert "model.embed_tokens.qweight" in md and "| policy |" in md
    archive.pack(saved, tmp_path / "m.qins", policy=pol)
    with archive.Archive(tmp_path / "m.qins") as a:
        assert {n: rec["codec"] for n, rec in a.records.items()} == pol["tensors"]
        # the archive's payloads are exactly the sizes analyze measured
        assert {n: rec["length"] for n, rec in a.records.items()} == \
            {t["name"]: t["coded"][pol["tensors"][t["name"]]] for t in doc["tensors"]}
    bad = dict(pol, tensors={**pol["tensors"], "x": "lzma"})
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown codecs"):
        policy.read_policy(tmp_path / "bad.json")


def test_kv_pages_measured(make_model):
    # a 4-bit QINSCache after a 320-token forward: every sealed page's planes measured, the
    # codes streams round-trip through every coder
    model = make_model("llama", True)
    cache = qins.QINSCache(model, bits=4, residual=0, page_kb=16)
    ids = torch.randint(0, 128, (1, 320), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    streams = list(kvpages.page_streams(cache))
    assert streams and {s[2] for s in streams} >= {"k_codes", "k_scale", "v_codes", "v_scale"}
    for _, _, name, sym, alphabet, raw in streams[:6]:
        for c in coders.CODECS:
            assert np.array_equal(coders.decode(coders.encode(sym, c, alphabet), c, sym.size, alphabet), sym)
        assert np.array_equal(rle.decode(rle.encode(sym), sym.size), sym)
    r = kvpages.measure_cache(cache)
    assert r["total"]["raw_bytes"] == sum(s[5] for s in streams)
    assert r["k_codes"]["raw_bytes"] == sum(s[5] for s in streams if s[2] == "k_codes")
    # one ANS table per layer and plane: every page round-trips under it, the pages' payloads
    # cost at least their own entropy, and the small scale planes stop paying a table per page
    from qins.entropy.stats import histogram
    layer0 = [s for s in streams if s[0] == streams[0][0] and s[2] == "v_scale"]
    table = sum(histogram(s[3], s[4]) for s in layer0)
    for _, _, _, sym, alphabet, _ in layer0:
        blob = coders.encode(sym, "ans", alphabet, counts=table)
        assert np.array_equal(coders.decode(blob, "ans", sym.size, alphabet, counts=table), sym)
        assert len(blob) < len(coders.encode(sym, "ans", alphabet))
    with pytest.raises(ValueError, match="non-negative counts"):
        coders.encode(layer0[0][3], "ans", layer0[0][4], counts=table[:-1])
    for name, row in r.items():
        assert row["ans_layer"] >= 0.999 * row["ideal_bytes"], name
    assert r["v_scale"]["ans_layer"] < r["v_scale"]["ans"]
    expected = 0                                     # payloads under each layer's table + tables
    for li in {s[0] for s in streams}:
        pages = [s for s in streams if s[0] == li and s[2] == "v_scale"]
        t = sum(histogram(s[3], s[4]) for s in pages)
        expected += 4 * t.size + sum(len(coders.encode(s[3], "ans", s[4], counts=t)) for s in pages)
    assert r["v_scale"]["ans_layer"] == expected
