"""Smoke run of benchmarks/gpu/quantize_8b.py on the CPU (--tiny): it runs, writes its JSON
where it says, and the numbers in it are the ones of a quantized model. No timing asserted."""
from __future__ import annotations

import json

import pytest

from . import GPU_SCRIPTS, load_script

SCRIPT = GPU_SCRIPTS / "quantize_8b.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "quantize_8b")


def test_tiny_run_writes_the_json(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OUT", raising=False)
    dest = tmp_path / "q.json"
    bench.main(["--tiny", "--window", "128", "--json", str(dest)])
    doc = json.loads(dest.read_text())
    assert [r["run"] for r in doc["runs"]] == ["qins4", "qins8", "gptq4"]
    assert doc["model"]["shapes"]["num_hidden_layers"] == 2 and doc["model"]["shapes"]["hidden_size"] == 256
    for r in doc["runs"]:
        assert r["seconds"] > 0 and r["peak_gb"] is None          # no CUDA memory on the CPU
        # 2 layers of q, o (256 x 256), k, v (64 x 256: one KV head of 64), gate, up, down (896 x 256);
        # 4 bits + an fp16 scale per 64 = 4.25 bpw (the curvature adds 32 bits per tensor)
        assert r["quantized_weights"] == 2 * (2 * 256 * 256 + 2 * 64 * 256 + 3 * 896 * 256)
        assert r["quantized_bpw"] == pytest.approx({"qins8": 8.125}.get(r["run"], 4.25), abs=1e-3)
    gptq = doc["runs"][2]
    assert gptq["windows"] == 2 and gptq["window"] == 128
    # Hessians: 4 distinct inputs per layer (q/k/v, o, gate/up, down) and the lm_head's, float32
    assert gptq["hessian_bytes"] == 4 * (2 * (3 * 256**2 + 896**2) + 256**2)
    out = capsys.readouterr().out
    assert "gptq4" in out and str(dest) in out


def test_out_env_wins_over_json(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    bench.main(["--tiny", "--runs", "qins4", "--layers", "1", "--json", str(tmp_path / "not-here.json")])
    assert (tmp_path / "out" / "quantize_8b.json").is_file()
    assert not (tmp_path / "not-here.json").exists()
