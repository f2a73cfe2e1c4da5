"""benchmarks/gpu/phi35_full.py at a tiny width on the CPU: every step runs in its own process,
the JSON lands in $OUT, the compressed model is the one `qins compress --stream` writes, and the
CPU step's greedy tokens are the ones the saved model gives in this process. No timing asserted."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from . import GPU_SCRIPTS, load_script

SCRIPT = GPU_SCRIPTS / "phi35_full.py"


@pytest.fixture(scope="module")
def bench():
    return load_script(SCRIPT, "phi35_full")


def test_a_step_past_its_cap_is_killed_and_recorded(bench, tmp_path):
    r = bench.run_child([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                        1.0, tmp_path / "log")
    assert r["timed_out"] and not r["ok"] and r["wall_s"] < 30
    assert "started" in r["log_tail"]


@pytest.mark.slow          # 4 child processes, each importing torch and transformers: ~1.5 min on 2 cores
def test_tiny_run_end_to_end(bench, tmp_path, monkeypatch, capsys):
    import qins
    from qins.metrics.decode import greedy_decode

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    work = tmp_path / "work"
    assert bench.main(["--layers", "1", "--hidden", "96", "--vocab", "512", "--workdir", str(work), "--no-cuda"]) == 0
    doc = json.loads((tmp_path / "out" / "phi35_full.json").read_text())
    steps = doc["steps"]
    assert steps["checkpoint"]["ok"] and steps["compress"]["ok"] and steps["load_cpu"]["ok"], steps
    assert steps["load_cuda"] == {"ok": False, "skipped": "no CUDA device"}

    c = steps["compress"]
    out = work / "phi35-1L-h96-v512-qins"
    assert c["qins_command"].endswith("--stream --device cpu") and c["cli_rc"] == 0
    assert c["model_safetensors_bytes"] == (out / "model.safetensors").stat().st_size
    assert c["bpw_all_in"] == pytest.approx(8 * c["model_safetensors_bytes"] / steps["checkpoint"]["params"])
    # qkv, o, gate_up, down, the lm_head and the input embedding: every weight quantized
    assert sum(c["plan"].values()) == 6 and sum(k.startswith("embedding") for k in c["plan"]) == 1
    assert 0 < c["vmhwm"] <= c["peak_rss_bytes"]

    cpu = steps["load_cpu"]
    assert cpu["params_on_meta"] == 0 and cpu["float_weight_params"] == 0
    assert 0 < cpu["rss_before_load"] <= cpu["vmhwm_after_load"] <= cpu["vmhwm"]
    # the child's tokens are the saved model's greedy tokens for the script's prompt
    model = qins.load(out, dtype=torch.float32)
    prompt = torch.tensor([[t % 512 for t in bench.PROMPT]])
    want = greedy_decode(model, prompt, 3, mode="eager", check_steps=0).tokens[0].tolist()
    assert cpu["tokens"] == want
    assert "cpu_vs_cuda" not in doc and doc["targets"]["disk_le_2.0GB"]

    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("wrote ") and any(line.startswith("load_cpu    ok") for line in printed)
