"""qins.save / qins.load: safetensors tensors + a versioned JSON plan; never pickle.

A saved directory holds

    model.safetensors   every tensor of the state dict (quantized buffers and float params),
                        each storage once; tied float parameters are listed in qins.json
    config.json         the HF model config, with quantization_config = the qins plan, so
                        transformers' from_pretrained finds the qins quantizer
    qins.json           {"format_version", "qins_version", "modules": plan, "tied": {...}}
    tokenizer files     when a tokenizer is given

`load` also reads a directory written by transformers' `save_pretrained` of a qins model
(no qins.json: the plan is config.json's quantization_config, ties are transformers').

Writes are atomic: everything goes to a temporary sibling directory that replaces `path`
only once complete, so an interrupted save leaves the previous state intact.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..config import FORMAT_VERSION, WeightConfig
from .linear import QINSEmbedding, QINSLinear
from .quantize import PLAN_ATTR, record_plan, replace_module

WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "qins.json"


def _state_dict_once(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """State dict with each storage once; {dropped name: kept name} for shared ones."""
    tensors, tied, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        tensors[name] = t.detach().cpu().contiguous()
    return tensors, tied


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None) -> Path:
    """Save a (quantized) model to directory `path`, atomically."""
    from safetensors.torch import save_file
    from .. import __version__

    path = Path(path)
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("model has no qins plan: call qins.quantize(model, ...) before qins.save")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tensors, tied = _state_dict_once(model)
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "qins_format_version": str(FORMAT_VERSION)})
        record_plan(model, plan["modules"])            # config.quantization_config = the plan
        if getattr(model.config, "dtype", None) is None:
            # from_pretrained's dtype="auto" reads it; else it takes the first float tensor of
            # the file, which may be a float16 `scales`
            model.config.dtype = _float_dtype(model)
        model.config.save_pretrained(tmp)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        doc = {"format_version": FORMAT_VERSION, "qins_version": __version__,
               "modules": plan["modules"], "tied": tied}
        if plan.get("allocation"):
            doc["allocation"] = plan["allocation"]
        (tmp / PLAN_NAME).write_text(json.dumps(doc, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _replace_dir(new: Path, dest: Path) -> None:
    """Move a complete directory into place; the old one is removed only after the swap."""
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory")
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        if old is not None:
            os.replace(old, dest)                      # put the previous save back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_plan(path: str | os.PathLike) -> dict:
    """The qins.json of a saved directory, version-checked."""
    path = Path(path)
    f = path / PLAN_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"no saved qins model at {path} (not a directory)")
    if not f.is_file():
        return _plan_from_hf_config(path)
    try:
        doc = json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the save is corrupt") from e
    check_version(doc.get("format_version"), str(f))
    return doc


def _plan_from_hf_config(path: Path) -> dict:
    """The plan of a directory written by transformers' save_pretrained of a qins model."""
    cfg_file = path / "config.json"
    qc = None
    if cfg_file.is_file():
        try:
            qc = json.loads(cfg_file.read_text()).get("quantization_config")
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file} is not valid JSON ({e}); the save is corrupt") from e
    if not (isinstance(qc, dict) and qc.get("quant_method") == "qins"):
        raise FileNotFoundError(f"{path / PLAN_NAME} is missing and {cfg_file} has no qins "
                                f"quantization_config: not a directory written by qins")
    check_version(qc.get("format_version"), f"{cfg_file} (quantization_config)")
    return {"format_version": qc["format_version"], "modules": qc.get("modules", {}), "tied": None}


def check_version(version, where: str) -> None:
    if not isinstance(version, int):
        raise ValueError(f"{where}: missing or invalid format_version")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} uses qins format version {version}; this qins reads up to "
            f"{FORMAT_VERSION}. Upgrade qins to load it.")


def replace_modules(model: nn.Module, modules: dict) -> None:
    """Swap in empty QINS modules following a saved plan (before loading the tensors)."""
    embeddings: dict[str, QINSEmbedding] = {}
    order = sorted(modules.items(), key=lambda kv: kv[1]["kind"] == "tied_linear")
    for name, entry in order:
        try:
            mod = model.get_submodule(name)
        except AttributeError as e:
            raise ValueError(f"saved plan names module {name!r}, which this model does not have") from e
        kind = entry["kind"]
        if kind == "embedding":
            new = QINSEmbedding(mod.num_embeddings, mod.embedding_dim, WeightConfig.from_dict(entry["config"]),
                                padding_idx=getattr(mod, "padding_idx", None), dtype=mod.weight.dtype)
            # scalar_embed_scale: Gemma's python float; embed_scale may be a buffer on the meta
            # device while from_pretrained builds the model
            embed_scale = getattr(mod, "scalar_embed_scale", getattr(mod, "embed_scale", None))
            if embed_scale is not None:
                new.scale_output = float(embed_scale)
            embeddings[name] = new
        elif kind in ("linear", "tied_linear"):
            w = mod.weight
            conv1d = type(mod).__name__ == "Conv1D"
            out_f, in_f = (w.shape[1], w.shape[0]) if conv1d else (w.shape[0], w.shape[1])
            bias = getattr(mod, "bias", None) is not None
            if kind == "tied_linear":
                new = QINSLinear(in_f, out_f, bias, None, tied_to=embeddings[entry["tied_to"]], dtype=w.dtype)
            else:
                new = QINSLinear(in_f, out_f, bias, WeightConfig.from_dict(entry["config"]), dtype=w.dtype)
        else:
            raise ValueError(f"unknown module kind {kind!r} for {name} in the saved plan")
        replace_module(model, name, new)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a directory written by `qins.save` (no pickle; version-checked)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    doc = read_plan(path)
    wfile = path / WEIGHTS_NAME
    if not wfile.is_file():
        raise FileNotFoundError(f"{wfile} is missing")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config                 # build the float skeleton, then swap
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    replace_modules(model, doc["modules"])
    try:
        state = load_file(str(wfile))
    except Exception as e:                             # safetensors raises its own error types
        raise ValueError(f"{wfile}: cannot read the tensors ({e}); the file is corrupt or truncated") from e
    tied = doc.get("tied")
    if tied is None:       # save_pretrained: transformers dropped its tied float copies itself
        tied = {t: s for t, s in getattr(model, "all_tied_weights_keys", {}).items()
                if t not in state and s in state}
    for dropped, kept in tied.items():
        if kept not in state:
            raise ValueError(f"{wfile}: tied tensor {kept} is missing")
        state[dropped] = state[kept]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{wfile} does not match the saved plan: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in state.items():
        e = expected[k]
        if t.shape != e.shape or (not e.is_floating_point() and t.dtype != e.dtype):
            raise ValueError(f"{wfile}: tensor {k} is {tuple(t.shape)} {t.dtype}, expected {tuple(e.shape)} {e.dtype}")
    model.load_state_dict(state, strict=True)
    record_plan(model, doc["modules"])                 # first: forgets ties of quantized modules
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    model.to(device)
    model.eval()
    return model
