"""The screen's wrapper (a post-RoPE cache with keys turned back outside it) equals the cache's
own pre-RoPE keys up to float rounding, on a tiny model."""
from __future__ import annotations

import torch

from experiments.kv_prerope.screen import prerope
from qins.kv.cache import QINSCache


def test_wrapper_matches_the_built_cache(make_model, token_ids):
    model = make_model("llama")
    with torch.inference_mode():
        outs = []
        for make in (lambda: prerope(QINSCache(model, bits=8, residual=0, group=16, k_prerope=False), model),
                     lambda: QINSCache(model, bits=8, residual=0, group=16, k_prerope=True),
                     lambda: QINSCache(model, bits=8, residual=0, group=16, k_prerope=False)):
            cache = make()
            outs.append(torch.cat([model(token_ids[:, i:i + 8], past_key_values=cache, use_cache=True).logits
                                   for i in range(0, token_ids.shape[1], 8)], 1))
    wrapped, built, post = outs
    assert float((wrapped - built).abs().max()) < 1e-3 * float(built.abs().max())
    assert not torch.equal(built, post)
