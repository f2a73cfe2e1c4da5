"""benchmarks/gpu/kv_decode.py end to end with --tiny on the CPU: every variant gets a row
without error, the eager static cache reproduces the baseline's tokens, the QINSCache rows say
which path read the pages and hold fewer bytes at residual 0. No timing is asserted; the GPU
run (issue 12's 32k end-to-end target) is the lead's, on the device machine."""
from __future__ import annotations

import json

from . import GPU_SCRIPTS, load_script


def test_tiny_run_writes_every_variant(tmp_path, monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    mod = load_script(GPU_SCRIPTS / "kv_decode.py", "bench_gpu_kv_decode")
    out = tmp_path / "kv_decode_tiny.json"
    mod.main(["--tiny", "--context", "300", "--steps", "4", "--r0", "--recipe", "--prefill-chunk", "128",
              "--json", str(out)])
    doc = json.loads(out.read_text())
    rows = {r["variant"]: r for r in doc["rows"]}
    assert set(rows) == {"static-bf16", "static-bf16-eager", "qins-kv4", "qins-kv8", "qins-kv4-r0", "qins-kv4-recipe"}
    assert all(r.get("error") is None for r in rows.values()), {k: r.get("error") for k, r in rows.items()}
    assert rows["static-bf16-eager"]["match"] == 1.0 and rows["static-bf16"]["mode"] == "eager"   # CPU: no graph
    for k in ("qins-kv4", "qins-kv8", "qins-kv4-r0", "qins-kv4-recipe"):
        r = rows[k]
        assert r["paths"] == ["reference"] and r["tokens_per_second"] > 0 and 0.0 <= r["match"] <= 1.0
    # 300 tokens: at residual 0 the pages hold all but the sink, under the bf16 static cache's bytes
    assert rows["qins-kv4-r0"]["kv_bytes"] < rows["static-bf16"]["kv_bytes"]
    assert rows["qins-kv4-recipe"]["kv_bytes"] == rows["qins-kv4-r0"]["kv_bytes"]   # a plan costs no memory
    assert doc["context"] == 300 and doc["env"]["torch"]
