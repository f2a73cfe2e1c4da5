"""Settings and tiny models shared by every test folder.

The tiny models are random and built offline from their configs: a Llama (GQA, tied or
untied head), a Qwen2 (q/k/v biases, a sliding window on one layer), a Mistral (GQA +
sliding window) and a GPT-2 (transformers' Conv1D, weights stored transposed). They stand
in for "any causal LM" in the weights, serialization and CLI tests; the real default model
only appears in test_end_to_end.py (marked slow).
"""
from __future__ import annotations

import os

import pytest
import torch

# Triton decides when triton.language and each @triton.jit function are defined whether they run
# in its interpreter (the kernel tests' CPU path). Any test module that imports transformers
# imports triton.language, so the switch is set here, before any test module is collected:
# set in tests/kernels/conftest.py alone, a collected module (tests/entropy/test_kvpark.py)
# imported triton.language first and every interpreter kernel test failed with "Cannot call
# @triton.jit'd outside of the scope of a kernel" (tl.max was a plain JITFunction).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a machine without CUDA the suite runs with QINS_KERNELS=reference unless the environment
# says otherwise: many tests assert that a quantized module's output is bit-identical to F.linear
# over the reference decode, which is what `auto` meant on the CPU before the CPU fast path.
# The fast path is checked against the reference, with its stated tolerance, in
# tests/kernels/test_cpu.py (those tests set the backend themselves); `QINS_KERNELS=auto make
# test` runs the whole suite through it instead.
if not torch.cuda.is_available():
    os.environ.setdefault("QINS_KERNELS", "reference")

VOCAB = 128
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Most tests run tiny matmuls (<= 128 x 128): threads buy nothing, and on a busy 2-core
    # machine OpenMP spin-waits make them many times slower (measured: one 4-bit qins fit of
    # (64, 576) took 7.5 s with 2 threads against 0.17 s with 1 while another process held a core).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="module")
def _real_model_threads(request):
    # Modules marked slow run the real 135M model on 512-token windows: there every core pays
    # (measured: tests/test_end_to_end.py took 360 s with 1 thread on this 2-core machine).
    # Module scope, so module-scoped fixtures (a Harness) are built with these threads too.
    marks = getattr(request.module, "pytestmark", [])
    marked = any(m.name == "slow" for m in (marks if isinstance(marks, list) else [marks]))
    if not marked:
        yield
        return
    # Under pytest-xdist (`make test` runs -n auto --dist loadfile) the cores are shared by the
    # workers: one thread each, or OpenMP spin-waits oversubscribe the machine
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // workers)))
    yield
    torch.set_num_threads(before)


def _slow_rank(module) -> int:
    """0: the whole module is marked slow, 1: some test in it is, 2: none."""
    marks = getattr(module, "pytestmark", [])
    if any(m.name == "slow" for m in (marks if isinstance(marks, list) else [marks])):
        return 0
    return 1 if any(m.name == "slow" for f in vars(module).values()
                    for m in getattr(f, "pytestmark", [])) else 2


def pytest_collection_modifyitems(config, items):
    # The modules that load the real default model run first (a stable sort keeps every other
    # order): under `make test` (pytest-xdist, --dist loadfile --no-loadscope-reorder) a worker
    # takes test_end_to_end.py (~400 s on 2 cores) at the start while the others share the rest,
    # instead of picking it up three quarters of the way through.
    rank = {}
    items.sort(key=lambda it: rank.setdefault(it.module, _slow_rank(it.module)) if it.module else 2)


def tiny_llama(tie: bool = True, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    # initializer_range 0.2: at the default 0.02 a random tied head just predicts its input
    # token, and every quantized variant agrees with the float one trivially
    cfg = LlamaConfig(**SMALL, tie_word_embeddings=tie, initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(tie: bool = True, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    cfg = Qwen2Config(**SMALL, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                      tie_word_embeddings=tie, initializer_range=0.2)
    return Qwen2ForCausalLM(cfg).eval()


def tiny_mistral(tie: bool = False, seed: int = 0):
    from transformers import MistralConfig, MistralForCausalLM
    torch.manual_seed(seed)
    cfg = MistralConfig(**SMALL, sliding_window=8, tie_word_embeddings=tie, initializer_range=0.2)
    return MistralForCausalLM(cfg).eval()


def tiny_gpt2(tie: bool = True, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                     tie_word_embeddings=tie, initializer_range=0.2,
                     bos_token_id=VOCAB - 1, eos_token_id=VOCAB - 1)   # GPT-2's 50256 is out of range
    return GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "mistral": tiny_mistral, "gpt2": tiny_gpt2}


@pytest.fixture(scope="session")
def make_model():
    """make_model(arch="llama", tie=True, seed=0) -> a fresh tiny random causal LM in eval mode."""
    def make(arch: str = "llama", tie: bool = True, seed: int = 0):
        return MODELS[arch](tie=tie, seed=seed)
    return make


@pytest.fixture(scope="session")
def token_ids():
    """(2, 24) int64 random token ids, fixed."""
    return torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
