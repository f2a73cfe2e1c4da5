"""QINSCache against DynamicCache on tiny random models: exact when everything stays in the
residual window, bounded when it does not; paging, accounting, crop, reorder, bad input."""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from qins.kv import KVConfig
from qins._compat import cache_kwarg
from qins.kv.cache import QINSCache
from qins.kv.layer import QINSLayer
from qins.kv.rope import Rope


def cache_kw(model, cache) -> dict:
    """The cache as the keyword the installed transformers takes ('cache' on 5.2x,
    'past_key_values' on 5.17), so the tests run on every supported version."""
    return {cache_kwarg(model): cache}


def _gen(model, ids, cache=None, **kw):
    mask = torch.ones_like(ids)
    mask[1, :5] = 0                                      # row 1 left-padded by 5 tokens
    extra = {} if cache is None else cache_kw(model, cache)
    with torch.inference_mode():
        return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, pad_token_id=0,
                              **extra, **kw)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("kw", [dict(do_sample=False), dict(num_beams=3, do_sample=False)])
def test_large_residual_equals_dynamic(make_model, token_ids, arch, kw):
    # residual > every length: all tokens stay full precision -> identical tokens (greedy,
    # beam search through reorder_cache, prompt-lookup decoding through crop)
    model = make_model(arch)
    ref = _gen(model, token_ids, DynamicCache(config=model.config), **kw)
    cache = QINSCache(model, bits=8, residual=1000)
    assert torch.equal(_gen(model, token_ids, cache, **kw), ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_assisted_decoding_crops(make_model, arch):
    # prompt-lookup decoding proposes tokens and crops the rejected ones (batch 1 only);
    # a repeated prompt makes it propose. Large residual: identical to DynamicCache.
    model = make_model(arch)
    x = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    ids = torch.cat([x, x, x[:, :6]], 1)
    kw = dict(max_new_tokens=16, do_sample=False, prompt_lookup_num_tokens=4, pad_token_id=0)
    with torch.inference_mode():
        ref = model.generate(ids, **kw)
        assert torch.equal(model.generate(ids, **cache_kw(model, QINSCache(model, bits=8, residual=1000)), **kw), ref)
        cache = QINSCache(model, bits=8, residual=0, group=16)  # crops reach into the pages
        out = model.generate(ids, **cache_kw(model, cache), **kw)
    assert out.shape == ref.shape and cache.get_seq_length() == out.shape[1] - 1


def test_sampled_generation_runs(make_model, token_ids):
    model = make_model("llama")
    torch.manual_seed(0)
    ref = _gen(model, token_ids, DynamicCache(config=model.config), do_sample=True, top_k=0)
    torch.manual_seed(0)
    out = _gen(model, token_ids, QINSCache(model, bits=8, residual=1000), do_sample=True, top_k=0)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_residual0_error_falls_with_bits(make_model, token_ids, arch):
    # every token read back from codes, prefilled in chunks of 8 so later chunks read the
    # earlier ones from pages: the logit error falls with the bit width
    model = make_model(arch)
    errs = {}
    with torch.inference_mode():
        ref = model(token_ids, use_cache=False).logits
        for bits in (8, 4, 2):
            cache = QINSCache(model, bits=bits, residual=0, group=16)
            outs = [model(token_ids[:, i:i + 8], **cache_kw(model, cache)).logits for i in range(0, 24, 8)]
            errs[bits] = float((torch.cat(outs, 1) - ref).abs().max())
            assert cache.get_seq_length() == 24
    # measured on llama (logit std 1.6; these random models amplify perturbations):
    # 8 bits 0.13, 4 bits 1.9, 2 bits 5.5
    assert errs[8] < 0.3 and errs[8] < errs[4] < errs[2]


def _layer(bits=4, residual=0, group=16, page_kb=16, sink=0, H=2, D=32):
    return QINSLayer(bits, bits, residual=residual, group=group, page_kb=page_kb, sink=sink,
                     expect_heads=H, expect_head_dim=D)


def test_update_round_trip_bounded():
    g = torch.Generator().manual_seed(0)
    layer = _layer(bits=8, residual=4, sink=2)
    seen = []
    for n in (5, 1, 30, 1, 1, 17):
        k, v = torch.randn(2, 2, n, 32, generator=g), torch.randn(2, 2, n, 32, generator=g)
        seen.append((k, v))
        ok, ov = layer.update(k, v)
    K = torch.cat([s[0] for s in seen], 2)
    V = torch.cat([s[1] for s in seen], 2)
    assert ok.shape == K.shape == (2, 2, 55, 32)
    # sink and residual exact; the rest within half an 8-bit step of its scale: values
    # <= max|x|/255; keys, centred by the per-channel offset first, <= 2 max|x|/255
    assert torch.equal(ok[:, :, :2], K[:, :, :2]) and torch.equal(ov[:, :, -4:], V[:, :, -4:])
    bound = 2 * K.abs().max() / 255 * 1.01
    assert (ok - K).abs().max() <= bound and (ov - V).abs().max() <= V.abs().max() / 255 * 1.01


def test_sealed_pages_never_rewritten():
    layer = _layer(bits=4, residual=0, group=16)
    g = torch.Generator().manual_seed(1)
    layer.update(torch.randn(1, 2, 600, 32, generator=g), torch.randn(1, 2, 600, 32, generator=g))
    P = layer.page_tokens
    assert P % 16 == 0 and len(layer.pages) == -(-592 // P)
    sealed = [p for p in layer.pages if p.sealed]
    assert sealed, "600 tokens fill at least one page"
    snap = [(p.index, [t.clone() for t in p.tensors()]) for p in sealed]
    for _ in range(3 * P // 7):
        layer.update(torch.randn(1, 2, 7, 32, generator=g), torch.randn(1, 2, 7, 32, generator=g))
    assert layer.pool.n_pages >= -(-layer.n_quantized // P)
    for i, vals in snap:
        assert layer.pages[i].sealed
        for t, v in zip(layer.pages[i].tensors(), vals):
            assert torch.equal(t, v)
    # appending seals groups in order: quantized tokens + fp tokens = all tokens
    assert layer.n_quantized + layer.keys.shape[2] == layer.get_seq_length()
    assert layer.keys.shape[2] < 16


def test_nbytes_counts_everything():
    cache_layer = _layer(bits=4, residual=8, group=16, sink=3)
    k = torch.randn(1, 2, 50, 32)
    cache_layer.update(k, k)
    # 50 = 32 quantized (2 groups, the 3 sink tokens among them) + 18 fp (10 staging + 8 residual)
    assert cache_layer.n_quantized == 32 and cache_layer.keys.shape[2] == 18
    fp = 2 * (3 + 18) * 2 * 32 * 4                        # K and V, fp32: sink copies + fp region
    table = cache_layer.table.ids.numel() * 4                  # the block table, int32
    assert cache_layer.nbytes() == fp + cache_layer.pool.nbytes() + table
    P = cache_layer.page_tokens
    # (H=2) x [codes K, V + k scale and zero point per (group, channel) + v scale per token]
    page = 2 * (P * 4 * 4 * 2 + P // 16 * 32 * 2 * 2 + P * 2)
    assert cache_layer.pool.n_pages == 1 and cache_layer.pool.nbytes() == page
    # the pool grows by whole pages, the free ones counted: nbytes = every page, written or not
    cache_layer.update(torch.randn(1, 2, P + 16, 32), torch.randn(1, 2, P + 16, 32))
    N = cache_layer.pool.n_pages
    assert N * P >= cache_layer.n_quantized > P
    fp = sum(t.numel() * 4 for t in (cache_layer.sink_k, cache_layer.sink_v, cache_layer.keys, cache_layer.values))
    assert cache_layer.nbytes() == fp + N * page + cache_layer.table.ids.numel() * 4


def test_bits_per_element_at_full_pages(make_model):
    from transformers import LlamaConfig
    cfg = LlamaConfig(vocab_size=16, hidden_size=192, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=3, num_key_value_heads=3, head_dim=64)
    T = 1024
    sink = 32 / T                                          # one fp32 sink token (copy) of K and V
    # K: 8 bits 16/64 (scale per 64 tokens) + fp16 offset per channel (16 bits over T tokens);
    # <= 6 bits 32/128 (scale + zero point per 128 tokens); V: 16/64 (scale per token)
    for bits, meta, bound in [(8, (16 / 64 + 16 / T + 16 / 64) / 2, 8.3), (4, (32 / 128 + 16 / 64) / 2, 4.3),
                              (2, (32 / 64 + 16 / 64) / 2, 2.6)]:
        cache = QINSCache(cfg, bits=bits, residual=0)
        x = torch.randn(1, 3, T, 64)
        for i in range(2):
            cache.update(x, x, i)
        cols = sum(layer.table.ids.numel() for layer in cache.layers)
        table = cols * 4 * 8 / cache.n_elements()                  # block tables: one int32 per page
        assert cache.bits_per_element() == pytest.approx(bits + meta + sink + table)
        assert cache.bits_per_element() <= bound


def test_crop():
    g = torch.Generator().manual_seed(2)
    layer = _layer(bits=8, residual=4, group=16)
    k, v = torch.randn(1, 2, 60, 32, generator=g), torch.randn(1, 2, 60, 32, generator=g)
    full_k, _ = layer.update(k, v)
    layer.crop(-2)                                        # inside the residual window: exact
    assert layer.get_seq_length() == 58
    ok, _ = layer.update(k[:, :, :1], v[:, :, :1])
    assert ok.shape[2] == 59 and torch.equal(ok[:, :, :48], full_k[:, :, :48])
    layer.crop(-30)                                       # into the pages: the group stays open, codes kept
    assert layer.get_seq_length() == 29 and layer.n_quantized == 29
    ok, _ = layer.update(k[:, :, :3], v[:, :, :3])
    assert ok.shape[2] == 32 and torch.equal(ok[:, :, :29], full_k[:, :, :29])
    with pytest.raises(ValueError, match="cannot crop"):
        layer.crop(-100)
    with pytest.raises(ValueError):
        layer.crop(5)
    assert layer.get_seq_length() == 32                   # unchanged, still usable
    layer.update(k[:, :, :1], v[:, :, :1])


def test_reorder_and_bad_beam_index():
    layer = _layer(bits=8, residual=2, group=16)
    k = torch.randn(3, 2, 40, 32)
    ok, _ = layer.update(k, k)
    with pytest.raises(IndexError, match="out of range"):
        layer.reorder_cache(torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError):
        layer.reorder_cache(torch.tensor([0.0, 1.0, 2.0]))
    layer.reorder_cache(torch.tensor([2, 2, 0]))
    ok2, _ = layer.update(k[:, :, :0], k[:, :, :0])
    assert torch.equal(ok2, ok[[2, 2, 0]])


def test_cache_bad_input_leaves_cache_usable(make_model, token_ids):
    model = make_model("llama")
    cache = QINSCache(model, bits=4, residual=0, group=16)
    with torch.inference_mode():
        model(token_ids, **cache_kw(model, cache))
        H, D = cache.shape[1], cache.shape[2]
        with pytest.raises(ValueError, match="built for one model"):
            cache.update(torch.randn(2, H + 1, 1, D), torch.randn(2, H + 1, 1, D), 0)
        with pytest.raises(ValueError, match="layers"):
            cache.update(torch.randn(2, H, 1, D), torch.randn(2, H, 1, D), 7)
        with pytest.raises(IndexError):
            cache.reorder_cache(torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(-1000)
        assert cache.get_seq_length() == 24
        out = model(token_ids[:, :1], **cache_kw(model, cache))
    assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 25
    other = make_model("gpt2")
    with pytest.raises(ValueError, match="built for one model"):      # 4 heads of 16, given 1 of 8
        QINSCache(other.config, bits=4).update(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8), 0)


@pytest.mark.parametrize("bad", [dict(bits=7), dict(page_kb=8), dict(bits=4, v_bits=1), dict(group=10)])
def test_bad_options(make_model, bad):
    with pytest.raises(ValueError):
        QINSCache(make_model("llama"), **bad)


def test_config_object_and_layer_overrides(make_model):
    model = make_model("llama")
    cfg = KVConfig(k_bits=8, v_bits=4, residual=0, layer_bits=((1, 2, 3),))
    cache = QINSCache(model, config=cfg)
    assert cache.config == cfg
    assert (cache.layers[0].k_codec.bits, cache.layers[0].v_codec.bits) == (8, 4)
    assert (cache.layers[1].k_codec.bits, cache.layers[1].v_codec.bits) == (2, 3)
    assert QINSCache(model, config=cfg, residual=16).config.residual == 16


def test_sliding_layers_stay_uncompressed(make_model, token_ids):
    from transformers.cache_utils import DynamicSlidingWindowLayer
    model = make_model("qwen2")                     # layer 0 full, layer 1 sliding (window 8)
    cache = QINSCache(model, bits=4, residual=0, group=16)
    kinds = [type(layer) for layer in cache.layers]
    assert QINSLayer in kinds and DynamicSlidingWindowLayer in kinds
    with torch.inference_mode():
        model(token_ids, **cache_kw(model, cache))
    assert cache.nbytes() > sum(layer.nbytes() for layer in cache.layers if isinstance(layer, QINSLayer))


@pytest.mark.parametrize("bits,k_zero,v_zero", [(8, False, False), (8, True, True), (4, True, False),
                                                (4, False, True), (2, True, True), (3, True, False), (6, True, False)])
def test_fast_decode_equals_reference_dequantize(bits, k_zero, v_zero):
    # the read path (byte tables, affine 8-bit shortcut, fused scale) decodes exactly what the
    # reference dequantize_* functions decode from the same stored codes and scales
    from qins.kv.codec import dequantize_keys, dequantize_values
    from qins.kv.layout import unpack_rows
    layer = QINSLayer(bits, bits, residual=0, group=16, page_kb=16, sink=0, k_zero=k_zero, v_zero=v_zero,
                      k_curvature=0.0, v_curvature=1.0)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 2, 80, 64, generator=g) * 3 + 1
    layer.update(x, x.flip(2))
    k, v = layer.decode_pages()
    Q, pool, t = layer.n_quantized, layer.pool, layer.table
    assert Q == 80 and layer.pages
    # each row's pages, read page by page through its block-table row
    cat = lambda name, n: torch.stack([torch.cat([getattr(pool, name)[int(t.ids[b, j])].unsqueeze(0)
                                                  for j in range(t.n_cols)], 0).transpose(0, 1).flatten(1, 2)[:, :n]
                                       for b in range(2)])
    kc = unpack_rows(cat("k_codes", Q).contiguous(), bits, 64)
    vc = unpack_rows(cat("v_codes", Q).contiguous(), bits, 64)
    kz = cat("k_zero", Q // 16) if k_zero else None
    vz = cat("v_zero", Q) if v_zero else None
    ref_k = dequantize_keys(kc, cat("k_scale", Q // 16), kz, layer.k_codec, 16, torch.float32)
    if layer.k_offset is not None:
        ref_k = ref_k + layer.k_offset.float()
    ref_v = dequantize_values(vc, cat("v_scale", Q), vz, layer.v_codec, torch.float32)
    # fp32 rounding only: (m + r beta) + (r alpha) u is not bit-identical to m + r (alpha u + beta)
    torch.testing.assert_close(k, ref_k, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(v, ref_v, rtol=1e-6, atol=1e-5)


def test_sink_tokens_exact_and_outside_group_ranges():
    # a huge first token (an attention sink) is read back exactly from its copy and does not
    # widen the first key group: the other tokens keep the error of a cache without it
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 64, 32, generator=g)
    x[:, :, 0] = 100.0
    with_sink, no_sink = _layer(bits=4, group=16, sink=1), _layer(bits=4, group=16, sink=0)
    k1, v1 = with_sink.update(x, x)
    k0, _ = no_sink.update(x, x)
    assert with_sink.n_quantized == 64                      # the sink token sits in the first page too
    assert torch.equal(k1[:, :, 0], x[:, :, 0]) and torch.equal(v1[:, :, 0], x[:, :, 0])
    err1 = (k1[:, :, 1:16] - x[:, :, 1:16]).abs().max()
    err0 = (k0[:, :, 1:16] - x[:, :, 1:16]).abs().max()
    # measured: 0.15 with the sink against 3.4 without (a range of ~100 over 16 levels)
    assert err1 < 0.5 < err0


def test_crop_into_sink_then_regrow():
    g = torch.Generator().manual_seed(6)
    layer = _layer(bits=4, group=16, sink=4)
    x = torch.randn(1, 2, 40, 32, generator=g)
    layer.update(x, x)
    layer.crop(-38)                                         # 2 tokens left, inside the sink
    assert layer.get_seq_length() == 2 and layer.sink_k.shape[2] == 2 and layer.n_quantized == 0
    y = torch.randn(1, 2, 30, 32, generator=g)
    k, _ = layer.update(y, y)
    assert k.shape[2] == 32
    assert torch.equal(k[:, :, :2], x[:, :, :2]) and torch.equal(k[:, :, 2:4], y[:, :, :2])  # 4 sink tokens exact
    assert torch.equal(layer.sink_k, torch.cat([x[:, :, :2], y[:, :, :2]], 2))


def test_other_head_dim_or_batch_is_rejected_and_cache_stays_usable(make_model, token_ids):
    model = make_model("llama")
    cache = QINSCache(model, bits=4, residual=0)
    with torch.inference_mode():
        model(token_ids, **cache_kw(model, cache))
        H, D = cache.shape[1], cache.shape[2]
        with pytest.raises(ValueError, match="built for one model"):
            cache.update(torch.randn(2, H, 1, D * 2), torch.randn(2, H, 1, D * 2), 0)
        with pytest.raises(ValueError, match="batch rows"):
            cache.update(torch.randn(3, H, 1, D), torch.randn(3, H, 1, D), 0)
        assert cache.get_seq_length() == 24
        out = model(token_ids[:, :1], **cache_kw(model, cache))
        assert torch.isfinite(out.logits).all() and cache.get_seq_length() == 25
        cache.reset()                                       # another batch after a reset
        model(token_ids[:1], **cache_kw(model, cache))
    assert cache.get_seq_length() == token_ids.shape[1]


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_older_layer_kwargs_shape_builds_every_layer(make_model, token_ids, arch, monkeypatch):
    # transformers 5.17 returns one kwargs dict for all layers (measured on the device machine:
    # the cache came out with 0 layers before _compat spread it); the cache must still hold a
    # layer per decoder layer and generate as with 5.2x's per-layer lists
    import transformers.cache_utils as cu
    model = make_model(arch)
    want = QINSCache(model, bits=4, residual=0, group=16)
    real = cu.get_layer_types_and_kwargs

    def shared(config):
        types, per_layer = real(config)
        if isinstance(per_layer, dict):                  # already the shared shape (5.17 itself)
            return types, per_layer
        return types, next((k for k in per_layer if k), {})
    monkeypatch.setattr(cu, "get_layer_types_and_kwargs", shared)
    got = QINSCache(model, bits=4, residual=0, group=16)
    assert [type(x) for x in got.layers] == [type(x) for x in want.layers] and len(got.layers) == 2
    with torch.inference_mode():
        a = model.generate(input_ids=token_ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           **cache_kw(model, got))
        b = model.generate(input_ids=token_ids, max_new_tokens=4, do_sample=False, pad_token_id=0,
                           **cache_kw(model, want))
    assert torch.equal(a, b)


def test_layers_without_keys_to_page_stay_transformers_own(make_model, monkeypatch):
    # a KV-sharing consumer ("dummy") or linear-attention layer is not ours to compress
    import transformers.cache_utils as cu
    if "dummy" not in getattr(cu, "DYNAMIC_LAYER_TYPE_MAPPING", {}):
        pytest.skip("this transformers has no dummy layer type")
    model = make_model("llama")
    monkeypatch.setattr(cu, "get_layer_types_and_kwargs", lambda c: (["full_attention", "dummy"], [{}, {}]))
    cache = QINSCache(model, bits=4)
    assert isinstance(cache.layers[0], QINSLayer) and type(cache.layers[1]) is cu.DYNAMIC_LAYER_TYPE_MAPPING["dummy"]
    monkeypatch.setattr(cu, "get_layer_types_and_kwargs", lambda c: (["full_attention", "mystery"], [{}, {}]))
    with pytest.raises(ValueError, match="'mystery'"):
        QINSCache(model, bits=4)


def test_cache_crop_takes_what_transformers_passes(make_model, token_ids):
    # transformers 5.17's assisted decoding crops with a 0-d int tensor (tensor(-4)), 5.2x with
    # an int; both remove the same tokens. Floats, bools and positive counts are refused.
    model = make_model("llama")
    caches = [QINSCache(model, bits=8, residual=0, group=16) for _ in range(2)]
    with torch.inference_mode():
        for c in caches:
            model(token_ids, **cache_kw(model, c))
    caches[0].crop(-4)
    caches[1].crop(torch.tensor(-4))
    assert caches[0].get_seq_length() == caches[1].get_seq_length() == token_ids.shape[1] - 4
    for bad in (torch.tensor(-4.0), True, 3, -4.0):
        with pytest.raises(ValueError, match="crop takes a negative int"):
            caches[0].crop(bad)


@pytest.mark.parametrize("bits,plan,prerope", [(4, False, False), (8, False, False), (4, True, False),
                                               (4, False, True), (4, True, True)])
def test_crop_into_sealed_pages_100_times_leaves_codes_identical(bits, plan, prerope):
    # prerope also rotates the values (kv/vrot.py)
    # speculative decoding with residual 0: append a draft, crop it back into the pages, append
    # the same tokens again; a crop never re-quantizes, so after 100 rounds every page (codes,
    # scales, zero points) and every read equals a cache that never cropped
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 2, 100 * 3 + 40, 32, generator=g) * 2 + 0.5
    widths = torch.randint(2, 7, (2, 32), generator=g) if plan else None
    rope = Rope(1.0 / 100.0 ** (torch.arange(0, 32, 2) / 32)) if prerope else None
    mk = lambda: QINSLayer(bits, bits, residual=0, group=16, page_kb=16, sink=1, k_zero=bits < 8, k_widths=widths,
                           expect_heads=2, expect_head_dim=32, rope=rope, v_rotate=prerope)
    ref, cut = mk(), mk()
    ref.update(x[:, :, :20], x[:, :, :20])
    cut.update(x[:, :, :20], x[:, :, :20])
    t, into_pages = 20, 0
    for _ in range(100):
        ref.update(x[:, :, t:t + 3], x[:, :, t:t + 3])
        cut.update(x[:, :, t:t + 3], x[:, :, t:t + 3])
        q = cut.n_quantized
        cut.crop(-9)                                        # > the staging tokens at times: into sealed groups
        into_pages += cut.n_quantized < q
        ok, ov = cut.update(x[:, :, t - 6:t + 3], x[:, :, t - 6:t + 3])
        t += 3
    rk, rv = ref.update(x[:, :, :0], x[:, :, :0])
    assert into_pages >= 50 and cut.n_quantized == ref.n_quantized > 300
    for a, b in zip(cut.planes(), ref.planes()):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(ok, rk) and torch.equal(ov, rv)
