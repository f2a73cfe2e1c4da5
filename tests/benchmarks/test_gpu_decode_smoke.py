"""benchmarks/gpu/decode.py end to end with --tiny on the CPU: every variant gets a row, bf16
matches itself, the quantized rows carry their quantization time and smaller weights.
No timing is asserted (tests never do); the GPU run is the lead's, on the device machine."""
from __future__ import annotations

import json

import pytest

from . import GPU_SCRIPTS, load_script

SCRIPT = GPU_SCRIPTS / "decode.py"


@pytest.fixture(scope="module")
def decode_script():
    return load_script(SCRIPT, "bench_gpu_decode")


def test_tiny_run_writes_every_variant(decode_script, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    out = tmp_path / "decode_tiny.json"
    decode_script.main(["--tiny", "--new-tokens", "6", "--batch", "1", "2", "--prompt-len", "16",
                        "--json", str(out)])
    doc = json.loads(out.read_text())
    assert (tmp_path / "decode_tiny.md").exists()
    rows = {(r["variant"], r["batch"]): r for r in doc["rows"]}
    assert set(rows) == {(v, b) for v in ("bf16", "qins-8b", "qins-4b") for b in (1, 2)}
    assert all(r.get("error") is None for r in rows.values()), [r.get("error") for r in rows.values()]
    for b in (1, 2):
        ref = rows[("bf16", b)]
        assert ref["match"] == 1.0 and ref["identical"] == b and ref["first_logit_max_abs_diff"] == 0.0
        assert ref["mode"] == "eager" and ref["steps"] == 6 and ref["tokens_per_second"] > 0
        assert 0.0 <= ref["hf_generate_match"] <= 1.0
        for v in ("qins-8b", "qins-4b"):
            r = rows[(v, b)]
            assert r["quant_seconds"] > 0 and r["weight_bytes"] < ref["weight_bytes"]
            assert 0.0 <= r["match"] <= 1.0 and r["compared_tokens"] == 7
    assert rows[("qins-4b", 1)]["weight_bytes"] < rows[("qins-8b", 1)]["weight_bytes"]
    for key in ("card", "date", "torch", "transformers"):
        assert doc["env"][key]
    assert doc["command"].startswith("python benchmarks/gpu/decode.py --tiny")
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| variant") and len(table) == 2 + 6       # the table is printed last


def test_copied_layers_reuse_exactly_their_sources_codes(decode_script):
    """--unique-layers: a layer that copies another gets the codes a full quantize gives it."""
    import copy

    import torch

    base = decode_script.random_llama(dict(decode_script.TINY, num_hidden_layers=3), "cpu", None, 1, 0)
    l0, l2 = base.model.layers[0], base.model.layers[2]
    assert torch.equal(l0.mlp.up_proj.weight, l2.mlp.up_proj.weight)
    assert l0.mlp.up_proj.weight.data_ptr() != l2.mlp.up_proj.weight.data_ptr()   # own tensors
    shared = decode_script.quantize(copy.deepcopy(base), ("qins", 4, 64), unique=1)
    full = decode_script.quantize(copy.deepcopy(base), ("qins", 4, 64), unique=0)
    a, b = shared.state_dict(), full.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    q0, q2 = shared.model.layers[0].mlp.up_proj.qweight, shared.model.layers[2].mlp.up_proj.qweight
    assert q0.data_ptr() != q2.data_ptr()
