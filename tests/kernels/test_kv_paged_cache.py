"""QINSCache through model.generate with the paged kernel path (quantize-on-append + decode
attention over pages, routed by the `qins_paged` attention) against the reference path
(pages decoded to float, SDPA) on a tiny random Llama with GQA and head dim 32.

CPU (CI): QINS_KERNELS=triton under Triton's interpreter (paged=True), one decoder layer (about
20 s a case on this loaded 2-core machine). Tolerance on the per-step logits: 1e-3 of their
range: the kernel's fp16 products (test_kv_attention.py) through one random layer (measured
1.3e-4 at 4 bits, 5.1e-5 at 8 bits with a padded row and 2 beams; with two layers and the
same prompt 1.1e-3 and 7.9e-5)."""
import pytest
import torch

from qins._compat import cache_kwarg
from qins.kv.cache import QINSCache

from .conftest import DEVICE, needs_triton

pytestmark = needs_triton


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=192, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=32, attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(DEVICE).eval()


def _generate(model, ids, cache, mask=None, beams=1):
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             num_beams=beams, output_scores=True, return_dict_in_generate=True,
                             **{cache_kwarg(model): cache})
    return out.sequences, torch.stack(out.scores, 1)


def _recipe(bits: int) -> dict:
    """Pre-RoPE keys, rotated values and a key plan (mixed widths that fit a uniform row)."""
    from qins.kv.config import KVConfig
    from qins.kv.plan import KeyPlan
    from .test_kv_attention import _plan_widths
    w = _plan_widths(2, 32, bits, 3)
    plan = KeyPlan({0: (bits, 16, tuple(tuple(int(x) for x in r) for r in w))}, "test", prerope=True)
    return dict(config=KVConfig(k_bits=bits, residual=0, group=16, k_prerope=True, v_rotate=True), key_plan=plan)


@pytest.mark.parametrize("bits,padded,recipe", [(4, False, False), (8, True, False), (4, False, True)])
def test_generate_paged_kernels_match_reference(bits, padded, recipe, monkeypatch):
    # padded: row 1 left-padded by 4 tokens, so the kernel reads the key padding mask; and beam
    # search (2 beams): reorder shares pages, the next append copies them on write. recipe:
    # pre-RoPE keys, rotated values and a key plan, the lowest-error cache, on the Triton kernel
    model = _model()
    kw = _recipe(bits) if recipe else dict(bits=bits, residual=0, group=16)
    ids = torch.randint(0, 128, (2, 42), generator=torch.Generator().manual_seed(bits)).to(DEVICE)   # 6 new: a seal
    mask = None
    if padded:
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
    monkeypatch.setenv("QINS_KERNELS", "triton")
    paged = QINSCache(model, paged=True, **kw)
    beams = 2 if padded else 1
    seq_k, scores_k = _generate(model, ids, paged, mask, beams)
    assert paged.paged and set(paged.paths().values()) <= {"triton", "cuda"}
    if recipe:
        assert paged.layers[0].k_widths is not None and paged.layers[0].rope is not None
    monkeypatch.setenv("QINS_KERNELS", "reference")
    ref = QINSCache(model, paged=False, **kw)
    seq_r, scores_r = _generate(model, ids, ref, mask, beams)
    assert set(ref.paths().values()) == {"reference"}
    err = float((scores_k - scores_r).abs().max() / (scores_r.max() - scores_r.min()))
    assert err < 1e-3, f"logit error {err:.2e} of the range"
    assert torch.equal(seq_k, seq_r)


def test_paged_needs_a_model_on_sdpa():
    model = _model()
    with pytest.raises(ValueError, match="needs the model"):
        QINSCache(model.config, bits=4, paged=True)
    assert not QINSCache(model, bits=4).paged or DEVICE == "cuda"     # auto: CUDA only
