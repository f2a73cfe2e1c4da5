"""`qins eval DIR` compares against the checkpoint DIR was made from, or refuses.

`qins compress` (qins.save) records the source model's path and content hash in qins.json;
`qins eval` uses it when --reference is absent, refuses a --reference with other content,
and refuses when the source is gone, changed, or unrecorded, or when DIR is itself a float
model (it would be compared with itself). The tiny models share one vocabulary, so a wrong
reference would give plausible numbers: only the recorded identity can catch it.
"""
from __future__ import annotations

import json
import shutil

import pytest
from tests.test_cli import tiny_tokenizer

import qins
from qins.cli import main
from qins.metrics.models import SOURCE_ATTR, fingerprint

EVAL = ["--windows", "1", "--prompts", "0"]


def _float_dir(path, make_model, seed: int):
    model = make_model("llama", tie=True, seed=seed)
    model.save_pretrained(path)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory, make_model):
    root = tmp_path_factory.mktemp("reference")
    src = _float_dir(root / "float", make_model, seed=0)
    other = _float_dir(root / "other", make_model, seed=1)              # same shapes and vocabulary
    text = root / "text.txt"
    text.write_text(" ".join(["user", "assistant", "a", "b", "c", "et", "ta"] * 300))
    out = root / "q8"
    assert main(["compress", str(src), "-o", str(out), "--bits", "8", "--group-size", "32"]) == 0
    return src, other, text, out


def _eval(args, tmp_path):
    js = tmp_path / "eval.json"
    rc = main(["eval", *map(str, args), *EVAL, "--json", str(js)])
    return rc, (json.loads(js.read_text()) if rc == 0 else None)


def test_compress_records_the_source_path_and_hash(dirs):
    src, _, _, out = dirs
    source = json.loads((out / "qins.json").read_text())["source"]
    assert source == {"path": str(src.resolve()), "sha256": fingerprint(src)}
    assert len(source["sha256"]) == 64
    # a reload keeps it, so a re-save records the original float model, not the qins dir
    assert getattr(qins.load(out), SOURCE_ATTR) == source


def test_fingerprint_follows_content_not_names(dirs, tmp_path):
    src, other, _, _ = dirs
    copy = shutil.copytree(src, tmp_path / "copy")
    assert fingerprint(copy) == fingerprint(src)                   # same files, another place
    assert fingerprint(other) != fingerprint(src)                  # same config, other weights


def test_eval_without_reference_uses_the_recorded_source(dirs, tmp_path):
    src, _, text, out = dirs
    rc, doc = _eval([out, "--text", text], tmp_path)
    assert rc == 0 and doc["meta"]["reference"] == str(src.resolve())
    rc, explicit = _eval([out, "--text", text, "--reference", src], tmp_path)
    assert rc == 0
    # the same reference either way: identical numbers (the run is deterministic)
    assert doc["rows"][0]["kl"] == explicit["rows"][0]["kl"] > 0.0


def test_eval_refuses_a_reference_of_other_content(dirs, tmp_path, capsys):
    _, other, text, out = dirs
    rc, _ = _eval([out, "--text", text, "--reference", other], tmp_path)
    assert rc == 2 and "is not the checkpoint" in capsys.readouterr().err


def test_eval_refuses_when_the_source_is_gone_or_changed(dirs, tmp_path, capsys):
    src, _, text, out = dirs
    moved = shutil.copytree(out, tmp_path / "q8")
    doc = json.loads((moved / "qins.json").read_text())
    doc["source"]["path"] = str(tmp_path / "nowhere")
    (moved / "qins.json").write_text(json.dumps(doc))
    rc, _ = _eval([moved, "--text", text], tmp_path)
    assert rc == 2 and "no longer exists" in capsys.readouterr().err

    changed = shutil.copytree(src, tmp_path / "changed")
    (changed / "config.json").write_text((changed / "config.json").read_text().replace("{", "{\"x\": 1,", 1))
    doc["source"]["path"] = str(changed)
    (moved / "qins.json").write_text(json.dumps(doc))
    rc, _ = _eval([moved, "--text", text], tmp_path)
    assert rc == 2 and "changed since" in capsys.readouterr().err


def test_eval_refuses_an_unrecorded_source_and_a_float_model(dirs, tmp_path, capsys):
    src, _, text, out = dirs
    old = shutil.copytree(out, tmp_path / "old")
    doc = json.loads((old / "qins.json").read_text())
    doc.pop("source")                                              # as written by an older qins
    (old / "qins.json").write_text(json.dumps(doc))
    rc, _ = _eval([old, "--text", text], tmp_path)
    assert rc == 2 and "records no source model" in capsys.readouterr().err
    rc, _ = _eval([src, "--text", text], tmp_path)
    assert rc == 2 and "compared with itself" in capsys.readouterr().err


def test_eval_needs_a_model_unless_it_measures_the_kv_cache(capsys):
    assert main(["eval"]) == 2                           # the embedded model against itself: refused
    assert "give the model to evaluate" in capsys.readouterr().err
