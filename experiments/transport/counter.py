"""Decode operations per forward pass, counted on the running model.

Definitions (one forward pass of the whole model):

  weight decode       one call of a layer whose weight Pattern A stores as codes and decodes
                      per call: every QINSLinear, and every float linear layer that
                      `qins.quantize` would replace (all nn.Linear / Conv1D but the output
                      embedding). Elements: O * I.
  activation decode   one D applied to an activation tensor by a Pattern B module.
                      Elements: the tensor's size (T * O for T tokens).
  activation encode   one E applied to an activation tensor. Elements: its size.

  decode_ops = weight decodes + activation decodes     (the seed's "decode operations")

The seed's "128" fits Phi-3.5-mini under Pattern A: 32 layers x 4 linear modules (fused
qkv_proj, o_proj, fused gate_up_proj, down_proj) = 128 weight decodes. That reading is ours,
the seed gives no derivation; `decode_ops` measures the model at hand instead.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch import nn

from qins.weights.linear import QINSLinear, is_linear_like
from .native import _Counted

KEYS = ("weight_decodes", "activation_decodes", "activation_encodes", "weight_decoded_elements",
        "activation_decoded_elements", "activation_encoded_elements")


def _output_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    return get() if get is not None else None


def pattern_a_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Layers that decode a weight per call under Pattern A (see the module docstring)."""
    out = _output_embedding(model)
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, QINSLinear) or (is_linear_like(m) and m is not out)]


@contextlib.contextmanager
def count_decodes(model: nn.Module) -> Iterator[Counter]:
    """Tally weight decodes and activation E/D while inside; yields the Counter (KEYS)."""
    tally: Counter = Counter(dict.fromkeys(KEYS, 0))
    hooks, counted = [], []

    def weight_hook(mod, _args, _out):
        tally["weight_decodes"] += 1
        tally["weight_decoded_elements"] += mod.in_features * mod.out_features if hasattr(mod, "in_features") \
            else mod.weight.numel()

    for _, mod in pattern_a_sites(model):
        hooks.append(mod.register_forward_hook(weight_hook))
    for mod in model.modules():
        if isinstance(mod, _Counted):
            mod._tally = tally
            counted.append(mod)
    try:
        yield tally
    finally:
        for h in hooks:
            h.remove()
        for mod in counted:
            del mod._tally                                           # back to the class default None


@torch.inference_mode()
def decode_ops(model: nn.Module, tokens: int = 1) -> dict:
    """Counts (KEYS, plus decode_ops) of one forward pass over `tokens` tokens (T = 1: a decoding step)."""
    device = next(model.parameters()).device
    ids = torch.zeros(1, tokens, dtype=torch.long, device=device)
    with count_decodes(model) as tally:
        model(input_ids=ids, use_cache=False)
    out = dict(tally)
    out["decode_ops"] = out["weight_decodes"] + out["activation_decodes"]
    out["tokens"] = tokens
    return out
