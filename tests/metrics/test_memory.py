"""memory_report on a tiny tied Llama, with stand-in quantized modules holding known buffers."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from qins.eval import format_bytes, memory_report


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


class FakeQLinear(nn.Module):
    """The stored state of a QINSLinear: 4-bit codes in int32 words, fp16 scales per group."""

    def __init__(self, out_features, in_features, group_size=32, curvature=True, offsets=False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        g = in_features // group_size
        self.register_buffer("qweight", torch.zeros(out_features, in_features * 4 // 32, dtype=torch.int32))
        self.register_buffer("scales", torch.ones(out_features, g, dtype=torch.float16))
        self.register_buffer("offsets", torch.zeros(out_features, g, dtype=torch.float16) if offsets else None)
        self.register_buffer("curvature", torch.ones(1) if curvature else None)


class FakeQEmbedding(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, qweight, scales):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)


def nbytes(t):
    return t.numel() * t.element_size()


def test_tied_embedding_counted_once():
    model = tiny_llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    params = list(model.named_parameters(remove_duplicate=False))
    buffers = list(model.named_buffers(remove_duplicate=False))
    untied = sum(nbytes(p) for _, p in params)
    emb = nbytes(model.model.embed_tokens.weight)
    r = memory_report(model)
    assert r["classes"]["float_params"] == untied - emb
    assert r["classes"]["other_buffers"] == sum(nbytes(b) for _, b in buffers)   # rotary inv_freq
    assert r["total_bytes"] == untied - emb + sum(nbytes(b) for _, b in buffers)
    assert r["params"] == sum(p.numel() for p in model.parameters())            # deduplicated
    assert r["quantized_weights"] == 0 and r["quantized_bytes"] == 0 and r["quantized_bpw"] == 0.0
    assert r["bpw_all"] == pytest.approx(8 * r["total_bytes"] / r["params"], rel=1e-12)
    assert 32.0 < r["bpw_all"] < 32.1                                          # fp32 + a few buffers


def test_quantized_modules_are_classified():
    model = tiny_llama()
    params_before = memory_report(model)["params"]
    mlp = model.model.layers[0].mlp
    w = mlp.down_proj.weight                                                   # (64, 128)
    mlp.down_proj = FakeQLinear(64, 128, group_size=32, curvature=True, offsets=True)
    q = mlp.down_proj
    r = memory_report(model)
    c = r["classes"]
    assert c["codes"] == nbytes(q.qweight) == 64 * 16 * 4
    assert c["scales"] == nbytes(q.scales) == 64 * 4 * 2
    assert c["offsets"] == nbytes(q.offsets)
    assert c["curvature"] == 4
    assert r["quantized_weights"] == 64 * 128
    assert r["quantized_bytes"] == c["codes"] + c["scales"] + c["offsets"] + c["curvature"]
    # 4 bits of codes + 2 * 16 bits per 32 weights + one fp32 curvature
    assert r["quantized_bpw"] == pytest.approx(4 + 32 / 32 + 32 / (64 * 128), rel=1e-12)
    assert r["params"] == params_before                                        # same weights, other form
    assert c["float_params"] == memory_report(tiny_llama())["classes"]["float_params"] - nbytes(w)
    assert r["total_bytes"] == sum(c.values())


def test_tied_quantized_codes_counted_once():
    model = tiny_llama()
    head = FakeQLinear(128, 64, group_size=64, curvature=False)
    model.lm_head = head
    model.model.embed_tokens = FakeQEmbedding(128, 64, head.qweight, head.scales)
    r = memory_report(model)
    assert r["quantized_weights"] == 128 * 64
    assert r["classes"]["codes"] == nbytes(head.qweight)
    assert r["classes"]["scales"] == nbytes(head.scales)
    assert r["classes"]["curvature"] == 0 and r["classes"]["offsets"] == 0


def test_log8_scales_count_as_stored_in_bpw():
    """bpw counts bytes stored: log8 scales (held float16) as a byte per group + a float16 per
    row; the classes and total_bytes stay what memory holds."""
    import qins
    from qins.weights.quantize import quantized_modules
    model = tiny_llama()
    qins.quantize(model, qins.WeightConfig("qins", 4, 32, scale_dtype="log8"), include_embeddings=True, progress=False)
    r = memory_report(model)
    qs = [m.quantized for _, m in quantized_modules(model) if getattr(m, "tied_to", None) is None]
    stored = sum(q.nbytes() for q in qs)
    held = sum(sum(nbytes(t) for t in q.tensors().values()) for q in qs)
    assert stored < held and r["quantized_bytes"] == held
    assert r["quantized_bpw"] == pytest.approx(8 * stored / r["quantized_weights"], rel=1e-12)
    assert r["stored_bytes"] == r["total_bytes"] - (held - stored)
    assert r["bpw_all"] == pytest.approx(8 * r["stored_bytes"] / r["params"], rel=1e-12)
    # and equal to what qins.save writes
    from qins.weights.serialization import _state_dict_once
    tensors, _ = _state_dict_once(model)
    assert r["stored_bytes"] == sum(nbytes(t) for t in tensors.values()) + sum(
        nbytes(b) for n, b in model.named_buffers() if n.endswith("inv_freq"))


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.50 KiB"
    assert format_bytes(3 * 2**20) == "3.00 MiB"
    assert format_bytes(2**30 * 1.25) == "1.25 GiB"
