"""qins.save / qins.load: bit-identical round trips, versioning, clear errors, atomic writes.

A round trip must give logits equal (torch.equal) to the in-memory quantized model: the same
codes reach the same decode and the same matmul, so any difference is a saving or loading bug.
"""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

import qins
from qins.codec.config import FORMAT_VERSION, WeightConfig
from qins.weights import serialization
from qins.weights.linear import QINSEmbedding, QINSLinear

CONFIGS = [WeightConfig("qins", 4, 32), WeightConfig("int-asym", 4, 32), WeightConfig("nf4", 4, 64),
           WeightConfig("fp8", 8, 32), WeightConfig("qins-seed", 8, None)]


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def leftovers(parent) -> list[str]:
    """Temporary or backup directories that a save may leave beside its target."""
    return sorted(p for p in os.listdir(parent) if p.startswith("."))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("include_embeddings", [True, False], ids=["embeddings", "linears"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.label)
def test_round_trip_is_bit_identical(tmp_path, make_model, token_ids, cfg, tie, include_embeddings):
    model = qins.quantize(make_model("llama", tie), cfg, include_embeddings=include_embeddings, progress=False)
    ref = logits(model, token_ids)
    path = qins.save(model, tmp_path / "m")
    assert path == tmp_path / "m"
    assert sorted(os.listdir(path)) == ["config.json", "generation_config.json", "model.safetensors", "qins.json"]
    loaded = qins.load(path)
    assert not loaded.training
    assert torch.equal(logits(loaded, token_ids), ref)
    # same modules, same stored tensors, same dtypes
    assert {n: type(m) for n, m in loaded.named_modules()} == {n: type(m) for n, m in model.named_modules()}
    sd, sd_l = model.state_dict(), loaded.state_dict()
    assert set(sd) == set(sd_l)
    assert all(sd[k].dtype == sd_l[k].dtype and torch.equal(sd[k], sd_l[k]) for k in sd)
    if tie and include_embeddings:
        assert loaded.lm_head.tied_to is loaded.model.embed_tokens
    elif tie:                                            # float tied head: still one tensor
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_round_trip_other_architectures(tmp_path, make_model, token_ids, arch):
    model = qins.quantize(make_model(arch), WeightConfig("qins", 4, 32), include_embeddings=True, progress=False)
    qins.save(model, tmp_path / "m")
    assert torch.equal(logits(qins.load(tmp_path / "m"), token_ids), logits(model, token_ids))


def test_tied_float_tensors_are_stored_once(tmp_path, make_model):
    # linears only: the float embedding and the float tied head share one tensor
    model = qins.quantize(make_model("llama", tie=True), WeightConfig("int-sym", 4, 32), progress=False)
    qins.save(model, tmp_path / "m")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    doc = json.loads((tmp_path / "m" / "qins.json").read_text())
    assert doc["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_plan_file_is_versioned(tmp_path, make_model):
    model = qins.quantize(make_model("llama"), WeightConfig("qins", 4, 32), overrides={"down_proj": {"bits": 8}},
                          progress=False)
    qins.save(model, tmp_path / "m")
    doc = json.loads((tmp_path / "m" / "qins.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["qins_version"] == qins.__version__
    assert doc["modules"]["model.layers.0.mlp.down_proj"] == {
        "kind": "linear", "config": WeightConfig("qins", 8, 32).to_dict()}
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "qins"
    assert cfg["quantization_config"]["modules"] == doc["modules"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, make_model, token_ids):
    """(path, logits) of one saved qins-4b model with embeddings; tests copy it before damaging it."""
    model = qins.quantize(make_model("llama", tie=True), WeightConfig("qins", 4, 32), include_embeddings=True,
                          progress=False)
    path = qins.save(model, tmp_path_factory.mktemp("saved") / "m")
    return path, logits(model, token_ids)


@pytest.fixture
def copy_of_saved(tmp_path, saved):
    import shutil
    dst = tmp_path / "m"
    shutil.copytree(saved[0], dst)
    return dst


def test_version_1_directory_still_loads(copy_of_saved, saved, token_ids):
    """Format version 1 (float16 scales only, before log8): the same files with 1 everywhere
    a version is recorded load to the same logits, with qins.load and from_pretrained."""
    from transformers import AutoModelForCausalLM
    doc = json.loads((copy_of_saved / "qins.json").read_text())
    cfg = json.loads((copy_of_saved / "config.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION == 2
    for d in (doc, cfg["quantization_config"]):
        d["format_version"] = 1
        for e in d["modules"].values():
            if "config" in e:
                e["config"]["version"] = 1
    (copy_of_saved / "qins.json").write_text(json.dumps(doc))
    (copy_of_saved / "config.json").write_text(json.dumps(cfg))
    assert torch.equal(logits(qins.load(copy_of_saved), token_ids), saved[1])
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(copy_of_saved), token_ids), saved[1])


@pytest.mark.parametrize("version", [FORMAT_VERSION + 1, 99])
def test_newer_format_version_is_refused(copy_of_saved, version):
    f = copy_of_saved / "qins.json"
    doc = json.loads(f.read_text())
    doc["format_version"] = version
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"format version {version}\b.*reads up to {FORMAT_VERSION}"):
        qins.load(copy_of_saved)


@pytest.mark.parametrize("value", [None, "1", 1.0])
def test_missing_or_invalid_format_version_is_refused(copy_of_saved, value):
    f = copy_of_saved / "qins.json"
    doc = json.loads(f.read_text())
    doc["format_version"] = value
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="missing or invalid format_version"):
        qins.load(copy_of_saved)


def test_invalid_plan_json_is_a_value_error(copy_of_saved):
    (copy_of_saved / "qins.json").write_text('{"format_version": 1, "modules": ')
    with pytest.raises(ValueError, match=r"qins\.json is not valid JSON"):
        qins.load(copy_of_saved)


def test_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nowhere"))):
        qins.load(tmp_path / "nowhere")
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        qins.load(tmp_path / "a-file")


def test_missing_plan_is_file_not_found(copy_of_saved):
    (copy_of_saved / "qins.json").unlink()
    cfg = json.loads((copy_of_saved / "config.json").read_text())
    del cfg["quantization_config"]                        # and no plan in config.json either
    (copy_of_saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy_of_saved / "qins.json"))):
        qins.load(copy_of_saved)


