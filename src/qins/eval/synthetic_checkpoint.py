"""A synthetic Phi-3.5-mini checkpoint on disk: the real shapes, random weights, any size.

`write_checkpoint(out, config)` writes a Hugging Face checkpoint directory (config.json,
model-0000i-of-0000N.safetensors, model.safetensors.index.json) one tensor at a time, so a
3.8B-parameter model is made with the memory of its largest tensor (the 32064 x 3072
embedding, or a 16384 x 3072 gate_up_proj: 200 MB in float32 while drawn).

Weights (float32 draws, stored in the config's dtype):

    Linear (O, I)     normal, std = factor / sqrt(I); factor varies smoothly over depth
                      (0.6 .. 1.4) and is halved for o_proj / down_proj (residual outputs);
                      a fraction `outlier_fraction` of entries is replaced by Student-t
                      (3 degrees of freedom) draws of 8x that std: heavy tails as in
                      trained LLM weights
    embeddings        normal, std 0.02, same outliers
    norms             1 + normal(0, 0.05)

Every tensor has its own generator seeded from (seed, tensor index): the content does not
depend on shard size.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .._files import atomic_write
from ..weights.stream import TensorSpec, write_safetensors


def phi35_mini_config(layers: int | None = None, hidden: int | None = None, intermediate: int | None = None,
                      heads: int | None = None, vocab: int | None = None):
    """transformers Phi3Config of microsoft/Phi-3.5-mini-instruct (bf16, untied lm_head), shrinkable.

    The longrope rope_scaling factors of the released model are not reproduced (no hub here);
    they change no tensor shape. Shrinking: hidden must be a multiple of heads.
    """
    from transformers import Phi3Config
    heads = heads or (32 if hidden is None else max(1, hidden // 96))
    kw = dict(vocab_size=vocab or 32064, hidden_size=hidden or 3072, intermediate_size=intermediate or 8192,
              num_hidden_layers=32 if layers is None else layers, num_attention_heads=heads,
              num_key_value_heads=heads, hidden_act="silu", max_position_embeddings=131072,
              original_max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=32000,
              pad_token_id=32000, sliding_window=262144, tie_word_embeddings=False,
              attention_dropout=0.0, embd_pdrop=0.0, resid_pdrop=0.0, initializer_range=0.02)
    if kw["vocab_size"] <= 32000:                      # a shrunk vocabulary keeps its special ids inside
        kw.update(eos_token_id=kw["vocab_size"] - 1, pad_token_id=kw["vocab_size"] - 1)
    if hidden is not None and intermediate is None:
        kw["intermediate_size"] = 8 * hidden // 3 // 32 * 32 or 32
    config = Phi3Config(**kw)
    config.architectures = ["Phi3ForCausalLM"]
    config.dtype = torch.bfloat16
    return config


def expected_tensors(config) -> list[TensorSpec]:
    """Names, shapes (state-dict order) of the model's saved tensors, from Phi3ForCausalLM on
    the meta device, in the config's dtype; tied parameters once."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, config.dtype)
    specs, seen = [], set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            continue
        seen.add(id(t))
        specs.append(TensorSpec(name, dtype if t.is_floating_point() else t.dtype, tuple(t.shape)))
    return specs


def _factor(name: str, layers: int) -> float:
    parts = name.split(".")
    depth = int(parts[parts.index("layers") + 1]) / max(1, layers - 1) if "layers" in parts else 0.5
    f = 0.6 + 0.8 * (0.5 - 0.5 * math.cos(math.pi * depth))
    return f * (0.5 if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0)


def synthetic_tensor(spec: TensorSpec, index: int, layers: int, seed: int = 0,
                     outlier_fraction: float = 1e-3) -> torch.Tensor:
    """The random tensor for `spec` (see the module docstring), in spec.dtype."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    if len(spec.shape) == 1:
        return (1 + 0.05 * torch.randn(spec.shape, generator=g)).to(spec.dtype)
    if "embed" in spec.name:
        std = 0.02
    else:
        std = _factor(spec.name, layers) / math.sqrt(spec.shape[-1])
    w = torch.randn(spec.shape, generator=g).mul_(std)
    n = int(w.numel() * outlier_fraction)
    if n:
        idx = torch.randint(0, w.numel(), (n,), generator=g)
        # Student-t(3) = normal / sqrt(chi2_3 / 3); chi2_3 = sum of 3 squared normals
        chi = torch.randn(n, 3, generator=g).pow_(2).sum(1).div_(3).sqrt_()
        w.view(-1)[idx] = torch.randn(n, generator=g).div_(chi).mul_(8 * std)
    return w.to(spec.dtype)


def write_checkpoint(out: str | os.PathLike, config, seed: int = 0, shard_bytes: int = 2 * 10**9,
                     progress: bool = True) -> Path:
    """Write the synthetic checkpoint of `config` to directory `out` (sharded safetensors)."""
    from tqdm.auto import tqdm

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    specs = expected_tensors(config)
    index = {s.name: i for i, s in enumerate(specs)}
    shards, cur, size = [], [], 0
    for s in specs:                                    # transformers' rule: cut before overflow
        if cur and size + s.nbytes > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(s)
        size += s.nbytes
    shards.append(cur)
    layers = config.num_hidden_layers
    weight_map = {}
    total = sum(s.nbytes for s in specs)
    with tqdm(total=total, unit="B", unit_scale=True, desc="synthetic checkpoint", disable=not progress) as bar:
        for k, shard in enumerate(shards):
            fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            by_name = {s.name: s for s in shard}

            def produce(name, by_name=by_name):
                t = synthetic_tensor(by_name[name], index[name], layers, seed)
                bar.update(by_name[name].nbytes)
                return t
            write_safetensors(out / fname, shard, produce, metadata={"format": "pt"})
            weight_map.update({s.name: fname for s in shard})
    atomic_write(out / "model.safetensors.index.json",
                 json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))
    config.save_pretrained(out)
    return out
