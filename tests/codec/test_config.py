"""WeightConfig (config.py): frozen, validated, round-trips through JSON with a version."""
from __future__ import annotations

import dataclasses
import json

import pytest

from qins.codec.config import FORMAT_VERSION, WeightConfig

CONFIGS = [
    WeightConfig(),
    WeightConfig(format="qins", bits=3, group_size=None, curvature="channel"),
    WeightConfig(format="qins", bits=8, group_size=32, curvature_value=2.5, clip_search=False),
    WeightConfig(format="int-sym", bits=2, group_size=128),
    WeightConfig(format="int-asym", bits=5, group_size=96),
    WeightConfig(format="nf4", bits=4, group_size=64),
    WeightConfig(format="fp8", bits=8, group_size=None),
    WeightConfig(format="qins-seed", bits=8),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_json_round_trip(cfg):
    s = cfg.to_json()
    back = WeightConfig.from_json(s)
    assert back == cfg
    assert back.to_json() == s                                       # stable text (sorted keys)
    assert json.loads(s)["version"] == FORMAT_VERSION
    assert WeightConfig.from_dict(cfg.to_dict()) == cfg


def test_defaults():
    c = WeightConfig()
    assert (c.format, c.bits, c.group_size, c.curvature) == ("qins", 4, 64, "tensor")
    assert c.curvature_value is None and c.clip_search is True and c.scale_dtype == "float16"
    assert c.version == FORMAT_VERSION
    assert c.label == "qins-4b-g64"
    assert WeightConfig(group_size=None).label == "qins-4b-ch"


def test_frozen():
    c = WeightConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.bits = 8                                                   # type: ignore[misc]
    r = c.replace(bits=8)
    assert r.bits == 8 and c.bits == 4
    assert {c: 1}[WeightConfig()] == 1                               # hashable, by value


def test_replace_validates():
    with pytest.raises(ValueError, match="supports bits"):
        WeightConfig().replace(format="nf4", bits=8)


@pytest.mark.parametrize("fmt", ("qinz", "int8", ""))
def test_bad_format(fmt):
    with pytest.raises(ValueError, match=f"unknown format {fmt!r}"):
        WeightConfig(format=fmt)


@pytest.mark.parametrize("fmt,bits", [("qins", 7), ("qins", 1), ("int-sym", 16), ("nf4", 3),
                                      ("fp8", 4), ("qins-seed", 4)])
def test_bad_bits(fmt, bits):
    with pytest.raises(ValueError, match=rf"format {fmt!r} supports bits .* got {bits}"):
        WeightConfig(format=fmt, bits=bits)


@pytest.mark.parametrize("bits", (4.0, "4", True, None))
def test_bits_must_be_int(bits):
    # 4.0 == 4 would otherwise pass the membership test and write "bits": 4.0 to JSON
    with pytest.raises(ValueError, match="bits must be an int"):
        WeightConfig(bits=bits)


@pytest.mark.parametrize("g", (0, -32, -64, 16, 33, 100, 48, 64.0, "64", True))
def test_bad_group_size(g):
    with pytest.raises(ValueError, match="group_size must be a positive multiple of 32"):
        WeightConfig(group_size=g)


@pytest.mark.parametrize("g", (32, 64, 96, 128, 4096, None))
def test_good_group_size(g):
    assert WeightConfig(group_size=g).group_size == g


def test_bad_curvature_fields():
    with pytest.raises(ValueError, match="curvature must be 'tensor' or 'channel'"):
        WeightConfig(curvature="group")
    with pytest.raises(ValueError, match="curvature_value must be >= 0"):
        WeightConfig(curvature_value=-0.5)
    with pytest.raises(ValueError, match="scale_dtype"):
        WeightConfig(scale_dtype="bfloat16")


def test_unknown_field():
    d = WeightConfig().to_dict()
    d["groupsize"] = 64
    with pytest.raises(ValueError, match=r"unknown WeightConfig fields \['groupsize'\]"):
        WeightConfig.from_dict(d)
    with pytest.raises(ValueError, match="unknown WeightConfig fields"):
        WeightConfig.from_json(json.dumps(d))


def test_newer_version_rejected():
    d = WeightConfig().to_dict()
    d["version"] = FORMAT_VERSION + 1
    with pytest.raises(ValueError, match=f"version {FORMAT_VERSION + 1} is newer"):
        WeightConfig.from_json(json.dumps(d))


def test_missing_fields_take_defaults():
    # an older file that lacks a field still loads (defaults fill it)
    c = WeightConfig.from_json(json.dumps({"format": "int-sym", "bits": 8, "version": FORMAT_VERSION}))
    assert c == WeightConfig(format="int-sym", bits=8)