def test_missing_weights_is_file_not_found(copy_of_saved):
    (copy_of_saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy_of_saved / "model.safetensors"))):
        qins.load(copy_of_saved)


@pytest.mark.parametrize("damage", ["truncated", "half", "empty", "header"])
def test_damaged_weights_file_is_a_clear_value_error(copy_of_saved, damage):
    f = copy_of_saved / "model.safetensors"
    data = f.read_bytes()
    if damage == "truncated":
        data = data[:-100]                                # the last tensor loses its tail
    elif damage == "half":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    else:                                                 # the JSON header's bytes overwritten
        data = data[:8] + b"\xff" * 64 + data[72:]
    f.write_bytes(data)
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read the tensors.*corrupt or truncated"):
        qins.load(copy_of_saved)


def test_weights_that_do_not_match_the_plan_are_refused(copy_of_saved):
    from safetensors.torch import load_file, save_file
    f = copy_of_saved / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.1.mlp.down_proj.scales"]
    state["model.layers.0.mlp.up_proj.qweight"] = state["model.layers.0.mlp.up_proj.qweight"][:, :-1].contiguous()
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.mlp\.down_proj\.scales'\]"):
        qins.load(copy_of_saved)
    state["model.layers.1.mlp.down_proj.scales"] = torch.ones(64, 4, dtype=torch.float16)
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.qweight is \(128, 7\)"):
        qins.load(copy_of_saved)


