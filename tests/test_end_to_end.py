"""The real default model (SmolLM2-135M-Instruct) end to end: quantize, measure, save, load.

Two Harnesses per module, on the LAST windows of 512 tokens of the default corpus (220
windows): `harness`, the last 2 windows (1,022 predicted tokens) and greedy answers to 4
prompts x 16 tokens, for the 8-bit and seed rows; `wide`, the last 8 windows (4,088 tokens),
for qins-4b against nf4-4b window by window. Floors were set from measured values (1 torch
thread, CPU, transformers 5.24, torch 2.13):

    variant           KL (nats)   top-1    windows
    qins-8b-g128      0.00084     0.979    last 2; token match 1.00 (64/64 tokens)
    qins-seed-8b      0.0081      0.955    last 2
    qins-4b-g64       0.2471      0.761    last 8
    nf4-4b-g64        0.2695      0.753    last 8

qins-4b vs nf4 at the same 4.25 bpw, per window (nf4 KL - qins KL, windows 212..219):
+0.027 +0.037 +0.038 +0.039 +0.033 -0.004 +0.001 +0.009, so qins is lower on 7 of 8 and
the mean difference is 0.0225 +- 0.0062 standard error (3.6 SE; 8.3% of nf4's KL). On the
last 2 windows alone (the test used to compare those) the margin was 0.0048 nats (1.8%,
1.1 SE): too thin to rest a claim on. Measured once per window over the last 64 windows
(same settings, 1 thread): qins-4b-g64 0.2535 against nf4 0.2807, lower on 54 of 64, mean
difference 0.0272 +- 0.0031 (8.7 SE); the last 16: 13 of 16, 5.2 SE; the last 4: 1.2 SE.
Eight is the fewest trailing windows where the paired margin is several standard errors
wide; each window costs 3 forwards (float, qins, nf4), about 70 s more than 2 windows on a
busy 2-core machine (whole file: 398 s, was 328 s).
"""
from __future__ import annotations

import copy

import pytest
import torch

import qins
from qins.codec.config import WeightConfig
from qins.eval.harness import Harness, Protocol
from qins.metrics.memory import memory_report
from qins.metrics.quality import Reference, evaluate
from qins.weights.quantize import decoded_weights

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
def rows(harness):
    """{label: row} on the last 2 windows, each variant measured once; greedy token match for
    qins-8b only (generation costs seconds per variant)."""
    out = {Q8.label: harness.measure_config(Q8, match=True)}
    out[SEED.label] = harness.measure_config(SEED, match=False)
    for label, r in out.items():                          # shown by pytest -s: the values to floor
        print(f"{label}: kl {r['kl']:.5f} top1 {r['top1']:.4f} match {r['match']} bpw {r['bpw']:.5f}")
    return out


def per_window(model, ref: Reference) -> list[dict]:
    """The library's evaluate() of `model` on each window of `ref` alone."""
    out = []
    with decoded_weights(model):
        for i in range(ref.windows.shape[0]):
            one = Reference(ref.windows[i:i + 1], [ref.logprobs_slice(i, i + 1)], ref.nll, ref.ppl)
            out.append(evaluate(model, one, progress=False))
    return out


@pytest.fixture(scope="module")
def wide(harness, q4_model):
    """{label: {"kl": [per window], "top1": [per window], "bpw"}} for qins-4b and nf4-4b on the
    last 8 windows (212..219)."""
    h = Harness(harness.tok, harness.model, Protocol(windows=8, prompts=0, calibration_windows=0), progress=False)
    assert h.eval_windows.shape == (8, 512) and h.n_corpus_windows == 220
    nf4 = qins.quantize(copy.deepcopy(harness.model), NF4, progress=False)
    out = {}
    for label, model in ((Q4.label, q4_model), (NF4.label, nf4)):
        ws = per_window(model, h.reference)
        out[label] = {"kl": [w["kl"] for w in ws], "top1": [w["top1"] for w in ws],
                      "bpw": memory_report(model)["quantized_bpw"]}
        print(f"{label}: kl {sum(out[label]['kl']) / 8:.5f} top1 {sum(out[label]['top1']) / 8:.4f} "
              f"per window {[round(k, 4) for k in out[label]['kl']]}")
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


def test_qins_4bit_beats_nf4_at_the_same_size(wide):
    q, n = wide[Q4.label], wide[NF4.label]
    # same storage: 4-bit codes + one float16 scale per 64 weights = 4.25 bpw; qins adds one
    # float32 curvature per tensor (measured 4.25006 against 4.25000)
    assert abs(q["bpw"] - n["bpw"]) < 1e-3 and abs(q["bpw"] - 4.25) < 1e-3
    kl_q, kl_n = sum(q["kl"]) / 8, sum(n["kl"]) / 8       # equal tokens per window: the pooled KL
    assert kl_q < 0.30 and sum(q["top1"]) / 8 > 0.72      # measured 0.2471, 0.761
    # the ordering, window by window (paired: same tokens, same reference); see module doc
    diff = [b - a for a, b in zip(q["kl"], n["kl"])]
    mean = sum(diff) / 8
    se = (sum((d - mean) ** 2 for d in diff) / 7) ** 0.5 / 8 ** 0.5
    assert kl_q < kl_n                                    # measured 0.2471 < 0.2695
    assert sum(d > 0 for d in diff) >= 6                  # measured 7 of 8
    assert mean > 2 * se                                  # measured 0.0225 = 3.6 standard errors


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


def test_gptq_4bit_error_compensation_cuts_the_kl(harness, wide):
    # GPTQ rounding with Hessians from the corpus's first 4 windows (disjoint from the last 2
    # evaluated here), against data-free qins-4b on the same 2 windows (218, 219: the last 2 of
    # `wide`). Measured: KL 0.0739 (top-1 0.876) against 0.2580, 0.29x. The Hessian's diagonal
    # alone (importance-weighted nearest rounding: GPTQ's compensation switched off in
    # codec/calibrate.py) measured 0.1297, 0.50x: the bound 0.4x sits between the two.
    h = Harness(harness.tok, harness.model, Protocol(windows=2, prompts=4, new_tokens=16, calibration_windows=4),
                progress=False)
    r = h.measure_config(Q4.replace(rounding="gptq"), match=False)
    print(f"qins-4b-g64-gptq: kl {r['kl']:.5f} top1 {r['top1']:.4f} bpw {r['bpw']:.5f}")
    assert r["label"] == "qins-4b-g64-gptq" and abs(r["bpw"] - 4.25) < 0.01
    data_free = sum(wide[Q4.label]["kl"][-2:]) / 2
    assert r["kl"] < 0.4 * data_free
