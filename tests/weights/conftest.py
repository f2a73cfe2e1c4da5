"""Tiny checkpoints on disk shared by the streaming, sequential-GPTQ and quantize-on-load tests."""
from __future__ import annotations

import pytest
import torch

from qins.eval.synthetic_checkpoint import phi35_mini_config, write_checkpoint


@pytest.fixture(scope="module")
def phi3_dir(tmp_path_factory):
    """A 2-layer Phi-3 (hidden 192, vocab 500) in 10 source shards."""
    d = tmp_path_factory.mktemp("phi3") / "src"
    write_checkpoint(d, phi35_mini_config(layers=2, hidden=192, vocab=500), seed=1, shard_bytes=200_000,
                     progress=False)
    return d


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama with tied embeddings, one model.safetensors (save_pretrained)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    d = tmp_path_factory.mktemp("llama") / "src"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny GPT-2 (Conv1D layers, weights stored (in, out)) in float32."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=300, n_positions=64, n_embd=64, n_layer=2, n_head=4)
    d = tmp_path_factory.mktemp("gpt2") / "src"
    GPT2LMHeadModel(cfg).save_pretrained(d)
    return d
