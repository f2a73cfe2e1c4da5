"""Sequential GPTQ while streaming: the same codes as quantizing the float model layer by
layer in memory, each layer's Hessian taken with the layers below it already quantized.

The reference below is written with the public pieces only (`input_hessians` on the whole
model, `qins.quantize` of one layer at a time); the streamed path runs each layer alone from
the checkpoint. Equality is exact (bytes): same float32 arithmetic in the same batches.
"""
from __future__ import annotations

import json

import pytest
import torch

import qins
from qins.codec.config import WeightConfig
from qins.metrics.models import SOURCE_ATTR
from qins.weights.calibration import input_hessians
from qins.weights.linear import is_linear_like
from qins.weights.stream import compress_checkpoint

from .test_stream import Stop, assert_same_save, files, interrupt_after

CFG = WeightConfig("qins", 4, 64, rounding="gptq")
EMB = WeightConfig("qins", 6, 128, rounding="gptq")


def windows(vocab: int) -> torch.Tensor:
    # 6 windows in batches of 4: the last batch is a partial one
    return torch.randint(0, vocab, (6, 24), generator=torch.Generator().manual_seed(0))


def sequential_in_memory(src, out, ids, cfg=CFG, emb=EMB):
    """The float model quantized in memory: embedding (nearest), then each layer with the
    Hessians of the model whose lower layers are quantized, then lm_head."""
    from pathlib import Path

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    setattr(model, SOURCE_ATTR, {"path": str(Path(src).resolve()), "sha256": None})
    linears = [n for n, m in model.named_modules() if is_linear_like(m) and n != "lm_head"]
    tied = model.lm_head.weight is model.get_input_embeddings().weight
    qins.quantize(model, cfg, embeddings=emb, skip=linears + ([] if tied else ["lm_head"]),
                  progress=False)                   # the embedding (and a tied head)
    for i in range(model.config.num_hidden_layers):
        mine = [n for n in linears if n.startswith(f"model.layers.{i}.")]
        H = input_hessians(model, ids, batch_size=4, names=mine, progress=False)
        qins.quantize(model, cfg, skip=[n for n in linears if n not in mine], calibration=H, progress=False)
    if not tied:                                      # its own codes, from the last layer's output
        H = input_hessians(model, ids, batch_size=4, names=["lm_head"], progress=False)
        qins.quantize(model, cfg, embeddings=emb, calibration=H, progress=False)
    model.to(torch.bfloat16)                          # float tensors stored in the source dtype
    model.config.dtype = torch.bfloat16
    return qins.save(model, out)


@pytest.mark.parametrize("case", ["phi3", "llama-tied"])
def test_stream_gptq_matches_in_memory_sequential(case, phi3_dir, llama_dir, tmp_path):
    src, vocab = (phi3_dir, 500) if case == "phi3" else (llama_dir, 300)
    ids = windows(vocab)
    ref = sequential_in_memory(src, tmp_path / "mem", ids)
    out = compress_checkpoint(src, tmp_path / "stream", CFG, embeddings=EMB, calibration=ids,
                              shard_bytes=60_000, progress=False)
    plan = json.loads((out / "qins.json").read_text())["modules"]
    assert {e["config"]["rounding"] for n, e in plan.items() if e["kind"] == "linear"} == {"gptq"}
    assert [e["config"]["rounding"] for e in plan.values() if e["kind"] == "embedding"] == ["nearest"]
    assert_same_save(ref, out)


def test_gptq_differs_from_nearest_and_needs_calibration(phi3_dir, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        compress_checkpoint(phi3_dir, tmp_path / "o", CFG, progress=False)
    assert not (tmp_path / "o").exists()
    a = compress_checkpoint(phi3_dir, tmp_path / "g", CFG, calibration=windows(500), progress=False)
    b = compress_checkpoint(phi3_dir, tmp_path / "n", CFG.replace(rounding="nearest"), progress=False)
    ga, gb = qins.load(a), qins.load(b)
    qa = ga.get_submodule("model.layers.1.mlp.down_proj").qweight
    assert not torch.equal(qa, gb.get_submodule("model.layers.1.mlp.down_proj").qweight)


@pytest.mark.parametrize("stop", [1, 4])
def test_gptq_resume_is_byte_identical(stop, phi3_dir, tmp_path):
    """Interrupted after a shard inside layer 0 (1) or layer 1 (4): the rerun rebuilds the
    finished layers from their written codes and continues to the same bytes."""
    ids = windows(500)
    kw = dict(embeddings=EMB, calibration=ids, shard_bytes=30_000, progress=False)
    whole = compress_checkpoint(phi3_dir, tmp_path / "whole", CFG, **kw)
    out = tmp_path / "out"
    with pytest.raises(Stop):
        compress_checkpoint(phi3_dir, out, CFG, _after_shard=interrupt_after(stop), **kw)
    redone = []
    compress_checkpoint(phi3_dir, out, CFG, _after_shard=redone.append, **kw)
    assert redone[0] == stop + 1
    assert files(out) == files(whole)


def test_cli_stream_gptq(phi3_dir, tmp_path, capsys):
    """`qins compress --stream --rounding gptq`: the checkpoint's tokenizer cuts the default
    corpus into calibration windows, then the library runs as above."""
    import shutil

    from tests.test_cli import tiny_tokenizer

    from qins.cli import main
    from qins.metrics.models import read_corpus
    from qins.metrics.quality import token_windows
    src = tmp_path / "src"
    shutil.copytree(phi3_dir, src)
    assert main(["compress", str(src), "-o", str(tmp_path / "x"), "--stream", "--rounding", "gptq"]) == 2
    assert "tokenizer" in capsys.readouterr().err
    tok = tiny_tokenizer(500)
    tok.save_pretrained(src)
    out = tmp_path / "q"
    assert main(["compress", str(src), "-o", str(out), "--stream", "--rounding", "gptq",
                 "--calibration-windows", "2", "--no-embeddings"]) == 0
    assert "sequential GPTQ" in capsys.readouterr().out
    ids = token_windows(tok, read_corpus(None), 512, max_windows=2)
    # the CLI stores log8 scales at 4 bits (--scales auto)
    ref = compress_checkpoint(src, tmp_path / "lib", CFG.replace(scale_dtype="log8"), calibration=ids, progress=False)
    assert files(out) == files(ref)
    assert main(["compress", str(src), "-o", str(out), "--stream", "--calibration-windows", "2"]) == 2
    assert "--rounding gptq only" in capsys.readouterr().err
