"""run_gates (the gate experiment) end to end on a tiny random Llama (tests/conftest.py).

The text is 2,600 words of a word-level vocabulary = 5 windows of 512 tokens: 3 for
calibration from the start (2 set the operating points, the 3rd holds out the layer errors),
1 for evaluation from the end, disjoint.
"""
from __future__ import annotations

import itertools
import string

import pytest
import torch

from qins.eval.harness import Protocol
from experiments.transport import run_gates

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]


def vocab(size):
    words = ["user", "assistant", ".", ","] + list(string.ascii_lowercase)
    words += ["".join(p) for p in itertools.product("etaoinshrd", repeat=2)]
    return {w: i for i, w in enumerate((SPECIALS + words)[:size])}


@pytest.fixture(scope="module")
def setup(make_model):
    """(tokenizer, tiny float Llama, text of 5 windows)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_model("llama")
    tk = Tokenizer(models.WordLevel(vocab(128), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    model.config.update(dict(bos_token_id=2, eos_token_id=3, pad_token_id=1))
    model.generation_config.update(bos_token_id=2, eos_token_id=3, pad_token_id=1)
    words = [w for w in vocab(128) if w not in SPECIALS]
    picks = torch.randint(0, len(words), (2600,), generator=torch.Generator().manual_seed(0)).tolist()
    return tok, model, " ".join(words[i] for i in picks)


def test_run_gates_measures_every_row_and_restores_the_model(setup, token_ids):
    tok, model, text = setup
    with torch.inference_mode():
        before = model(token_ids).logits
    seen = []
    doc = run_gates(tok, model, Protocol(windows=1, prompts=2, new_tokens=4, calibration_windows=3),
                    stages=("v-one", "all"), variants=("seed", "first-order"), text=text, progress=False,
                    on_row=lambda rows: seen.append(len(rows)))
    # 2 layers x 7 linears, the tied head not counted; v-one transports layer 1 (the middle of [0, 1])
    assert doc["meta"]["pattern_a"]["decode_ops"] == 14 and doc["meta"]["v_one_layer"] == 1
    assert doc["meta"]["held_out_layer_errors"] == "calibration window 2 (512 tokens)"
    rows = doc["rows"]
    assert [(r["stage"], r["variant"]) for r in rows] == [("v-one", "seed"), ("all", "seed"),
                                                         ("v-one", "first-order"), ("all", "first-order")]
    assert seen == [1, 2, 3, 4]                                      # on_row after every row
    for r in rows:
        assert r["windows"] == 1 and r["sequences"] == 2 and 0.0 <= r["match"] <= 1.0
        assert r["rel_err"] > 0 and r["gate"]["verdict"] in ("pass", "fail")
        assert r["units"] == (1 if r["stage"] == "v-one" else 4)    # v_proj of layer 1; 2 v_proj + 2 MLPs
    # every matmul swaps a weight decode for an activation decode (tests/transport/test_stages.py)
    assert rows[1]["decode_ops"] == 14 and rows[1]["activation_encodes"] == 6
    # the "all" gate's decode limit is scaled to this model's Pattern A count: 14 * 20/128
    assert rows[1]["gate"]["checks"]["decode ops <="]["threshold"] == pytest.approx(14 * 20 / 128)
    with torch.inference_mode():
        assert torch.equal(model(token_ids).logits, before)          # every swap undone


def test_error_only_and_bad_options(setup):
    tok, model, text = setup
    doc = run_gates(tok, model, Protocol(windows=1, calibration_windows=3), stages=("mlp",),
                    variants=("first-order",), alphas=(1.0, 0.01), signs="ignore", text=text,
                    error_only=True, progress=False)
    rows = doc["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 0.01] and all(r["signs"] == "ignore" for r in rows)
    # no token match without evaluation: the MLP gate (token match only) cannot decide
    assert all(r.get("match") is None and r["gate"]["verdict"] == "incomplete" for r in rows)
    assert all(r["rel_err"] > 0 and r["units"] == 2 for r in rows)
    with pytest.raises(ValueError, match="calibration_windows >= 2"):
        run_gates(tok, model, Protocol(windows=1, calibration_windows=1), text=text, error_only=True, progress=False)
    with pytest.raises(ValueError, match="not a decoder layer"):
        run_gates(tok, model, Protocol(windows=1, calibration_windows=3), layer=7, text=text, error_only=True,
                  progress=False)
    with pytest.raises(ValueError, match="unknown stage"):
        run_gates(tok, model, Protocol(windows=1, calibration_windows=3), stages=("v-two",), text=text,
                  error_only=True, progress=False)
