"""greedy_decode (static cache, one step on fixed buffers) against HF generate on tiny random models.

On the CPU the step runs eagerly; the CUDA graph path is exercised by benchmarks/gpu/decode.py
on the device machine, which checks that the graph reproduces the eager steps.
"""
from __future__ import annotations

import copy

import pytest
import torch

import qins
from qins.metrics.decode import StaticDecoder, greedy_decode


def hf_greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    gc = copy.deepcopy(model.generation_config)
    gc.do_sample, gc.eos_token_id, gc.pad_token_id, gc.max_new_tokens = False, None, 0, n
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)
    return out[:, ids.shape[1]:]


# float32 on the CPU: the static cache and HF's dynamic cache give the same argmax at every step
# on these models (a near-tie could flip one; none does at these seeds)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_tokens_equal_hf_generate(make_model, token_ids, arch):
    model = make_model(arch)
    run = greedy_decode(model, token_ids, steps=10)
    assert run.tokens.shape == (2, 11) and run.first_logits.shape == (2, model.config.vocab_size)
    assert torch.equal(run.tokens, hf_greedy(model, token_ids, 11))
    assert run.mode == "eager" and run.error is None            # CPU: no graph, and no error
    assert run.steps == 10 and run.tokens_per_second > 0


def test_first_logits_are_the_prompt_forward(make_model, token_ids):
    model = make_model("llama")
    run = greedy_decode(model, token_ids, steps=1)
    with torch.inference_mode():
        ref = model(token_ids).logits[:, -1].float()
    torch.testing.assert_close(run.first_logits, ref, atol=1e-5, rtol=1e-5)   # fp32, same ops
    assert torch.equal(run.tokens[:, 0], ref.argmax(-1))


def test_quantized_model_decodes_like_hf_generate(make_model, token_ids):
    model = qins.quantize(make_model("llama", tie=False), qins.WeightConfig("qins", 4, 64), progress=False)
    run = greedy_decode(model, token_ids, steps=6)
    assert torch.equal(run.tokens, hf_greedy(model, token_ids, 7))


def test_rewind_replays_the_same_tokens(make_model, token_ids):
    model = make_model("llama")
    with torch.inference_mode():
        dec = StaticDecoder(model, token_ids, steps=5)
        dec.prefill()
        start = dec.snapshot()
        for _ in range(5):
            dec.step()
        first = dec.generated(5)
        dec.restore(start)
        assert int(dec.counters[0]) == token_ids.shape[1]
        for _ in range(5):
            dec.step()
        assert torch.equal(dec.generated(5), first)


def test_max_seconds_stops_the_loop(make_model, token_ids):
    run = greedy_decode(make_model("llama"), token_ids, steps=50, max_seconds=0.0)
    assert run.steps == 1 and run.tokens.shape == (2, 2)


def test_bad_arguments(make_model, token_ids):
    model = make_model("llama")
    with pytest.raises(ValueError, match="mode"):
        greedy_decode(model, token_ids, steps=2, mode="fast")
    with pytest.raises(ValueError, match="steps"):
        greedy_decode(model, token_ids, steps=0)


def test_sliding_window_cache_is_not_captured(make_model, token_ids):
    """A sliding-window layer's length lives on the host: compile (or a graph) falls back to
    eager steps with the reason, and the tokens stay right."""
    model = make_model("mistral")
    run = greedy_decode(model, token_ids, steps=4, mode="compile")
    assert run.mode == "eager" and "sliding-window" in run.error
    assert torch.equal(run.tokens, hf_greedy(model, token_ids, 5))
