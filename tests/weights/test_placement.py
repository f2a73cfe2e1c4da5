"""device_map placement of QINS models (accelerate), on the CPU: "cpu" maps give logits equal
(torch.equal) to a plain load; maps that split a QINS module, put it on disk/meta, or separate
a tied lm_head from its embedding are refused, naming the module."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import qins
from qins.weights.linear import QINSLinear
from qins.weights.placement import check_device_map, check_placement

Q4 = qins.WeightConfig("qins", 4, 32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    qins.quantize(model, Q4, progress=False)
    path = tmp_path_factory.mktemp("placement") / "m"
    qins.save(model, path)
    return path


IDS = torch.arange(10).view(1, 10)


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


CPU_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
           "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("device_map", ["auto", "balanced", CPU_MAP, {"": "cpu"}])
def test_load_with_device_map(saved, device_map):
    ref = logits(qins.load(saved))
    model = qins.load(saved, device_map=device_map)
    assert all(str(d) == "cpu" for d in model.hf_device_map.values())
    assert torch.equal(logits(model), ref)


def test_from_pretrained_with_device_map(saved):
    qins.register_transformers()
    ref = logits(qins.load(saved))
    model = AutoModelForCausalLM.from_pretrained(saved, device_map=CPU_MAP)
    assert torch.equal(logits(model), ref)


@pytest.mark.parametrize("bad, match", [
    ({**CPU_MAP, "model.layers.0.self_attn.q_proj.qweight": "cpu"}, r"splits the QINS module 'model\.layers\.0\.self_attn\.q_proj'"),
    ({**CPU_MAP, "model.layers.1": "disk"}, r"QINS module 'model\.layers\.1\..*' on 'disk'"),
    ({**CPU_MAP, "model.layers.1.mlp.down_proj": "meta"}, r"'model\.layers\.1\.mlp\.down_proj' on 'meta'"),
    ({"model.embed_tokens": "cpu"}, r"places no device for the QINS module"),
])
def test_bad_maps_name_the_module(saved, bad, match):
    with pytest.raises(ValueError, match=match):
        qins.load(saved, device_map=bad)


def test_from_pretrained_refuses_a_split(saved):
    qins.register_transformers()
    bad = {**CPU_MAP, "model.layers.0.mlp.gate_proj.scales": "cpu"}
    with pytest.raises(ValueError, match=r"splits the QINS module 'model\.layers\.0\.mlp\.gate_proj'"):
        AutoModelForCausalLM.from_pretrained(saved, device_map=bad)


def test_tied_lm_head_stays_with_its_embedding(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    qins.quantize(model, Q4, include_embeddings=True, progress=False)
    assert model.lm_head.tied_to is model.model.embed_tokens
    good = {"": "cpu"}
    check_device_map(model, good)
    with pytest.raises(ValueError, match=r"tied QINS lm_head 'lm_head'.*'model\.embed_tokens'"):
        check_device_map(model, {"": "cpu", "lm_head": 0})


def test_mixed_devices_inside_one_module(saved):
    model = qins.load(saved)
    check_placement(model)
    q = model.model.layers[1].self_attn.k_proj
    assert isinstance(q, QINSLinear)
    q._buffers["scales"] = q.scales.to("meta")
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.k_proj' holds tensors on several devices"):
        check_placement(model)


def test_cache_layers_follow_the_attention_device(saved):
    # each QINSCache layer allocates its pages on the device of the keys it is given
    model = qins.load(saved, device_map=CPU_MAP)
    cache = qins.QINSCache(model, bits=4, residual=0)
    with torch.no_grad():
        model(IDS, past_key_values=cache, use_cache=True)
    for i, layer in enumerate(cache.layers):
        dev = model.model.layers[i].self_attn.k_proj.qweight.device
        assert layer.device == dev
