"""Stages on tiny random decoders (tests/conftest.py): sites, calibration, swapping, errors, counts."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qins
from experiments.transport import (STAGES, applied, build_stage, decode_ops, find_sites, operating_points,
                            unit_errors)
from experiments.transport.native import QINSNativeLinear, QINSNativeMLP

IDS = torch.randint(0, 128, (3, 24), generator=torch.Generator().manual_seed(1))   # 2 calibration + 1 held out


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_sites_of_llama_style_models(make_model, arch):
    sites = find_sites(make_model(arch))
    assert [s.index for s in sites] == [0, 1]
    assert sites[1].v_proj == "model.layers.1.self_attn.v_proj" and sites[1].mlp == "model.layers.1.mlp"


def test_models_without_a_gated_mlp_are_refused(make_model):
    with pytest.raises(TypeError, match="Llama-style"):
        find_sites(make_model("gpt2"))


def test_operating_points_are_mean_magnitudes_of_the_layer_inputs(make_model):
    m = make_model("llama")
    ops = operating_points(m, IDS[:2], progress=False)
    with torch.no_grad():
        x = m.model.layers[0].input_layernorm(m.model.embed_tokens(IDS[:2])).double().reshape(-1, 64)
    op = ops["model.layers.0.self_attn.v_proj"]
    y = x @ m.model.layers[0].self_attn.v_proj.weight.double().t()
    assert op.tokens == 48
    torch.testing.assert_close(op.x_abs, x.abs().mean(0), rtol=1e-12, atol=1e-12)
    # y comes from the float32 layer (rounding ~6e-8 relative, measured 6.9e-8)
    torch.testing.assert_close(op.y_abs, y.abs().mean(0), rtol=1e-6, atol=1e-9)
    assert len(ops) == 2 * 4                                         # v, gate, up, down per layer


@pytest.mark.parametrize("stage,n_v,n_mlp", [("v-one", 1, 0), ("v-all", 2, 0), ("down", 0, 2), ("gate-up", 0, 2),
                                             ("mlp", 0, 2), ("all", 2, 2)])
def test_stage_contents(make_model, stage, n_v, n_mlp):
    m = make_model("llama")
    reps = build_stage(m, stage, operating_points(m, IDS[:2], progress=False))
    assert sum(isinstance(r, QINSNativeLinear) for r in reps.values()) == n_v
    assert sum(isinstance(r, QINSNativeMLP) for r in reps.values()) == n_mlp
    if stage == "v-one":
        assert list(reps) == ["model.layers.1.self_attn.v_proj"]     # middle of [0, 1]
    if stage == "down":
        assert all(isinstance(r.gate_proj, nn.Linear) and isinstance(r.down_proj, QINSNativeLinear)
                   for r in reps.values())


def test_applied_restores_the_float_model_exactly(make_model, token_ids):
    m = make_model("llama")
    ref = m(token_ids).logits
    reps = build_stage(m, "all", operating_points(m, IDS[:2], progress=False))
    with applied(m, reps):
        assert not torch.equal(m(token_ids).logits, ref)
    assert torch.equal(m(token_ids).logits, ref)
    with pytest.raises(RuntimeError), applied(m, reps):
        raise RuntimeError("mid-run failure")
    assert torch.equal(m(token_ids).logits, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])                 # qwen2: v_proj has a bias
@pytest.mark.parametrize("stage", STAGES)
def test_whole_model_becomes_exact_as_curvature_vanishes(make_model, arch, stage):
    # float64 model, first-order (carry) at alpha 1e-6: logits within 5.3e-6 of the float
    # model's (measured, all stages, both archs); at alpha 1 they are 0.26-1.02 off
    m = make_model(arch).double()
    ops = operating_points(m, IDS[:2], progress=False)
    ref = m(IDS[2:]).logits
    with applied(m, build_stage(m, stage, ops, "first-order", 1e-6, "carry")):
        assert rel(m(IDS[2:]).logits, ref) < 2e-5
    with applied(m, build_stage(m, stage, ops, "first-order", 1.0, "carry")):
        assert rel(m(IDS[2:]).logits, ref) > 0.1


def test_unit_errors_measure_candidates_on_the_float_inputs(make_model):
    m = make_model("llama")
    name = "model.layers.0.self_attn.v_proj"
    v = m.get_submodule(name)
    zero = nn.Linear(v.in_features, v.out_features, bias=False)
    nn.init.zeros_(zero.weight)
    same = copy.deepcopy(v)                                          # not v itself: its hook would recurse
    errs = unit_errors(m, IDS[2:], {name: {"same": same, "zero": zero}}, progress=False)
    assert errs["same"][name] == 0.0 and errs["zero"][name] == pytest.approx(1.0)


# -- decode operations ------------------------------------------------------------------------
# tiny Llama: 2 layers x 7 linears (q, k, v, o, gate, up, down); the tied lm_head is not a
# Pattern A site (qins.quantize keeps the output embedding in float by default)
COUNTS = {  # stage: (weight decodes, activation decodes, activation encodes)
    "v-one": (13, 1, 1), "v-all": (12, 2, 2), "down": (12, 2, 2), "gate-up": (10, 4, 2),
    "mlp": (8, 6, 4), "all": (6, 8, 6),
}


def test_pattern_a_count_of_the_float_model_and_of_a_quantized_one(make_model):
    m = make_model("llama")
    d = decode_ops(m)
    # q 64x64, k 32x64, v 32x64, o 64x64, gate 128x64, up 128x64, down 64x128 per layer
    assert d["weight_decodes"] == d["decode_ops"] == 14 and d["activation_encodes"] == 0
    assert d["weight_decoded_elements"] == 2 * 64 * (64 + 32 + 32 + 64 + 128 + 128 + 128)
    q = qins.quantize(make_model("llama"), qins.WeightConfig("qins", 8, 32), progress=False)
    assert decode_ops(q)["weight_decodes"] == 14


@pytest.mark.parametrize("stage", STAGES)
def test_decode_ops_per_stage(make_model, stage):
    m = make_model("llama")
    with applied(m, build_stage(m, stage, operating_points(m, IDS[:2], progress=False))):
        d = decode_ops(m, tokens=3)
    w, a, e = COUNTS[stage]
    assert (d["weight_decodes"], d["activation_decodes"], d["activation_encodes"]) == (w, a, e)
    assert d["decode_ops"] == w + a == 14                            # each matmul swaps a weight decode for a D
    assert d["activation_decoded_elements"] > 0 and d["tokens"] == 3
    assert not any(getattr(mod, "_tally", None) for mod in m.modules())   # the counter let go