def test_saving_an_unquantized_model_is_refused(tmp_path, make_model):
    with pytest.raises(ValueError, match="call qins.quantize"):
        qins.save(make_model("llama"), tmp_path / "m")
    assert os.listdir(tmp_path) == []                     # nothing written


class _Boom(RuntimeError):
    pass


def _interrupted_save(tmp_path, make_model, monkeypatch, where: str):
    """Save model A, then start saving model B to the same path and fail at `where`."""
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    a = qins.quantize(make_model("llama", seed=0), WeightConfig("int-sym", 4, 32), progress=False)
    b = qins.quantize(make_model("llama", seed=1), WeightConfig("int-asym", 8, 32), progress=False)
    path = tmp_path / "m"
    qins.save(a, path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    tokenizer = None
    if where == "weights":
        from safetensors import torch as st
        real = st.save_file

        def save_file(tensors, filename, metadata=None):
            real(dict(list(tensors.items())[:3]), filename, metadata)   # a partial file, then the crash
            raise _Boom("disk full")
        monkeypatch.setattr(st, "save_file", save_file)
    elif where == "tokenizer":
        class Tokenizer:                                   # fails after writing one of its files
            def save_pretrained(self, d):
                (d / "tokenizer.json").write_text("{")
                raise _Boom("interrupted")
        tokenizer = Tokenizer()
    elif where == "swap":                                  # the rename of the new dir into place
        real_replace = os.replace

        def replace(src, dst):
            if ".tmp-" in str(src):
                raise _Boom("rename failed")
            return real_replace(src, dst)
        monkeypatch.setattr(os, "replace", replace)
    elif where == "keyboard":
        def record_plan(*args, **kwargs):
            raise KeyboardInterrupt
        monkeypatch.setattr(serialization, "record_plan", record_plan)
    err = KeyboardInterrupt if where == "keyboard" else _Boom
    with pytest.raises(err):
        qins.save(b, path, tokenizer=tokenizer)
    monkeypatch.undo()
    return a, path, before, ids


@pytest.mark.parametrize("where", ["weights", "tokenizer", "swap", "keyboard"])
def test_interrupted_save_keeps_the_previous_one(tmp_path, make_model, monkeypatch, where):
    a, path, before, ids = _interrupted_save(tmp_path, make_model, monkeypatch, where)
    # the previous save is intact, byte for byte, and loads to the same logits
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert torch.equal(logits(qins.load(path), ids), logits(a, ids))
    assert leftovers(tmp_path) == []                      # no temporary or backup directory left


def test_interrupted_first_save_leaves_nothing(tmp_path, make_model, monkeypatch):
    model = qins.quantize(make_model("llama"), WeightConfig("int-sym", 4, 32), progress=False)
    from safetensors import torch as st

    def save_file(*args, **kwargs):
        raise _Boom("disk full")
    monkeypatch.setattr(st, "save_file", save_file)
    with pytest.raises(_Boom):
        qins.save(model, tmp_path / "m")
    assert os.listdir(tmp_path) == []


def test_save_over_an_existing_save_replaces_it(tmp_path, make_model, token_ids):
    a = qins.quantize(make_model("llama", seed=0), WeightConfig("int-sym", 4, 32), progress=False)
    b = qins.quantize(make_model("llama", seed=1), WeightConfig("nf4", 4, 64), include_embeddings=True,
                      progress=False)
    qins.save(a, tmp_path / "m")
    qins.save(b, tmp_path / "m")
    loaded = qins.load(tmp_path / "m")
    assert isinstance(loaded.model.embed_tokens, QINSEmbedding)
    assert isinstance(loaded.model.layers[0].mlp.up_proj, QINSLinear)
    assert torch.equal(logits(loaded, token_ids), logits(b, token_ids))
    assert leftovers(tmp_path) == []


def test_save_onto_a_file_is_refused(tmp_path, make_model):
    model = qins.quantize(make_model("llama"), WeightConfig("int-sym", 4, 32), progress=False)
    (tmp_path / "m").write_text("not a directory")
    with pytest.raises(FileExistsError, match="not a directory"):
        qins.save(model, tmp_path / "m")
    assert (tmp_path / "m").read_text() == "not a directory"
    assert leftovers(tmp_path) == []


def test_load_casts_float_parameters_only(tmp_path, saved, token_ids):
    loaded = qins.load(saved[0], dtype=torch.bfloat16)
    assert loaded.model.norm.weight.dtype == torch.bfloat16
    emb = loaded.model.embed_tokens
    assert emb.scales.dtype == torch.float16 and emb.curvature.dtype == torch.float32   # stored format


def _tensor_spans(f):
    """{name: (start, end)} of every tensor's bytes in a safetensors file."""
    import struct as _struct
    data = f.read_bytes()
    (n,) = _struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
            for k, v in header.items() if k != "__metadata__"}


