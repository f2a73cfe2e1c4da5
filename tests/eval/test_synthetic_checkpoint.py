"""The synthetic Phi-3.5-mini checkpoint: Phi3ForCausalLM's names and shapes, loadable, heavy-tailed."""
from __future__ import annotations

import json

import torch

from qins.eval.synthetic_checkpoint import expected_tensors, phi35_mini_config, write_checkpoint


def test_full_size_shapes_are_phi35_mini():
    """The released model's shapes (fused qkv and gate_up, untied head): 3,821,079,552 parameters."""
    specs = {s.name: s for s in expected_tensors(phi35_mini_config())}
    assert specs["model.layers.0.self_attn.qkv_proj.weight"].shape == (9216, 3072)
    assert specs["model.layers.31.mlp.gate_up_proj.weight"].shape == (16384, 3072)
    assert specs["model.layers.31.mlp.down_proj.weight"].shape == (3072, 8192)
    assert specs["lm_head.weight"].shape == specs["model.embed_tokens.weight"].shape == (32064, 3072)
    assert {s.dtype for s in specs.values()} == {torch.bfloat16}
    assert sum(s.nbytes for s in specs.values()) // 2 == 3_821_079_552


def test_small_checkpoint_loads_and_matches_the_model(tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, Phi3ForCausalLM

    config = phi35_mini_config(layers=2, hidden=192, vocab=500)
    write_checkpoint(tmp_path, config, seed=3, shard_bytes=300_000, progress=False)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    expected = {k: tuple(v.shape) for k, v in Phi3ForCausalLM(config).state_dict().items()}
    found = {}
    for f in shards:
        with safe_open(str(tmp_path / f), "pt") as h:
            found.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
    assert found == expected and set(index["weight_map"]) == set(expected)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(model).__name__ == "Phi3ForCausalLM" and model.lm_head.weight.dtype == torch.bfloat16
    w = model.model.layers[1].mlp.gate_up_proj.weight.float()
    z = (w - w.mean()) / w.std()
    # heavy tails: a normal's kurtosis is 3; the Student-t(3) outliers gave 117 on this tensor
    # (113 to 2977 over the linears of this checkpoint)
    assert z.pow(4).mean() > 20
    # last layer's factor 1.4 / sqrt(fan_in), plus the outliers' variance (1e-3 x 3 x 8^2 = +19%):
    # 1.4 x sqrt(1.19) = 1.53; measured 1.50
    assert abs(w.std().item() * 192 ** 0.5 - 1.53) < 0.1


def test_same_seed_same_bytes_any_sharding(tmp_path):
    config = phi35_mini_config(layers=1, hidden=96, vocab=200)
    write_checkpoint(tmp_path / "a", config, seed=5, shard_bytes=10**9, progress=False)
    write_checkpoint(tmp_path / "b", config, seed=5, shard_bytes=50_000, progress=False)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "a" / "model-00001-of-00001.safetensors"))
    b = {}
    for f in sorted((tmp_path / "b").glob("model-*.safetensors")):
        b.update(load_file(str(f)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
