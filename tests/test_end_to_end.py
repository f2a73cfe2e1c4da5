"""The real default model (SmolLM2-135M-Instruct) end to end: quantize, measure, save, load.

One Harness per module: the float model's predictions on the LAST 2 windows of 512 tokens of
the default corpus (1,022 predicted tokens) and its greedy answers to 4 prompts x 16 tokens.
Floors were set from measured values (1 torch thread, CPU, transformers 5.24, torch 2.13):

    variant           KL (nats)   top-1    on the 2 windows of this test
    qins-8b-g128      0.00084     0.979    token match 1.00 (64/64 tokens)
    qins-4b-g64       0.2580      0.756
    nf4-4b-g64        0.2628      0.759    (top-1 slightly above qins-4b here)
    qins-seed-8b      0.0081      0.955

qins-4b vs nf4 is the thin one: 1.8% lower KL on these two windows (0.0048 nats). Over the
last 16 windows qins-4b-g64 measured 0.2408 against nf4's 0.2674 (11% lower, lower on 13 of
16 windows, mean difference 0.027 +- 0.005 standard error), so the ordering is real; the two
windows used here are among its closest. The measurement is deterministic (fixed windows,
no sampling), so the assertion does not flake, but a codec change that moves qins-4b by 2%
will flip it: rerun the 16-window comparison before changing the assertion.
"""
from __future__ import annotations

import copy

import pytest
import torch

import qins
from qins.config import WeightConfig
from qins.eval.harness import Harness, Protocol

pytestmark = pytest.mark.slow

Q8 = WeightConfig("qins", 8, 128)
Q4 = WeightConfig("qins", 4, 64)
NF4 = WeightConfig("nf4", 4, 64)
SEED = WeightConfig("qins-seed", 8, None)


@pytest.fixture(scope="module")
def harness():
    tok, model = qins.load_default_model()
    return Harness(tok, model, Protocol(windows=2, prompts=4, new_tokens=16, calibration_windows=0),
                   progress=False)


@pytest.fixture(scope="module")
def q4_model(harness):
    return qins.quantize(copy.deepcopy(harness.model), Q4, progress=False)


@pytest.fixture(scope="module")
def rows(harness, q4_model):
    """{label: row}, each variant measured once; greedy token match for qins-8b only (the
    4-bit and seed rows need KL and top-1 alone, and generation costs seconds per variant)."""
    out = {Q8.label: harness.measure_config(Q8, match=True)}
    out[Q4.label] = harness.measure(q4_model, Q4.label, match=False)
    out[NF4.label] = harness.measure_config(NF4, match=False)
    out[SEED.label] = harness.measure_config(SEED, match=False)
    for label, r in out.items():                          # shown by pytest -s: the values to floor
        print(f"{label}: kl {r['kl']:.5f} top1 {r['top1']:.4f} match {r['match']} bpw {r['bpw']:.5f}")
    return out


def test_protocol_is_what_the_floors_were_measured_on(harness):
    assert harness.eval_windows.shape == (2, 512)
    assert harness.reference.tokens == 1022
    # the float model on these windows: measured perplexity 13.77
    assert 13.0 < harness.reference.ppl < 14.5


def test_qins_8bit_is_close_to_float(rows):
    r = rows[Q8.label]
    assert r["kl"] < 0.0015                               # measured 0.00084
    assert r["top1"] > 0.965                              # measured 0.979
    assert r["match"] >= 0.9                              # measured 1.00: 4 prompts x 16 tokens
    # 8-bit codes + a float16 scale per group: measured 8.1146 (< 8.125: the last group of a
    # 576-wide row takes 192 columns)
    assert 8.1 < r["bpw"] < 8.13


def test_qins_4bit_beats_nf4_at_the_same_size(rows):
    q, n = rows[Q4.label], rows[NF4.label]
    # same storage: 4-bit codes + one float16 scale per 64 weights = 4.25 bpw; qins adds one
    # float32 curvature per tensor (measured 4.25006 against 4.25000)
    assert abs(q["bpw"] - n["bpw"]) < 1e-3
    assert q["kl"] < n["kl"]                              # measured 0.2580 < 0.2628 (see module doc)
    assert q["kl"] < 0.30 and q["top1"] > 0.72            # measured 0.2580, 0.756


def test_seed_codec_is_not_lossless(rows):
    # the seed's Pattern A (global alpha = 1, no scale) against calibrated qins at 8 bits:
    # measured KL 0.0081 against 0.00084, about 10x
    s, q = rows[SEED.label], rows[Q8.label]
    assert s["kl"] > 4 * q["kl"]
    assert s["kl"] > 0.004 and s["top1"] < 0.975          # measured 0.0081, 0.955


def test_save_load_is_bit_identical(harness, q4_model, tmp_path):
    path = qins.save(q4_model, tmp_path / "q4", tokenizer=harness.tok)
    loaded = qins.load(path)
    ids = harness.eval_windows[:1, :256]                  # (1, 256): half a window is enough
    with torch.inference_mode():
        assert torch.equal(loaded(ids).logits, q4_model(ids).logits)
    # on disk: 106.2M linear weights at 4.25 bpw (56.4 MB, + row padding) and the float32
    # embedding (49152 x 576, 113.2 MB); the tied float head stored again would add 113 MB
    size = (path / "model.safetensors").stat().st_size
    assert 165e6 < size < 175e6


def test_gptq_4bit_halves_the_data_free_kl(harness):
    # GPTQ rounding with Hessians from the corpus's first 4 windows (disjoint from the last 2
    # evaluated here). Measured on these 2 windows: KL 0.0737 (top-1 0.874) against 0.2580 without data.
    h = Harness(harness.tok, harness.model, Protocol(windows=2, prompts=4, new_tokens=16, calibration_windows=4),
                progress=False)
    r = h.measure_config(Q4.replace(rounding="gptq"), match=False)
    print(f"qins-4b-g64-gptq: kl {r['kl']:.5f} top1 {r['top1']:.4f} bpw {r['bpw']:.5f}")
    assert r["label"] == "qins-4b-g64-gptq" and abs(r["bpw"] - 4.25) < 0.01
    assert r["kl"] < 0.5 * 0.2580
