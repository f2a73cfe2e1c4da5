"""transformers integration: from_pretrained / save_pretrained of qins checkpoints.

Every round trip must give logits bit-identical (torch.equal) to the in-memory quantized
model: the same codes reach the same kernels, so any difference is a loading bug.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AutoQuantizationConfig

import qins
from qins.codec.config import WeightConfig
from qins.weights.hf import QINSHfQuantizer, QINSQuantizationConfig
from qins.weights.linear import QINSEmbedding, QINSLinear

Q4 = qins.WeightConfig("qins", 4, 32)


def quantized(make_model, arch: str, tie: bool, include_embeddings: bool):
    return qins.quantize(make_model(arch, tie), Q4, include_embeddings=include_embeddings, progress=False)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def from_pretrained(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    # nothing missing or left over: a missing code tensor would otherwise stay uninitialized
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("include_embeddings", [True, False], ids=["embeddings", "linears"])
def test_llama_round_trips(tmp_path, make_model, token_ids, tie, include_embeddings):
    model = quantized(make_model, "llama", tie, include_embeddings)
    ref = logits(model, token_ids)

    qins.save(model, tmp_path / "qins")
    loaded = from_pretrained(tmp_path / "qins")
    assert torch.equal(logits(loaded, token_ids), ref)
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QINSLinear)
    assert isinstance(loaded.model.embed_tokens, QINSEmbedding) == include_embeddings
    if tie and include_embeddings:
        assert loaded.lm_head.tied_to is loaded.model.embed_tokens      # codes stored once
        assert not any(k.startswith("lm_head.") for k in loaded.state_dict())
    assert isinstance(loaded.hf_quantizer, QINSHfQuantizer)
    assert isinstance(loaded.config.quantization_config, QINSQuantizationConfig)

    model.save_pretrained(tmp_path / "hf")
    assert not (tmp_path / "hf" / "qins.json").exists()
    assert torch.equal(logits(from_pretrained(tmp_path / "hf"), token_ids), ref)
    assert torch.equal(logits(qins.load(tmp_path / "hf"), token_ids), ref)

    # transformers' tie_weights must not look for the float weights the QINS modules lack
    model.tie_weights()
    loaded.tie_weights()
    assert torch.equal(logits(loaded, token_ids), ref)

    # a model that came from from_pretrained saves both ways again
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(from_pretrained(tmp_path / "again"), token_ids), ref)
    qins.save(loaded, tmp_path / "again-qins")
    assert torch.equal(logits(qins.load(tmp_path / "again-qins"), token_ids), ref)


# not Llama-specific: Mistral (GQA + sliding window, untied), Qwen2 (q/k/v biases, sliding
# window on one layer, tied), GPT-2 (Conv1D layers stored transposed, tied)
@pytest.mark.parametrize("arch,tie", [("mistral", False), ("qwen2", True), ("gpt2", True)])
def test_other_architectures(tmp_path, make_model, token_ids, arch, tie):
    model = quantized(make_model, arch, tie, include_embeddings=True)
    ref = logits(model, token_ids)
    qins.save(model, tmp_path / "qins")
    model.save_pretrained(tmp_path / "hf")
    for path in (tmp_path / "qins", tmp_path / "hf"):
        assert torch.equal(logits(from_pretrained(path), token_ids), ref)
        assert torch.equal(logits(qins.load(path), token_ids), ref)


def test_scaled_embedding_gemma3(tmp_path, token_ids):
    # Gemma3 multiplies embeddings by sqrt(hidden); from_pretrained builds it on the meta device
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, initializer_range=0.2)).eval()
    qins.quantize(model, Q4, include_embeddings=True, progress=False)
    assert model.model.embed_tokens.scale_output == 8.0
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(from_pretrained(tmp_path), token_ids), logits(model, token_ids))


def test_stored_dtypes_survive_loading(tmp_path, make_model):
    qins.save(quantized(make_model, "llama", True, True), tmp_path)
    loaded = from_pretrained(tmp_path)
    q = loaded.model.layers[0].self_attn.q_proj
    # transformers would cast float tensors to the model dtype; codes and scales keep theirs
    assert (q.qweight.dtype, q.scales.dtype, q.curvature.dtype) == (torch.int32, torch.float16, torch.float32)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_log8_scales_round_trip(tmp_path, make_model, token_ids, tie):
    """log8 scales go to disk as 8-bit codes + a float16 per row and come back bit-exact through
    qins.load, from_pretrained and save_pretrained."""
    from safetensors import safe_open
    cfg = qins.WeightConfig("qins", 4, 32, scale_dtype="log8")
    model = qins.quantize(make_model("llama", tie), cfg, include_embeddings=True, progress=False)
    ref = logits(model, token_ids)
    qins.save(model, tmp_path / "qins")
    with safe_open(str(tmp_path / "qins" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("model.layers.0.mlp.up_proj.scale_codes").dtype == torch.uint8
    assert not any(k.endswith(".scales") for k in keys)
    for loaded in (qins.load(tmp_path / "qins"), from_pretrained(tmp_path / "qins")):
        q, q0 = loaded.model.layers[1].mlp.up_proj, model.model.layers[1].mlp.up_proj
        assert q.scales.dtype == torch.float16 and torch.equal(q.scales.view(torch.int16), q0.scales.view(torch.int16))
        assert not hasattr(q, "scale_codes")
        assert torch.equal(logits(loaded, token_ids), ref)
    loaded.save_pretrained(tmp_path / "hf")
    assert torch.equal(logits(from_pretrained(tmp_path / "hf"), token_ids), ref)
    assert torch.equal(logits(qins.load(tmp_path / "hf"), token_ids), ref)
    # a damaged code is caught by the checksum like any other tensor
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "qins" / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.scale_codes"][0, 0] ^= 1
    save_file(state, str(tmp_path / "qins" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="scale_codes is corrupt"):
        qins.load(tmp_path / "qins")


def _set_config_version(path, version):
    f = path / "config.json"
    cfg = json.loads(f.read_text())
    cfg["quantization_config"]["format_version"] = version
    f.write_text(json.dumps(cfg))


def test_newer_format_version_is_refused(tmp_path, make_model):
    model = quantized(make_model, "llama", True, True)
    qins.save(model, tmp_path / "qins")
    model.save_pretrained(tmp_path / "hf")
    _set_config_version(tmp_path / "qins", 99)
    _set_config_version(tmp_path / "hf", 99)
    plan = tmp_path / "qins" / "qins.json"
    plan.write_text(json.dumps({**json.loads(plan.read_text()), "format_version": 99}))
    for path in (tmp_path / "qins", tmp_path / "hf"):
        with pytest.raises(ValueError, match="format version 99.*Upgrade qins"):
            AutoModelForCausalLM.from_pretrained(path)
        with pytest.raises(ValueError, match="format version 99"):
            qins.load(path)


@pytest.mark.parametrize("keep", [0.5, 0.0], ids=["truncated", "empty"])
def test_corrupt_safetensors_is_a_clear_error(tmp_path, make_model, keep):
    qins.save(quantized(make_model, "llama", True, True), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(ValueError, match="model.safetensors: cannot read the tensors.*corrupt or truncated"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_missing_code_tensor_is_an_error_not_a_warning(tmp_path, make_model):
    from safetensors.torch import load_file, save_file
    qins.save(quantized(make_model, "llama", False, False), tmp_path)
    f = tmp_path / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.up_proj.scales"]
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 quantized tensor\(s\).*up_proj.scales"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_config_round_trip_and_validation(make_model):
    plan = quantized(make_model, "llama", True, True).config.quantization_config.to_dict()
    assert plan["quant_method"] == "qins" and plan["format_version"] == qins.FORMAT_VERSION
    assert {e["kind"] for e in plan["modules"].values()} == {"linear", "embedding", "tied_linear"}
    again = AutoQuantizationConfig.from_dict(json.loads(json.dumps(plan)))   # through JSON
    assert isinstance(again, QINSQuantizationConfig) and again.to_dict() == plan
    with pytest.raises(ValueError, match="unknown fields"):
        QINSQuantizationConfig.from_dict({**plan, "bits": 4})
    bad = json.loads(json.dumps(plan))
    bad["modules"]["lm_head"]["tied_to"] = "model.norm"
    with pytest.raises(ValueError, match="not a quantized embedding"):
        QINSQuantizationConfig.from_dict(bad)
    with pytest.raises(ValueError, match="QINSConfig"):          # a plan is not a config to quantize with
        QINSHfQuantizer(again, pre_quantized=False)


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_import_qins_does_no_work_and_registration_is_explicit():
    r = _run("""
        import sys
        import qins
        assert "transformers" not in sys.modules and "torch" not in sys.modules, "import qins did work"
        from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING
        assert "qins" not in AUTO_QUANTIZER_MAPPING, "registered by an import"
        qins.register_transformers()
        qins.register_transformers()                                    # idempotent
        assert AUTO_QUANTIZER_MAPPING["qins"].__name__ == "QINSHfQuantizer"
        assert AUTO_QUANTIZATION_CONFIG_MAPPING["qins"].__name__ == "QINSQuantizationConfig"
        assert not any("qins" in type(f).__module__ for f in sys.meta_path), "an import hook is installed"
        print("ok")
    """)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


def test_from_pretrained_in_a_fresh_process(tmp_path, make_model, token_ids):
    """A new process reads a qins checkpoint with from_pretrained once it has registered, and
    gets the logits of the model that was saved. Without registering, transformers 5.24 only
    warns about the unknown quant_method and builds the float model with random weights (its
    own behaviour, shown here so the README's "register first" stays true)."""
    model = make_model("llama", tie=False)
    qins.quantize(model, WeightConfig("qins", 4, 32), progress=False)
    qins.save(model, tmp_path / "q")
    with torch.inference_mode():
        torch.save(model(token_ids).logits, tmp_path / "logits.pt")
    torch.save(token_ids, tmp_path / "ids.pt")
    code = f"""
        import torch
        import qins
        from transformers import AutoModelForCausalLM
        path = {str(tmp_path)!r}
        ids, want = torch.load(path + "/ids.pt"), torch.load(path + "/logits.pt")
        try:
            m = AutoModelForCausalLM.from_pretrained(path + "/q").eval()
            with torch.inference_mode():
                print("unregistered", "same" if torch.equal(m(ids).logits, want) else "different")
        except Exception as e:
            print("unregistered refused:", type(e).__name__)
        qins.register_transformers()
        m = AutoModelForCausalLM.from_pretrained(path + "/q").eval()
        with torch.inference_mode():
            same = torch.equal(m(ids).logits, want)
        print("same" if same else "different")
    """
    r = _run(code)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] in ("unregistered different", "unregistered refused: ValueError") and lines[-1] == "same", r.stdout
