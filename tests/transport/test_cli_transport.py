"""`qins transport` end to end on a tiny float model directory, and the fence around transport.

The directory holds a random Llama (tests/conftest.py) and a word-level tokenizer with a chat
template; the text has 2,600 words of its vocabulary = 5 windows of 512 tokens (3 for
calibration from the start, 1 for evaluation from the end, disjoint).
"""
from __future__ import annotations

import itertools
import json
import os
import pathlib
import string
import subprocess
import sys

import pytest
import torch

from qins.cli import main

SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]


def vocab(size):
    words = ["user", "assistant", ".", ","] + list(string.ascii_lowercase)
    words += ["".join(p) for p in itertools.product("etaoinshrd", repeat=2)]
    return {w: i for i, w in enumerate((SPECIALS + words)[:size])}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, make_model):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("transport")
    model = make_model("llama")
    tk = Tokenizer(models.WordLevel(vocab(128), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>",
                                  bos_token="<|im_start|>", eos_token="<|im_end|>")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    model.config.update(dict(bos_token_id=2, eos_token_id=3, pad_token_id=1))
    model.generation_config.update(bos_token_id=2, eos_token_id=3, pad_token_id=1)
    model.save_pretrained(path / "model")
    tok.save_pretrained(path / "model")
    words = [w for w in vocab(128) if w not in SPECIALS]
    picks = torch.randint(0, len(words), (2600,), generator=torch.Generator().manual_seed(0)).tolist()
    (path / "text.txt").write_text(" ".join(words[i] for i in picks))
    return path


def test_transport_command_measures_every_row(model_dir, capsys):
    js = model_dir / "gates.json"
    rc = main(["transport", str(model_dir / "model"), "--text", str(model_dir / "text.txt"), "--windows", "1",
               "--prompts", "2", "--new-tokens", "4", "--stage", "v-one", "all", "--variant", "seed", "first-order",
               "--json", str(js)])
    assert rc == 0
    doc = json.loads(js.read_text())
    assert doc["meta"]["pattern_a"]["decode_ops"] == 14 and doc["meta"]["v_one_layer"] == 1
    assert doc["meta"]["held_out_layer_errors"] == "calibration window 2 (512 tokens)"
    rows = doc["rows"]
    assert [(r["stage"], r["variant"]) for r in rows] == [("v-one", "seed"), ("all", "seed"),
                                                         ("v-one", "first-order"), ("all", "first-order")]
    for r in rows:
        assert r["windows"] == 1 and r["sequences"] == 2 and 0.0 <= r["match"] <= 1.0
        assert r["rel_err"] > 0 and r["gate"]["verdict"] in ("pass", "fail")
    assert rows[1]["decode_ops"] == 14 and rows[1]["activation_encodes"] == 6
    assert "Pattern A decode ops 14" in capsys.readouterr().out


def test_transport_error_only_and_bad_options(model_dir, capsys):
    js = model_dir / "err.json"
    rc = main(["transport", str(model_dir / "model"), "--text", str(model_dir / "text.txt"), "--error-only",
               "--stage", "mlp", "--variant", "first-order", "--signs", "ignore", "--alpha", "1", "0.01",
               "--json", str(js)])
    assert rc == 0
    rows = json.loads(js.read_text())["rows"]
    assert [r["alpha"] for r in rows] == [1.0, 0.01] and all(r["signs"] == "ignore" for r in rows)
    assert all(r.get("match") is None and r["gate"]["verdict"] == "incomplete" for r in rows)
    assert main(["transport", str(model_dir / "model"), "--text", str(model_dir / "text.txt"),
                 "--calibration-windows", "1", "--error-only"]) == 2
    assert "calibration_windows >= 2" in capsys.readouterr().err
    assert main(["transport", str(model_dir / "model"), "--text", str(model_dir / "text.txt"),
                 "--layer", "7", "--error-only"]) == 2


def test_default_compression_path_does_not_use_transport():
    # nothing outside qins/transport imports it, except the CLI's `transport` command, lazily
    src = pathlib.Path(__file__).resolve().parents[2] / "src" / "qins"
    for f in src.rglob("*.py"):
        if "transport" in f.relative_to(src).parts:
            continue
        lines = [ln.strip() for ln in f.read_text().splitlines()]
        imports = [ln for ln in lines if ln.startswith(("import ", "from ")) and "transport" in ln]
        if f.name == "cli.py":
            assert imports == ["from .transport import print_gate_table, run_gates"], imports
        else:
            assert not imports, (f, imports)
    code = ("import sys, torch, qins, qins.cli, qins.eval.harness, qins.weights.serialization\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,"
            " num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))\n"
            "qins.quantize(m, qins.WeightConfig('qins', 4, 32), progress=False)\n"
            "m(torch.zeros(1, 4, dtype=torch.long))\n"
            "assert not [k for k in sys.modules if k.startswith('qins.transport')]\n")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
