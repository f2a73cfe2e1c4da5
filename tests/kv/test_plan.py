"""KeyPlan: the width allocator, JSON round trip, calibration on tiny models and the cache
reading plan pages back exactly; a slow floor on the default model."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from qins.kv import KVConfig
from qins.kv._compat import layer_types
from qins._compat import cache_kwarg
from qins.kv.cache import QINSCache
from qins.kv.layer import QINSLayer
from qins.kv.layout import bytes_needed
from qins.kv.codec import dequantize_keys_mixed
from qins.codec.packing import packed_words
from qins.kv.plan import MENU, KeyPlan, allocate_widths, calibrate_keys, model_samples, resolve_key_plan


def cache_kw(model, cache) -> dict:
    """The cache as the keyword the installed transformers takes ('cache' on 5.2x,
    'past_key_values' on 5.17), so the tests run on every supported version."""
    return {cache_kwarg(model): cache}


def _convex_cost(D, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor(MENU, dtype=torch.float64)
    return (torch.rand(D, 1, generator=g, dtype=torch.float64) * 100) * 4.0 ** -w.view(1, -1)


def _total(cost, widths):
    return float(sum(cost[d, MENU.index(w)] for d, w in enumerate(widths)))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", range(3))
def test_allocation_fits_budget_and_row_and_is_locally_optimal(bits, seed):
    cost = _convex_cost(64, seed)
    w = allocate_widths(cost, bits)
    room = packed_words(64, bits) * 4
    assert sum(w) <= bits * 64 and bytes_needed(w) <= room
    # no single widening that keeps the budget and the byte fit lowers the cost
    for d in range(64):
        for nw in MENU:
            if nw > w[d] and sum(w) - w[d] + nw <= bits * 64:
                trial = w[:d] + [nw] + w[d + 1:]
                if bytes_needed(trial) <= room:
                    assert _total(cost, trial) >= _total(cost, w)
    # uniform widths fit the row's bytes at 2 and 4 bits (3, 5, 6 bits: two fields a byte); where
    # they fit, the plan is never worse than them
    assert (bytes_needed([bits] * 64) <= room) == (bits in (2, 4))
    if bits in (2, 4):
        assert _total(cost, w) <= _total(cost, [bits] * 64)


@pytest.mark.parametrize("seed", range(5))
def test_allocation_matches_exhaustive_search_on_four_channels(seed):
    # 4 channels, 2 bits each on average: every assignment of MENU widths within 8 bits
    cost = _convex_cost(4, seed)
    best = min((c for c in itertools.product(MENU, repeat=4) if sum(c) <= 8), key=lambda c: _total(cost, c))
    assert _total(cost, allocate_widths(cost, 2)) == pytest.approx(_total(cost, best), rel=1e-12)


def _plan(H=2, D=32, bits=4, group=16, layers=(0, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        w = [allocate_widths(torch.rand(D, 1, generator=g, dtype=torch.float64) * 4.0 ** -torch.tensor(
            MENU, dtype=torch.float64).view(1, -1), bits) for _ in range(H)]
        out[i] = (bits, group, tuple(tuple(r) for r in w))
    return KeyPlan(out, "test")


def test_plan_json_round_trip_and_bad_files(tmp_path):
    p = _plan()
    path = p.save(tmp_path / "plan.json")
    q = KeyPlan.load(path)
    assert q == p and q.histogram() == p.histogram() and q.mean_bits() <= 4
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a readable key plan"):
        KeyPlan.load(tmp_path / "bad.json")
    d = p.to_dict()
    d["version"] = 99
    (tmp_path / "new.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="version 99"):
        KeyPlan.load(tmp_path / "new.json")
    d = p.to_dict()
    d["layers"]["0"]["widths"][0][3] = 9
    with pytest.raises(ValueError, match="0..8"):
        KeyPlan.from_dict(d)
    before = path.read_bytes()                              # an interrupted save keeps the old file
    with pytest.raises(TypeError):
        KeyPlan({0: (4, 16, ((object(),),))}).save(path)
    assert path.read_bytes() == before and not list(tmp_path.glob(".plan.json.*"))


def test_plan_pages_decode_exactly_and_cost_no_memory():
    plan = _plan(H=2, D=32)
    w = plan.widths_for(0, 4, 16)
    layer = QINSLayer(4, 4, residual=0, group=16, page_kb=16, sink=0, k_widths=w, expect_heads=2, expect_head_dim=32)
    plain = QINSLayer(4, 4, residual=0, group=16, page_kb=16, sink=0, expect_heads=2, expect_head_dim=32)
    x = torch.randn(2, 2, 80, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    k, _ = layer.update(x, x)
    plain.update(x, x)
    assert layer.nbytes() == plain.nbytes() and layer.n_quantized == 80
    kw, ks, kz = layer.planes()[:3]
    ref = dequantize_keys_mixed(layer.k_layout.unpack(kw), ks, kz, w, 16, torch.float32)
    assert torch.equal(k, ref)
    # each channel lands on its own grid: distinct decoded levels per (group, channel) <= 2^w
    for h in range(2):
        for d in range(32):
            assert k[0, h, :16, d].unique().numel() <= max(1, 2 ** int(w[h, d]))


def test_plan_is_checked_against_the_model(make_model, token_ids):
    model = make_model("llama")                              # 2 layers, 2 KV heads of dim 16
    with pytest.raises(ValueError, match="heads, channels"):
        QINSCache(model, bits=4, residual=0, group=16, key_plan=_plan(H=2, D=32))
    with pytest.raises(ValueError, match="calibrated for 4-bit keys in groups of 16"):
        QINSCache(model, bits=4, residual=0, group=32, key_plan=_plan(H=2, D=16))
    with pytest.raises(ValueError, match="names layer 5"):
        QINSCache(model, bits=4, residual=0, group=16, key_plan=_plan(H=2, D=16, layers=(5,)))
    with pytest.raises(ValueError, match="zero points"):
        QINSCache(model, bits=4, residual=0, group=16, k_zero=False, key_plan=_plan(H=2, D=16))


# Queries that read 8 of a head's 32 key channels: the q_proj rows of HEAVY are scaled by 3, the
# others by 0.1, so E[q_d^2] is 900x larger on HEAVY. RoPE rotates channels d and d + 16 together,
# so both members of a pair get the same factor. A key error on a light channel barely moves a
# score: the right plan gives every heavy channel more bits than any light one.
HEAVY = (0, 1, 2, 3, 16, 17, 18, 19)


def _query_weighted_model(arch: str):
    """A tiny random Llama or Qwen2 (2 layers, 4 query heads, 2 KV heads of dim 32; the Qwen2's
    layer 1 slides) whose queries weigh the key channels unequally (HEAVY)."""
    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**kw))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**kw, use_sliding_window=True, sliding_window=8, max_window_layers=1))
    s = torch.full((32,), 0.1)
    s[list(HEAVY)] = 3.0
    with torch.no_grad():
        for layer in model.model.layers:
            q = layer.self_attn.q_proj                     # (4 heads x 32, 128)
            q.weight.mul_(s.repeat(4).view(-1, 1))
            if q.bias is not None:
                q.bias.mul_(s.repeat(4))
    return model.eval()


@pytest.mark.parametrize("arch,bits,prerope", [("llama", 4, False), ("llama", 2, False), ("qwen2", 4, False),
                                               ("llama", 4, True)])
def test_calibrated_plan_spends_bits_where_queries_look(arch, bits, prerope):
    # prerope: keys measured with RoPE turned back and queries turned back by their own positions
    model = _query_weighted_model(arch)
    cfg = KVConfig(k_bits=bits, residual=0, group=16, sink=1, k_prerope=prerope)
    calib = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(2))
    plan = calibrate_keys(model, calib, cfg, progress=False)
    assert plan.prerope == prerope
    # every full-attention layer gets a plan (the Qwen2's sliding layer stays uncompressed)
    full = [i for i, t in enumerate(layer_types(model.config)[0]) if t == "full_attention"]
    assert sorted(plan.layers) == full == ([0, 1] if arch == "llama" else [0])
    light = [d for d in range(32) if d not in HEAVY]
    room = packed_words(32, bits) * 4                      # bytes of a uniform `bits`-bit row
    for b, g, widths in plan.layers.values():
        assert (b, g) == (bits, 16) and len(widths) == 2
        for w in widths:
            assert len(w) == 32 and sum(w) <= bits * 32 and bytes_needed(list(w)) <= room
            # measured: heavy channels 8 bits (4-bit plan) or 6 (2-bit plan), light ones 0-3
            assert min(w[d] for d in HEAVY) > max(w[d] for d in light), w
    assert plan.mean_bits() <= bits

    # the cache with this plan: keys on the planned grids, the same memory, a smaller logit error.
    # 48 tokens prefilled in chunks of 16 (residual 0), so later chunks read earlier ones from pages.
    tok = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(7))
    caches, err = {}, {}
    with torch.inference_mode():
        ref = model(tok, use_cache=False).logits
        for name, p in (("uniform", None), ("plan", plan)):
            caches[name] = cache = QINSCache(model, config=cfg, key_plan=p)
            out = torch.cat([model(tok[:, i:i + 16], **cache_kw(model, cache)).logits for i in range(0, 48, 16)], 1)
            err[name] = float((out - ref).pow(2).mean())
    for i, layer in enumerate(caches["plan"].layers):
        if i in full:
            assert torch.equal(layer.k_widths, torch.tensor(plan.layers[i][2])) and layer.n_quantized == 48
    # head dim 32: the planned row packs into the uniform row's words, so pages hold as many tokens
    assert caches["plan"].nbytes() == caches["uniform"].nbytes()
    assert caches["plan"].bits_per_element() == caches["uniform"].bits_per_element()
    # logit MSE measured: llama 4 bits 0.55 -> 0.23, 2 bits 4.8 -> 2.5; qwen2 4 bits 0.73 -> 0.22
    assert err["plan"] < 0.7 * err["uniform"], err
    with torch.inference_mode():
        out = model.generate(input_ids=tok[:, :24], max_new_tokens=8, do_sample=False, pad_token_id=0,
                             **cache_kw(model, QINSCache(model, config=cfg, key_plan=plan)))
    assert out.shape == (2, 32)
    with pytest.raises(ValueError, match="calibrated on (pre|post)-RoPE keys"):
        QINSCache(model, config=cfg.replace(k_prerope=not prerope), key_plan=plan)


def test_calibration_rejects_what_it_cannot_plan(make_model):
    model = make_model("llama")
    ids = torch.randint(0, 128, (2, 40))
    with pytest.raises(ValueError, match="no layer to calibrate"):
        calibrate_keys(model, ids, KVConfig(k_bits=8), progress=False)
    with pytest.raises(ValueError, match="shorter than one key group"):
        calibrate_keys(model, ids[:, :10], KVConfig(k_bits=4, group=16), progress=False)
    with pytest.raises(ValueError, match=r"\(N, T\)"):
        calibrate_keys(model, ids[0], KVConfig(k_bits=4, group=16), progress=False)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_samples_are_the_models_own_full_length_text(make_model, arch):
    model = make_model(arch)
    if arch == "qwen2":                      # as Qwen2 checkpoints: no BOS, an EOS the samples start from
        model.config.bos_token_id, model.generation_config.bos_token_id = None, None
        model.config.eos_token_id = model.generation_config.eos_token_id = [7, 9]
    bos = model.config.bos_token_id if arch != "qwen2" else 7
    before = torch.random.get_rng_state()
    a = model_samples(model, 3, 20, seed=5, batch_size=2, progress=False)
    assert torch.equal(torch.random.get_rng_state(), before)        # the caller's random state is left alone
    assert a.shape == (3, 20) and a.dtype == torch.int64 and bool((a[:, 0] == bos).all())
    assert torch.equal(a, model_samples(model, 3, 20, seed=5, batch_size=2, progress=False))
    assert not torch.equal(a, model_samples(model, 3, 20, seed=6, batch_size=2, progress=False))
    # the rows are the model's own text: far likelier under it than random tokens (measured mean
    # log-probability -3.8 against -6.5 for llama, -3.9 against -5.9 for qwen2)
    rand = torch.randint(0, model.config.vocab_size, a.shape, generator=torch.Generator().manual_seed(0))
    rand[:, 0] = bos
    with torch.inference_mode():
        lp = [float(model(x).logits[:, :-1].log_softmax(-1).gather(2, x[:, 1:, None]).mean()) for x in (a, rand)]
    assert lp[0] > lp[1] + 1.0, lp


def test_model_samples_suppress_eos_and_reject_bad_arguments(make_model):
    model = make_model("llama", tie=False)
    eos = model.config.eos_token_id
    with torch.no_grad():                                           # a model that wants to stop at once
        model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
        model.lm_head.bias[eos] = 50.0
    out = model_samples(model, 2, 12, progress=False)
    assert out.shape == (2, 12) and not bool((out[:, 1:] == eos).any())
    with pytest.raises(ValueError, match="n >= 1 and length >= 2"):
        model_samples(model, 0, 12, progress=False)
    with pytest.raises(ValueError, match="temperature"):
        model_samples(model, 1, 12, temperature=0.0, progress=False)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = cfg.eos_token_id = None
    with pytest.raises(ValueError, match="no BOS or EOS"):
        model_samples(model, 1, 12, progress=False)


def test_samples_stay_within_the_models_positions(make_model, monkeypatch):
    # GPT-2's learned positions end at n_positions (64 here): longer samples are a clear error, and a
    # "sampled" plan shortens its samples to fit
    import qins.kv.plan as P
    model = make_model("gpt2")
    with pytest.raises(ValueError, match="longer than the model's 64 positions"):
        model_samples(model, 1, 65, progress=False)
    monkeypatch.setattr(P, "SAMPLES", 2)
    plan = resolve_key_plan("sampled", model, KVConfig(k_bits=4, residual=0, group=16), progress=False)
    assert "2 samples of 64 tokens" in plan.source


def test_cache_takes_a_plan_by_name(make_model, monkeypatch, tmp_path):
    # QINSCache(model, key_plan="sampled") samples once per model and config (evaluate builds a cache
    # per batch), a path loads a saved plan; "auto" (needs text) and a config alone are clear errors
    import qins.kv.plan as P
    model = _query_weighted_model("llama")
    model.config.bos_token_id = model.generation_config.bos_token_id = 1
    monkeypatch.setattr(P, "SAMPLES", 2)
    monkeypatch.setattr(P, "SAMPLE_TOKENS", 40)
    calls = []
    real = P.model_samples
    monkeypatch.setattr(P, "model_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    kw = dict(bits=4, residual=0, group=16)
    a, b = QINSCache(model, key_plan="sampled", **kw), QINSCache(model, key_plan="sampled", **kw)
    assert a.key_plan is b.key_plan and len(calls) == 1 and a.key_plan.layers
    assert QINSCache(model, key_plan="sampled", k_prerope=True, **kw).key_plan.prerope and len(calls) == 2
    path = a.key_plan.save(tmp_path / "p.json")
    assert QINSCache(model, key_plan=str(path), **kw).key_plan.layers == a.key_plan.layers
    with pytest.raises(ValueError, match="needs the model"):
        QINSCache(model.config, key_plan="sampled", **kw)
    with pytest.raises(ValueError, match="calibrates on text"):
        QINSCache(model, key_plan="auto", **kw)
    with pytest.raises(ValueError, match="no such file"):
        QINSCache(model, key_plan=str(tmp_path / "none.json"), **kw)


def test_sampled_plan_needs_no_text(monkeypatch):
    # resolve_key_plan("sampled") calibrates on the model's own samples: the plan still finds the
    # channels queries weigh (the test above, with samples in place of random windows)
    import qins.kv.plan as P
    model = _query_weighted_model("llama")
    monkeypatch.setattr(P, "SAMPLES", 3)
    monkeypatch.setattr(P, "SAMPLE_TOKENS", 40)
    plan = resolve_key_plan("sampled", model, KVConfig(k_bits=4, residual=0, group=16, sink=1), progress=False)
    assert "3 samples of 40 tokens the model wrote" in plan.source
    light = [d for d in range(32) if d not in HEAVY]
    for _, _, widths in plan.layers.values():
        for w in widths:
            assert min(w[d] for d in HEAVY) > max(w[d] for d in light), w


@pytest.mark.slow
def test_key_plan_lowers_kl_on_the_default_model():
    # 4-bit keys and values at residual 0, cache in the loop on 2 held-out windows; the plan is
    # calibrated on 4 windows from the start of the corpus. Measured (16 windows): KL 0.022
    # uniform against about half with the plan; the floor asks for a 25% cut, for pre-RoPE keys a
    # 10% cut against keys as given, with and without a plan, and 8% more for rotated values.
    import qins
    from qins.metrics.quality import Reference, evaluate, token_windows
    tok, model = qins.load_default_model()
    w = token_windows(tok, qins.default_corpus(), 512)
    ref = Reference.build(model, w[-2:], progress=False)
    kls = {}
    for pre in (False, True):                  # keys as the model gives them, then pre-RoPE (kv/rope.py)
        cfg = KVConfig(k_bits=4, residual=0, k_prerope=pre)
        plan = calibrate_keys(model, w[:4], cfg, progress=False)
        assert plan.mean_bits() <= 4.0 and plan.prerope == pre
        kls[pre] = kl = [evaluate(model, ref, 2, False, make_cache=lambda: QINSCache(model, config=cfg, key_plan=p),
                                  chunk=32)["kl"] for p in (None, plan)]
        assert kl[1] < 0.75 * kl[0], kl
    # pre-RoPE keys, measured on these windows: uniform 0.0206 -> 0.0165, planned 0.0122 -> 0.0096
    assert kls[True][0] < 0.9 * kls[False][0] and kls[True][1] < 0.9 * kls[False][1], kls
    # and rotated values (kv/vrot.py) with the pre-RoPE plan: measured 0.0096 -> 0.0081
    rot = cfg.replace(v_rotate=True)
    kl_rot = evaluate(model, ref, 2, False, make_cache=lambda: QINSCache(model, config=rot, key_plan=plan), chunk=32)["kl"]
    assert kl_rot < 0.92 * kls[True][1], (kl_rot, kls)
    # a plan from text the model writes itself (4 x 256 tokens here, 8 x 512 by default: the same KL
    # on the screen, experiments/kv_sampleplan) is within 20% of the corpus plan and well under no plan:
    # measured 0.0080 against 0.0081 (corpus plan) and 0.0146 (no plan)
    sampled = calibrate_keys(model, model_samples(model, 4, 256, progress=False), rot, progress=False)
    kl_s, kl_none = (evaluate(model, ref, 2, False, make_cache=lambda p=p: QINSCache(model, config=rot, key_plan=p),
                              chunk=32)["kl"] for p in (sampled, None))
    assert kl_s < 1.2 * kl_rot and kl_s < 0.75 * kl_none, (kl_s, kl_rot, kl_none)


def test_quantized_model_takes_plans_and_the_paged_route(make_model):
    # a model with QINS linears holds WeightConfigs as `.config` beside its transformers configs:
    # the attention hook of calibrate_keys and the qins_paged route switch only the latter
    # (before: calibration raised FrozenInstanceError, and the paged route silently refused a
    # compressed model, so on CUDA its cache never reached the kernels)
    import qins
    model = qins.quantize(make_model("llama", tie=False), qins.WeightConfig("qins", 4, 64), progress=False)
    assert model.config._attn_implementation == "sdpa"
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    cfg = KVConfig(k_bits=4, residual=0, group=16)
    plan = calibrate_keys(model, ids, cfg, progress=False)
    assert plan.prerope is False and model.config._attn_implementation == "sdpa"     # restored
    cache = QINSCache(model, config=cfg.replace(v_rotate=True), key_plan=plan)
    assert cache.paged and model.config._attn_implementation == "qins_paged"
    with torch.inference_mode():
        out = model.generate(ids[:, :24], max_new_tokens=4, do_sample=False, pad_token_id=0, **cache_kw(model, cache))
    assert out.shape == (2, 28)


@pytest.mark.parametrize("arch", ["llama-sdpa", "llama-eager", "gemma2-eager"])
def test_attention_hook_computes_what_the_model_would(arch):
    # calibrate_keys watches q, k, v through an attention hook; the hook attends with the model's own
    # implementation and masks (eager for Gemma 2, whose scores are soft-capped: SDPA refuses them),
    # so the model under the hook gives its own logits, and a plan calibrates on any implementation
    from transformers import Gemma2Config, Gemma2ForCausalLM
    from qins.kv import _compat
    torch.manual_seed(0)
    kw = dict(vocab_size=128, hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, initializer_range=0.2)
    if arch.startswith("gemma2"):
        model = Gemma2ForCausalLM(Gemma2Config(**kw, head_dim=32, sliding_window=16)).eval()
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw, attn_implementation=arch.split("-")[1])).eval()
    assert model.config._attn_implementation == arch.split("-")[1]
    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    attend, seen = _compat.original_attention(model), []

    def hook(module, q, k, v, mask, **kw):
        seen.append(module.layer_idx)
        return attend(module, q, k, v, mask, **kw)
    with torch.inference_mode():
        ref = model(ids).logits
        with _compat.attention_hook(model, "qins_test_hook", hook):
            got = model(ids).logits
    assert sorted(seen) == [0, 1] and model.config._attn_implementation == arch.split("-")[1]
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
    plan = calibrate_keys(model, ids, KVConfig(k_bits=4, residual=0, group=16), progress=False)
    # Gemma 2's one full-attention layer (layer 1; layer 0 slides) keeps uniform widths on these
    # random weights: calibration runs, nothing to plan
    if arch.startswith("gemma2"):
        assert set(plan.layers) <= {1}
    else:
        assert plan.layers
