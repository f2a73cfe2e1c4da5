"""Tensor parallelism of QINS modules (weights/parallel.py).

In process: every shard decodes to exactly (torch.equal) the matching slice of the full
decoded weight, for every packed bit width, and bad shardings raise naming the module.
Two gloo processes: tiny Llama and Phi-3 (fused qkv_proj / gate_up_proj) at 4 and 8 bits,
loaded with transformers' tp_plan="auto", give the single-process logits.
"""
from __future__ import annotations

import copy
import socket
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

import qins
from qins.weights.linear import QINSEmbedding, QINSLinear
from qins.weights.parallel import plan_matches, shard_module, stored_bytes


def qlinear(out_f, in_f, config, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=True)
    return QINSLinear.from_float(lin, replace(config, clip_search=False))   # clip search: slow, irrelevant here


CASES = [qins.WeightConfig("qins", b, g) for b in (2, 3, 4, 5, 6, 8) for g in (32, 64)] + [
    qins.WeightConfig("qins", 4, 32, curvature="channel"), qins.WeightConfig("int-asym", 4, 64),
    qins.WeightConfig("int-sym", 8, 32)]


@pytest.mark.parametrize("config", CASES, ids=lambda c: c.label + "-" + c.curvature)
@pytest.mark.parametrize("world", [2, 4])
def test_shards_decode_to_slices_of_the_full_weight(config, world):
    in_f = 256                                  # 8 groups of 32 / 4 of 64: world 4 divides both
    full = qlinear(96, in_f, config)
    w = full.dequantize()
    x = torch.randn(3, in_f)
    parts = []
    for rank in range(world):
        col = copy.deepcopy(full)
        shard_module(col, "col", "colwise", rank, world)
        rows = slice(rank * 96 // world, (rank + 1) * 96 // world)
        assert torch.equal(col.dequantize(), w[rows])
        assert torch.equal(col.bias, full.bias.data[rows])
        row = copy.deepcopy(full)
        shard_module(row, "row", "rowwise", rank, world)
        cols = slice(rank * in_f // world, (rank + 1) * in_f // world)
        assert torch.equal(row.dequantize(), w[:, cols])
        assert row.in_features == in_f and row.weight_shape == (96, in_f // world)
        # bytes: codes and group params split evenly; the curvature (1 or 96 floats) is kept whole
        kept = 0 if full.curvature is None else full.curvature.numel() * 4
        assert stored_bytes(row) <= (stored_bytes(full) - kept) / world + kept
        row.bias = None
        parts.append(row(x[:, cols]))
    # the sum of the row-wise partial products is the full product (fp32 summation order
    # differs; 1e-4 allowed on outputs of magnitude ~1)
    torch.testing.assert_close(sum(parts) + full.bias, full(x), atol=1e-4, rtol=1e-4)


def test_packed_colwise_keeps_each_fused_part():
    cfg = qins.WeightConfig("qins", 4, 32)
    full = qlinear(128, 64, cfg)
    w = full.dequantize()
    m = qlinear(128, 64, cfg)
    shard_module(m, "gate_up", "packed_colwise", 1, 2)      # rank 1: rows 32:64 (gate) and 96:128 (up)
    assert torch.equal(m.dequantize(), torch.cat([w[32:64], w[96:128]]))


@pytest.mark.parametrize("config, style, world, match", [
    (qins.WeightConfig("qins", 4, None), "rowwise", 2, r"o_proj: .*a group would straddle ranks"),
    (qins.WeightConfig("qins", 4, 32), "rowwise", 3, r"o_proj: the number of groups per row = 8 is not divisible by the world size 3"),
    (qins.WeightConfig("qins", 4, 32), "colwise", 5, r"o_proj: out_features = 96 is not divisible by the world size 5"),
    (qins.WeightConfig("qins", 4, 32), "sequence_parallel", 2, r"o_proj: tensor-parallel style 'sequence_parallel' is not supported"),
])
def test_bad_shardings_name_the_module(config, style, world, match):
    m = qlinear(96, 256, config)
    with pytest.raises(ValueError, match=match):
        shard_module(m, "o_proj", style, 0, world)


def test_embeddings_and_tied_heads_are_refused():
    cfg = qins.WeightConfig("qins", 4, 32)
    emb = QINSEmbedding.from_float(torch.nn.Embedding(64, 32), cfg)
    with pytest.raises(ValueError, match="embed: tensor-parallel style 'colwise' on a QINS embedding"):
        shard_module(emb, "embed", "colwise", 0, 2)
    head = QINSLinear(32, 64, False, None, tied_to=emb)
    with pytest.raises(ValueError, match="lm_head: a tied QINS lm_head"):
        shard_module(head, "lm_head", "colwise_gather_output", 0, 2)


def test_plan_matching():
    plan = {"model.layers.*.self_attn.q_proj": "colwise", "lm_head": "colwise_gather_output"}
    assert plan_matches(plan, "model.layers.12.self_attn.q_proj") == "colwise"
    assert plan_matches(plan, "model.layers.x.self_attn.q_proj") is None
    assert plan_matches(plan, "model.layers.1.self_attn.q_proj.extra") is None
    assert plan_matches(plan, "lm_head") == "colwise_gather_output"


# ---- two gloo processes through transformers' tp_plan="auto" ----------------------------

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_tensor_parallel_matches_one_process(tmp_path):
    from tests.weights.tp_worker import cached_step, run

    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    dirs, refs, full_bytes = [], [], []
    for arch in ("llama", "phi3"):
        for bits in (4, 8):
            torch.manual_seed(bits)
            cfg = LlamaConfig(**TINY) if arch == "llama" else Phi3Config(**TINY, pad_token_id=0, eos_token_id=1)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
            qins.quantize(model, qins.WeightConfig("qins", bits, 32, clip_search=False), progress=False)
            d = tmp_path / f"{arch}{bits}"
            qins.save(model, d)                 # loads back bit-exactly (tests/weights/test_hf.py)
            with torch.no_grad():
                refs.append((model(ids).logits, cached_step(model, ids)))
            full_bytes.append(stored_bytes(model))
            dirs.append(str(d))
    ctx = mp.start_processes(run, args=(2, _free_port(), dirs, str(tmp_path)), nprocs=2, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 240          # never hang CI: gloo's own timeout is 60 s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("tensor-parallel workers did not finish in 240 s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    for i, d in enumerate(dirs):
        for rank in range(2):
            out = torch.load(tmp_path / f"rank{rank}_{i}.pt")
            # fp32: the row-wise all-reduce sums two partial products in another order than the
            # one-process matmul; measured max |diff| 4.2e-7 (llama 4-bit), 3.9e-7 (phi3 8-bit)
            torch.testing.assert_close(out["logits"], refs[i][0], atol=1e-5, rtol=1e-5, msg=d)
            # the same through a QINSCache holding 4-bit K/V pages of this rank's heads
            torch.testing.assert_close(out["cached"], refs[i][1], atol=1e-5, rtol=1e-5, msg=d)
            assert out["bytes"] <= 0.55 * full_bytes[i], (d, rank, out["bytes"], full_bytes[i])


def test_world_size_must_divide_the_heads():
    from qins.weights.hf import shard_for_tp

    class Mesh:                                  # what shard_for_tp reads of transformers' TP mesh
        def get_local_rank(self):
            return 0

        def size(self):
            return 3

    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32)
    model._mesh_manager = type("M", (), {"get_mesh": lambda self, dim: Mesh()})()
    with pytest.raises(ValueError, match="num_attention_heads = 4 is not divisible by 3"):
        shard_for_tp(model)
