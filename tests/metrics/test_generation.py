"""load_prompts, greedy_generate on a tiny random Llama, token_match on hand-made sequences."""
from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from qins.eval import greedy_generate, load_prompts, token_match
from qins.metrics.generation import _render

VOCAB = 128
PROMPTS = ["w1 w2 w3", "w5", "w7 w8 w9 w10 w11", "w20 w21"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: '<pad>'=0, '<s>'=1, '</s>'=2, '<unk>'=3, 'w{i}'=4+i; no pad token set."""
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def model(make_model):
    m = make_model("llama")
    m.generation_config.eos_token_id = None       # tests below choose their own EOS
    return m


# ---- load_prompts ----------------------------------------------------------------------------

def test_prompts_ship_with_the_package():
    prompts = load_prompts()
    assert len(prompts) >= 40
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert len(set(prompts)) == len(prompts)
    assert load_prompts(5) == prompts[:5]


# ---- greedy_generate -------------------------------------------------------------------------

def test_batched_left_padding_equals_one_by_one(model):
    tok = tiny_tokenizer()
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    single = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=1, progress=False)
    assert batched == single
    assert [len(s) for s in batched] == [10] * 4
    assert len({tuple(s) for s in batched}) == 4                   # not a degenerate model
    # tokenizer state restored
    assert tok.padding_side == "right" and tok.pad_token is None


def test_new_tokens_only_and_same_as_plain_generate(model):
    tok = tiny_tokenizer()
    out = greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=6, progress=False)
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=6, pad_token_id=0)
    assert out == [full[0, ids.shape[1]:].tolist()]


def test_cut_after_first_eos(model, make_model):
    tok = tiny_tokenizer()
    free = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    eos = free[0][2]
    m = make_model("llama")
    m.generation_config.eos_token_id = eos
    cut = greedy_generate(m, tok, PROMPTS, max_new_tokens=10, batch_size=4, progress=False)
    for f, c in zip(free, cut):
        expected = f[:f.index(eos) + 1] if eos in f else f
        assert c == expected
    assert cut[0] == free[0][:free[0].index(eos) + 1]


def test_tokenizer_eos_also_stops(model):
    tok = tiny_tokenizer()
    free = greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=10, progress=False)[0]
    eos_word = f"w{free[1] - 4}"
    tok2 = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token=eos_word)
    out = greedy_generate(model, tok2, PROMPTS[:1], max_new_tokens=10, progress=False)[0]
    assert out == free[:free.index(free[1]) + 1]


def test_chat_template_is_applied(model):
    tok = tiny_tokenizer()
    tok.chat_template = ("{% for m in messages %}<s> {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} w99{% endif %}")
    assert _render(tok, "w1 w2") == ("<s> w1 w2 w99", False)
    out = greedy_generate(model, tok, ["w1 w2"], max_new_tokens=5, progress=False)
    ids = torch.tensor([[1, 5, 6, 103]])
    full = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=5, pad_token_id=0)
    assert out == [full[0, 4:].tolist()]


def test_raw_prompt_without_chat_template():
    assert _render(tiny_tokenizer(), "w1 w2") == ("w1 w2", True)


# ---- token_match -----------------------------------------------------------------------------

def test_token_match_hand_made():
    ref = [[1, 2, 3, 4], [5, 6, 7], [8, 9]]
    test = [[1, 2, 3, 4], [5, 0, 7, 1], [8]]
    r = token_match(ref, test)
    # hits 4 + 2 + 1 of 9 ref tokens; first divergence 4 (identical), 1, 1 (test ends)
    assert r == {"match": 7 / 9, "identical": 1, "sequences": 3, "tokens": 9,
                 "first_divergence_mean": 2.0}


def test_token_match_longer_test_is_not_identical():
    r = token_match([[1, 2]], [[1, 2, 3]])
    assert r["match"] == 1.0 and r["identical"] == 0 and r["first_divergence_mean"] == 2.0


def test_token_match_all_identical_and_disjoint():
    seqs = [[1, 2, 3], [4, 5]]
    assert token_match(seqs, seqs) == {"match": 1.0, "identical": 2, "sequences": 2, "tokens": 5,
                                       "first_divergence_mean": 2.5}
    r = token_match(seqs, [[9, 9, 9], [9, 9]])
    assert r["match"] == 0.0 and r["identical"] == 0 and r["first_divergence_mean"] == 0.0


def test_token_match_needs_the_same_number_of_sequences():
    with pytest.raises(ValueError):
        token_match([[1]], [[1], [2]])
