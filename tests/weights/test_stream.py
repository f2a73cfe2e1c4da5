"""Streaming compression: the same files as quantize + save, resumable, corrupt shards redone.

Equality is exact (bytes, torch.equal): the streamed path runs the same encoder on the same
bf16 weights, so any difference is a bug in the plan, the order or the file layout.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

import qins
from qins.codec.config import WeightConfig
from qins.metrics.models import SOURCE_ATTR
from qins.weights.stream import TensorSpec, compress_checkpoint, write_safetensors

CFG = WeightConfig("qins", 4, 64)
LOG8 = CFG.replace(scale_dtype="log8")          # scales stored as scale_codes + scale_refs


def in_memory(src, out, dtype="auto", cfg=CFG, **kw):
    # as load_model(src, dtype="auto"), which also wants a tokenizer these checkpoints lack
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(src, dtype=getattr(torch, dtype, dtype)).eval()
    setattr(model, SOURCE_ATTR, {"path": str(Path(src).resolve()), "sha256": None})
    qins.quantize(model, cfg, progress=False, **kw)
    return qins.save(model, out)


def files(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


def logits(path):
    model = qins.load(path)
    ids = torch.arange(40).reshape(2, 20) % 290
    with torch.no_grad():
        return model(ids).logits


def assert_same_save(a: Path, b: Path):
    """Same files; model.safetensors identical except the order of its two metadata keys,
    which safetensors' save_file takes from a Rust HashMap (varies from process to process)."""
    fa, fb = files(a), files(b)
    assert sorted(fa) == sorted(fb)
    for name in fa:
        if name == "model.safetensors":
            (na,), (nb,) = struct.unpack("<Q", fa[name][:8]), struct.unpack("<Q", fb[name][:8])
            assert na == nb and json.loads(fa[name][8:8 + na]) == json.loads(fb[name][8:8 + nb])
            assert fa[name][8 + na:] == fb[name][8 + nb:]
        elif name == "generation_config.json":
            assert _non_default(fa[name]) == _non_default(fb[name])
        else:
            assert fa[name] == fb[name], name


def _non_default(raw: bytes) -> dict:
    """A generation config's settings that differ from GenerationConfig()'s: from_pretrained
    and from_config models (the streamed path's skeleton) write the defaults
    output_attentions / output_hidden_states = false differently."""
    from transformers import GenerationConfig
    default = GenerationConfig()
    return {k: v for k, v in json.loads(raw).items()
            if getattr(default, k, object()) != v and not (k.startswith("output_") and v is False)}


@pytest.mark.parametrize("case", ["phi3", "llama", "llama-embeddings", "phi3-skip", "gpt2", "gpt2-bf16",
                                  "phi3-log8", "llama-embeddings-log8"])
def test_stream_matches_quantize_then_save(case, phi3_dir, llama_dir, gpt2_dir, tmp_path):
    src = {"phi3": phi3_dir, "llama": llama_dir, "gpt2": gpt2_dir}[case.split("-")[0]]
    kw = {"include_embeddings": True} if case.startswith("llama-embeddings") else \
        {"skip": ["model.layers.1.mlp.*"]} if case == "phi3-skip" else {}
    dtype = "bfloat16" if case == "gpt2-bf16" else None          # a float32 checkpoint cast on the way
    cfg = LOG8 if case.endswith("log8") else CFG
    ref = in_memory(src, tmp_path / "mem", dtype=dtype or "auto", cfg=cfg, **kw)
    out = compress_checkpoint(src, tmp_path / "stream", cfg, shard_bytes=60_000, progress=False, dtype=dtype, **kw)
    assert_same_save(ref, out)
    assert torch.equal(logits(out), logits(ref))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]      # no work dir left


class Stop(Exception):
    pass


def interrupt_after(k):
    def hook(i):
        if i == k:
            raise Stop
    return hook


@pytest.mark.parametrize("cfg", [CFG, LOG8], ids=["float16", "log8"])
def test_resume_after_interruption_gives_identical_files(phi3_dir, tmp_path, cfg):
    whole = compress_checkpoint(phi3_dir, tmp_path / "whole", cfg, shard_bytes=60_000, progress=False)
    out = tmp_path / "out"
    with pytest.raises(Stop):
        compress_checkpoint(phi3_dir, out, cfg, shard_bytes=60_000, progress=False, _after_shard=interrupt_after(2))
    assert not out.exists()
    work = tmp_path / ".out.stream-partial"
    assert len(json.loads((work / "progress.json").read_text())["shards"]) == 3
    redone = []
    compress_checkpoint(phi3_dir, out, cfg, shard_bytes=60_000, progress=False, _after_shard=redone.append)
    assert redone and redone[0] == 3                       # shards 0..2 were skipped
    assert files(out) == files(whole)
    assert not work.exists()


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_damaged_finished_shard_is_redone(damage, phi3_dir, tmp_path):
    whole = compress_checkpoint(phi3_dir, tmp_path / "whole", CFG, shard_bytes=60_000, progress=False)
    out = tmp_path / "out"
    with pytest.raises(Stop):
        compress_checkpoint(phi3_dir, out, CFG, shard_bytes=60_000, progress=False, _after_shard=interrupt_after(2))
    shard = tmp_path / ".out.stream-partial" / "shard-00002.safetensors"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        shard.unlink()
    redone = []
    compress_checkpoint(phi3_dir, out, CFG, shard_bytes=60_000, progress=False, _after_shard=redone.append)
    assert redone[0] == 1 and 0 not in redone and 2 not in redone
    assert files(out) == files(whole)


