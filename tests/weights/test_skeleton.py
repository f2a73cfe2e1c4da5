"""qins.load builds on the meta device: no float weight of a quantized layer is ever made.

The reference is the previous load path, kept here: a randomly initialised float model from
its config, QINS modules swapped in, the file copied in. Both must give bit-identical logits
(torch.equal) and the same non-persistent buffers, which the file does not hold.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import qins
from qins.codec.config import WeightConfig
from qins.weights import serialization
from qins.weights.linear import QINSEmbedding, QINSLinear
from qins.weights.plan import read_plan
from qins.weights.skeleton import check_materialised, params_on_meta
from qins.weights.swap import modules_from_plan


def eager_load(path, dtype=torch.float32):
    """The load path before meta construction: float skeleton, swap, copy."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    doc = read_plan(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    modules_from_plan(model, doc["modules"])
    state = load_file(str(path / serialization.WEIGHTS_NAME))
    for dropped, kept in doc["tied"].items():
        state[dropped] = state[kept]
    model.load_state_dict(state, strict=True)
    serialization.record_plan(model, doc["modules"])
    if doc["tied"]:
        model.tie_weights()
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def non_persistent(model) -> dict[str, torch.Tensor]:
    persistent = set(model.state_dict())
    return {n: b for n, b in model.named_buffers() if n not in persistent}


CASES = [("llama", False), ("qwen2", False), ("mistral", False), ("gpt2", False), ("llama", True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch,include_embeddings", CASES,
                         ids=[f"{a}-{'embeddings' if e else 'linears'}" for a, e in CASES])
def test_meta_load_matches_the_eager_load(tmp_path, make_model, token_ids, arch, include_embeddings, dtype):
    model = qins.quantize(make_model(arch), WeightConfig("qins", 4, 32), include_embeddings=include_embeddings,
                          progress=False)
    path = qins.save(model, tmp_path / "m")
    loaded, ref = qins.load(path, dtype=dtype), eager_load(path, dtype)
    assert torch.equal(logits(loaded, token_ids), logits(ref, token_ids))
    if dtype == torch.float32:
        assert torch.equal(logits(loaded, token_ids), logits(model, token_ids))
    # rotary inv_freq, GPT-2's causal mask...: computed when the model is built, not in the file
    bufs, ref_bufs = non_persistent(loaded), non_persistent(ref)
    assert set(bufs) == set(ref_bufs)
    assert all(b.device == ref_bufs[n].device and b.dtype == ref_bufs[n].dtype and torch.equal(b, ref_bufs[n])
               for n, b in bufs.items())
    sd, ref_sd = loaded.state_dict(), ref.state_dict()
    assert all(sd[k].dtype == ref_sd[k].dtype and torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    for m in loaded.modules():                        # decode tables rebuilt from the loaded curvature
        if isinstance(m, QINSEmbedding) or (isinstance(m, QINSLinear) and m.tied_to is None):
            assert m._table is not None and not m._table.is_meta and m._table_key == m._curvature_key()
    if include_embeddings:                           # quantized embedding + tied head
        assert loaded.lm_head.tied_to is loaded.model.embed_tokens
    elif arch in ("llama", "qwen2", "gpt2"):         # float tied head: still one tensor
        emb = loaded.transformer.wte if arch == "gpt2" else loaded.model.embed_tokens
        assert loaded.lm_head.weight is emb.weight


class FloatAllocations(TorchDispatchMode):
    """Records the shape of every float tensor an op makes off the meta device (views excluded:
    they allocate nothing; GPT-2's float position table (64, 64) is viewed while loading)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:
            return out
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta:
                self.shapes.append((str(func), tuple(t.shape)))
        return out


def weight_shapes(model) -> list[set[tuple[int, ...]]]:
    """Per quantized layer, {(O, I), (I, O)}: GPT-2's Conv1D stores its weight transposed."""
    return [{tuple(m.weight_shape), tuple(m.weight_shape[::-1])}
            for m in model.modules() if isinstance(m, (QINSLinear, QINSEmbedding))]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_no_float_weight_is_materialised(tmp_path, make_model, arch):
    model = qins.quantize(make_model(arch), WeightConfig("qins", 4, 32), include_embeddings=True, progress=False)
    path = qins.save(model, tmp_path / "m")
    layers = weight_shapes(model)
    shapes = set().union(*layers)
    with FloatAllocations() as probe:
        qins.load(path)
    assert [s for s in probe.shapes if s[1] in shapes] == []
    with FloatAllocations() as probe:               # the probe sees every layer's on the eager path
        eager_load(path)
    made = {s[1] for s in probe.shapes}
    assert all(layer & made for layer in layers)


def test_from_pretrained_materialises_no_float_weight(tmp_path, make_model):
    # transformers' loader already builds on meta and swaps the QINS modules in there
    from transformers import AutoModelForCausalLM
    model = qins.quantize(make_model("llama"), WeightConfig("qins", 4, 32), include_embeddings=True, progress=False)
    path = qins.save(model, tmp_path / "m")
    shapes = set().union(*weight_shapes(model))
    with FloatAllocations() as probe:
        AutoModelForCausalLM.from_pretrained(path)
    assert [s for s in probe.shapes if s[1] in shapes] == []


class WithBuffers(nn.Module):
    def __init__(self, filled_from_empty: bool = False):
        super().__init__()
        self.proj = nn.Linear(8, 4)
        self.norm = nn.Parameter(torch.ones(4))                # not made by torch.empty: moved
        self.register_buffer("freq", 1.0 / 2 ** torch.arange(4, dtype=torch.float32), persistent=False)
        if filled_from_empty:
            self.register_buffer("table", torch.empty(3).fill_(1.0), persistent=False)


def test_params_on_meta_keeps_buffers_real():
    with params_on_meta():
        m = WithBuffers()
    assert m.proj.weight.is_meta and m.proj.bias.is_meta and m.norm.is_meta
    assert type(m.norm) is nn.Parameter and m.norm.requires_grad
    assert m.freq.device.type == "cpu" and torch.equal(m.freq, torch.tensor([1.0, 0.5, 0.25, 0.125]))
    assert not nn.Linear(2, 2).weight.is_meta          # patches undone on exit
    with pytest.raises(ValueError, match=r"3 tensor\(s\) were neither in the file.*proj\.weight"):
        check_materialised(m, "here")


def test_a_buffer_filled_from_empty_is_named():
    with params_on_meta():
        m = WithBuffers(filled_from_empty=True)
    m.load_state_dict({k: torch.zeros_like(v, device="cpu") for k, v in m.state_dict().items()}, assign=True)
    with pytest.raises(ValueError, match=r"here: 1 tensor\(s\).*'table'"):
        check_materialised(m, "here")