def test_flipped_bytes_name_the_tensor(copy_of_saved, saved, token_ids):
    # one flipped byte inside any tensor (first, middle, last byte of several tensors) is an
    # error naming it; before checksums 64 flipped bytes loaded without a word
    f = copy_of_saved / "model.safetensors"
    clean = f.read_bytes()
    spans = _tensor_spans(f)
    assert set(json.loads((copy_of_saved / "qins.json").read_text())["checksums"]["tensors"]) == set(spans)
    for name, (start, end) in list(spans.items())[::5]:
        for at in (start, (start + end) // 2, end - 1):
            bad = bytearray(clean)
            bad[at] ^= 0x10
            f.write_bytes(bytes(bad))
            with pytest.raises(ValueError, match=rf"tensor {re.escape(name)} is corrupt \(xxh3_64 checksum mismatch\)"):
                qins.load(copy_of_saved)
    # trusted storage: verify=False loads the damaged bytes as they are
    name, (start, end) = next((k, v) for k, v in spans.items() if k.endswith("qweight"))
    bad = bytearray(clean)
    bad[start] ^= 0x10
    f.write_bytes(bytes(bad))
    model = qins.load(copy_of_saved, verify=False)
    assert not torch.equal(logits(model, token_ids), saved[1])
    f.write_bytes(clean)
    assert torch.equal(logits(qins.load(copy_of_saved), token_ids), saved[1])


def test_directory_without_checksums_still_loads(copy_of_saved, saved, token_ids):
    # saved before checksums existed: no "checksums" in qins.json, loaded unverified
    f = copy_of_saved / "qins.json"
    doc = json.loads(f.read_text())
    del doc["checksums"]
    f.write_text(json.dumps(doc))
    assert torch.equal(logits(qins.load(copy_of_saved), token_ids), saved[1])
    doc["checksums"] = {"algorithm": "md5", "tensors": {}}
    f.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'checksums' is not a xxh3_64 table"):
        qins.load(copy_of_saved)


def test_saved_files_get_the_usual_permissions(tmp_path, make_model):
    # atomic writes go through mkstemp / mkdtemp (modes 0o600 / 0o700): the saved directory, its
    # files and a key plan get what a plain open / mkdir gives (0o666 / 0o777 less the umask), so
    # a model saved by one user can be read by another; a replaced file keeps its mode
    from qins._files import atomic_write
    old = os.umask(0o022)
    try:
        qins.save(qins.quantize(make_model("llama"), WeightConfig("int-sym", 4, 32), progress=False), tmp_path / "m")
        assert (tmp_path / "m").stat().st_mode & 0o777 == 0o755
        assert {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "m").iterdir()} == \
            {p.name: 0o644 for p in (tmp_path / "m").iterdir()}
        f = atomic_write(tmp_path / "plan.json", "{}")
        assert f.stat().st_mode & 0o777 == 0o644
        f.chmod(0o640)
        atomic_write(f, "[]")
        assert f.stat().st_mode & 0o777 == 0o640 and f.read_text() == "[]"
        os.umask(0o077)
        assert atomic_write(tmp_path / "private.json", "{}").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