def test_changed_options_start_over(phi3_dir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(Stop):
        compress_checkpoint(phi3_dir, out, CFG, shard_bytes=60_000, progress=False, _after_shard=interrupt_after(1))
    other = WeightConfig("qins", 3, 64)
    redone = []
    compress_checkpoint(phi3_dir, out, other, shard_bytes=60_000, progress=False, _after_shard=redone.append)
    assert redone[0] == 0                                  # nothing of the 4-bit run reused
    assert compress_checkpoint(phi3_dir, tmp_path / "fresh", other, shard_bytes=60_000, progress=False) \
        and files(out) == files(tmp_path / "fresh")


def test_write_safetensors_matches_save_file(tmp_path):
    """The streaming writer lays a file out byte for byte as safetensors' save_file."""
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(0)
    ts = {"b.w": torch.randn(3, 5, generator=g).bfloat16(), "a.q": torch.randint(-9, 9, (7, 2), dtype=torch.int32),
          "c": torch.randn(4, generator=g).half(), "z": torch.randn(2, 3, generator=g), "u": torch.arange(5).to(torch.uint8),
          "e": torch.zeros(0, 4)}
    save_file(ts, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    specs = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in ts.items()]
    write_safetensors(tmp_path / "ours.safetensors", specs, ts.__getitem__, metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    with pytest.raises(ValueError, match="expected"):
        write_safetensors(tmp_path / "bad.safetensors", specs, lambda k: ts[k].float())
    assert not (tmp_path / "bad.safetensors").exists()


def test_cli_stream(phi3_dir, tmp_path, capsys):
    from qins.cli import main
    out = tmp_path / "q"
    assert main(["compress", str(phi3_dir), "-o", str(out), "--stream", "--bits", "4", "--group-size", "64"]) == 0
    assert "GB on disk" in capsys.readouterr().out
    # the CLI's defaults: log8 scales, embeddings and lm_head quantized too (6-bit g128, nearest
    # when streaming)
    ref = compress_checkpoint(phi3_dir, tmp_path / "lib", LOG8, progress=False,
                              embeddings=LOG8.replace(bits=6, group_size=128))
    assert files(out) == files(ref)
    out2 = tmp_path / "q2"
    assert main(["compress", str(phi3_dir), "-o", str(out2), "--stream", "--bits", "4", "--group-size", "64",
                 "--no-embeddings", "--scales", "float16"]) == 0
    assert files(out2) == files(compress_checkpoint(phi3_dir, tmp_path / "lib2", CFG, progress=False))
    out3 = tmp_path / "q3"                  # the <= 2.0 GB plan for Phi-3.5-mini (README)
    assert main(["compress", str(phi3_dir), "-o", str(out3), "--stream", "--embeddings", "5:128"]) == 0
    ref3 = compress_checkpoint(phi3_dir, tmp_path / "lib3", LOG8, progress=False,
                               embeddings=LOG8.replace(bits=5, group_size=128))
    assert files(out3) == files(ref3)
    assert (out3 / "model.safetensors").stat().st_size < (out / "model.safetensors").stat().st_size
    assert main(["compress", str(phi3_dir), "-o", str(out), "--stream", "--target-bpw", "4"]) == 2
    assert "cannot be combined with --stream" in capsys.readouterr().err


def test_resume_after_sigkill(phi3_dir, tmp_path):
    """A process killed (SIGKILL) right after its second shard is recorded resumes from there."""
    import os
    import subprocess
    import sys
    out = tmp_path / "out"
    code = ("import os, signal, sys\n"
            "from qins.codec.config import WeightConfig\n"
            "from qins.weights.stream import compress_checkpoint\n"
            "kill = lambda i: i == 1 and os.kill(os.getpid(), signal.SIGKILL)\n"
            "compress_checkpoint(sys.argv[1], sys.argv[2], WeightConfig('qins', 4, 64), shard_bytes=60_000,\n"
            "                    progress=False, _after_shard=kill)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-c", code, str(phi3_dir), str(out)], env=env, timeout=300)
    assert proc.returncode == -9 and not out.exists()
    redone = []
    compress_checkpoint(phi3_dir, out, CFG, shard_bytes=60_000, progress=False, _after_shard=redone.append)
    assert redone[0] == 2
    whole = compress_checkpoint(phi3_dir, tmp_path / "whole", CFG, shard_bytes=60_000, progress=False)
    assert files(out) == files(whole)


def test_truncated_source_is_a_clear_error(phi3_dir, tmp_path):
    """The reader (plain file reads, no mapping) names a source shard cut short."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(phi3_dir, src)
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        compress_checkpoint(src, tmp_path / "o", CFG, progress=False)
    assert not (tmp_path / "o").exists()
