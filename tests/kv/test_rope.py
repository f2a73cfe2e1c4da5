"""Pre-RoPE keys (kv/rope.py): the rotation, the model's frequencies, the layer's round trip and
the key plan's record of how it was calibrated."""
import pytest
import torch

from qins.kv import KVConfig, _compat
from qins.kv.cache import QINSCache
from qins.kv.layer import QINSLayer
from qins.kv.plan import KeyPlan
from qins.kv.rope import Rope


def _freqs(R, base=10000.0):
    return 1.0 / base ** (torch.arange(0, R, 2, dtype=torch.float32) / R)


def test_rotate_matches_transformers_and_inverts():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    D, t0, n = 64, 1000, 37
    f = _freqs(D)
    x = torch.randn(2, 3, n, D, generator=torch.Generator().manual_seed(0))
    ang = torch.arange(t0, t0 + n, dtype=torch.float32)[:, None] * f[None]
    emb = torch.cat([ang, ang], -1)[None]                       # transformers' (B, T, D) cos/sin layout
    want, _ = apply_rotary_pos_emb(x, x, emb.cos(), emb.sin())
    r = Rope(f)
    got = r.rotate(x, t0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(r.rotate(got, t0, inverse=True), x, rtol=0, atol=1e-5)
    assert r.rotate(x, 0)[..., 0, :].equal(x[..., 0, :])        # position 0 turns nothing


def test_partial_rotary_leaves_the_other_channels():
    x = torch.randn(1, 2, 9, 48, generator=torch.Generator().manual_seed(1))
    r = Rope(_freqs(32))
    y = r.rotate(x, 5)
    assert y[..., 32:].equal(x[..., 32:]) and not torch.allclose(y[..., :32], x[..., :32])
    with pytest.raises(ValueError, match="do not fit"):
        Rope(_freqs(64)).rotate(x, 0)
    with pytest.raises(ValueError, match="finite"):
        Rope(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("bits", [4, 8])
def test_layer_reads_keys_back_in_the_models_frame(bits):
    # keys at late positions turn fast: a layer that quantized them pre-RoPE and forgot to turn
    # them back would be off by the whole rotation; both frames must read back within the
    # quantization error, and pre-RoPE keys are closer for keys that are smooth before RoPE
    D, T, t0 = 32, 96, 0
    g = torch.Generator().manual_seed(bits)
    pre = torch.randn(1, 2, 1, D, generator=g) * 3 + torch.randn(1, 2, T, D, generator=g) * 0.3
    r = Rope(_freqs(D, 100.0))
    k = r.rotate(pre, t0)
    errs = {}
    for name, rope in (("post", None), ("pre", r)):
        layer = QINSLayer(bits, bits, residual=0, group=16, page_kb=16, sink=0, k_zero=bits < 8, expect_heads=2,
                          expect_head_dim=D, rope=rope)
        got, _ = layer.update(k[:, :, :50], k[:, :, :50])
        got, _ = layer.update(k[:, :, 50:], k[:, :, 50:])        # pages, then staging past the last group
        assert layer.n_quantized == 96 - 96 % 16
        errs[name] = float((got - k).abs().max() / k.abs().max())
    # measured max |error| / max |k|: 4 bits 0.0077 pre-RoPE against 0.062 post; 8 bits 6.5e-4
    # against 6.4e-3 (a 4-bit step of this range is about 0.13)
    assert errs["pre"] < (0.02 if bits == 4 else 2e-3)
    assert errs["pre"] < errs["post"] / 2, errs


def test_model_frequencies_from_model_and_config(make_model):
    model = make_model("llama")
    types, _ = _compat.layer_types(model.config)
    a = _compat.rope_frequencies(model, types)
    b = _compat.rope_frequencies(model.config, types)
    assert set(a) == set(range(len(types))) and all(torch.equal(a[i], b[i]) for i in a)
    cache = QINSCache(model, bits=4, residual=0, k_prerope=True)
    assert all(layer.rope is not None and layer.rope.same(cache.layers[0].rope) for layer in cache.layers)
    assert all(layer.rope is None for layer in QINSCache(model, bits=4).layers)          # the default: off


def test_explicit_prerope_on_a_model_without_rope_is_refused(make_model):
    model = make_model("llama")
    for name, m in list(model.named_modules()):
        if name.endswith("rotary_emb"):
            parent = model.get_submodule(name.rsplit(".", 1)[0])
            setattr(parent, name.rsplit(".", 1)[1], torch.nn.Identity())   # no inv_freq anywhere
    with pytest.raises(ValueError, match="no rotary embedding"):
        QINSCache(model, bits=4, k_prerope=True)


def test_prerope_generation_close_to_float(make_model):
    # end to end through generate: 8-bit pre-RoPE keys at residual 0 agree with the float cache
    model = make_model("llama")
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        ref = model(ids).logits
        for pre in (True, False):
            cache = QINSCache(model, bits=8, residual=0, group=16, k_prerope=pre)
            out = torch.cat([model(ids[:, i:i + 8], past_key_values=cache, use_cache=True).logits
                             for i in range(0, 40, 8)], 1)
            # 8-bit keys and values of a random tiny Llama, measured max |logit error| / max |logit|:
            # 2.7% pre-RoPE, 3.2% post-RoPE (keys left turned back would be off by far more: seen failing)
            assert float((out - ref).abs().max()) < 0.05 * float(ref.abs().max())


def test_key_plan_records_its_frame():
    plan = KeyPlan({0: (4, 16, ((4,) * 32,) * 2)}, "t", prerope=True)
    back = KeyPlan.from_dict(plan.to_dict())
    assert back.prerope and back.widths_for(0, 4, 16, True).shape == (2, 32)
    with pytest.raises(ValueError, match="pre-RoPE keys; this cache keeps layer 0's keys post-RoPE"):
        back.widths_for(0, 4, 16, False)
    old = plan.to_dict()
    del old["prerope"]                                            # a plan saved before the field
    assert not KeyPlan.from_dict(old).prerope


def test_config_field():
    assert not KVConfig().prerope_for(4) and KVConfig(k_prerope=True).prerope_for(4)
    assert KVConfig(k_bits=4, residual=0, k_prerope=True, v_rotate=True).label == "kv-qins-4b-r0-prerope-vrot"
    assert KVConfig(k_bits=4, residual=0).label == "kv-qins-4b-r0"
    assert KVConfig.from_dict(KVConfig(k_prerope=True).to_dict()).k_prerope is True
    with pytest.raises(ValueError, match="k_prerope"):
        KVConfig(k_prerope="yes")
