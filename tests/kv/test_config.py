from __future__ import annotations

import json
from pathlib import Path

import pytest

from qins.kv import KVConfig, parse_kv_bits

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "kv_defaults.json"


def test_json_round_trip():
    c = KVConfig(k_bits=8, v_bits=4, residual=0, sink=4, page_kb=16, layer_bits=((0, 8, 8), (3, 2, 2)))
    assert KVConfig.from_json(c.to_json()) == c
    assert c.bits_for(3) == (2, 2) and c.bits_for(1) == (8, 4)
    assert KVConfig(k_bits=6).v_bits == 6
    # per-width defaults: group and key zero points follow k_bits, value curvature v_bits
    c = KVConfig(k_bits=4, v_bits=8)
    assert (c.group_for(4), c.zero_for(4, "k"), c.zero_for(8, "v")) == (128, True, False)
    assert (c.group_for(8), c.zero_for(8, "k")) == (64, False)
    assert c.curvature_for(8, "v") == 0.0 and c.curvature_for(4, "k") == 0.0
    assert KVConfig(format="int-sym").curvature_for(4, "v") == 0.0
    assert KVConfig(group=32, k_zero=False).group_for(4) == 32 and not KVConfig(k_zero=False).zero_for(4, "k")


def test_defaults_are_the_ones_chosen_on_calibration_windows():
    """The per-width value curvature and key group are what benchmarks/kv_defaults.py chose on
    the corpus's first windows (never the evaluation windows); changing a default means
    rerunning that selection."""
    choice = json.loads(RESULTS.read_text())["choice"]
    assert sorted(int(b) for b in choice) == [2, 3, 4, 5, 6]
    for bits, c in choice.items():
        cfg = KVConfig(k_bits=int(bits))
        assert (cfg.curvature_for(int(bits), "v"), cfg.group_for(int(bits))) == (c["v_curvature"], c["group"]), bits


@pytest.mark.parametrize("bad", [dict(k_bits=7), dict(v_bits=1), dict(page_kb=8), dict(page_kb=128),
                                 dict(residual=-1), dict(group=48), dict(format="nf4"),
                                 dict(layer_bits=((0, 4, 7),)), dict(layer_bits=((1, 4, 4), (1, 8, 8))),
                                 dict(sliding="compress"), dict(version=99), dict(k_bits=4, sink=128),
                                 dict(group=16, sink=16), dict(k_zero="yes"), dict(v_zero=1)])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        KVConfig(**bad)


def test_unknown_field():
    with pytest.raises(ValueError, match="unknown"):
        KVConfig.from_dict({"bits": 4})


def test_parse_kv_bits():
    assert parse_kv_bits("4") == (4, 4) and parse_kv_bits("8,4") == (8, 4)
    with pytest.raises(ValueError):
        parse_kv_bits("8,4,2")
