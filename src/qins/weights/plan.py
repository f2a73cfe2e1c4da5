"""The qins plan: which module is stored how, as recorded on a model and in a saved directory.

The schema below save/load and the transformers adapter (no modules, no tensors):

    {"quant_method": "qins", "format_version": int,
     "modules": {module name: {"kind": "linear" | "embedding" | "tied_linear",
                               "config": WeightConfig dict (not for tied_linear),
                               "tied_to": embedding module name (tied_linear only)}}}

A model quantized in memory carries it as the attribute PLAN_ATTR (plus "allocation", how a
mixed plan was chosen); config.json carries it as quantization_config; qins.json carries it
with the saved tensors' ties and the source model (weights/serialization.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..codec.config import FORMAT_VERSION, WeightConfig

PLAN_ATTR = "_qins_plan"
PLAN_NAME = "qins.json"
QUANT_METHOD = "qins"
KINDS = ("linear", "embedding", "tied_linear")


def check_version(version, where: str) -> None:
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"{where}: missing or invalid format_version")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{where} uses qins format version {version}; this qins reads up to "
            f"{FORMAT_VERSION}. Upgrade qins to load it.")


def check_modules(modules: dict, where: str = "qins plan") -> None:
    """Every entry names a known kind with a valid config; a tied head names a planned embedding."""
    if not isinstance(modules, dict):
        raise ValueError(f"{where}: modules must be a mapping, got {type(modules).__name__}")
    for name, entry in modules.items():
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in KINDS:
            raise ValueError(f"{where}: module {name!r} has kind {kind!r}, expected one of {KINDS}")
        if kind == "tied_linear":
            tied_to = entry.get("tied_to")
            if modules.get(tied_to, {}).get("kind") != "embedding":
                raise ValueError(f"{where}: {name!r} is tied to {tied_to!r}, "
                                 f"which is not a quantized embedding of the plan")
        else:
            WeightConfig.from_dict(entry.get("config", {}))      # raises on a bad or newer config


def plan_doc(modules: dict) -> dict:
    """The {"quant_method", "format_version", "modules"} document of a plan."""
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "modules": modules}


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


def _hf_qins_config(path: Path) -> dict | None:
    """config.json's quantization_config when it is a qins plan (save_pretrained of a qins
    model), else None; a config.json that is not JSON is a ValueError."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        return None
    try:
        qc = json.loads(cfg_file.read_text()).get("quantization_config")
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON ({e}); the save is corrupt") from e
    return qc if isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD else None


def is_saved_model(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory written by qins.save or by save_pretrained of a qins model
    (a float checkpoint, or anything unreadable, is not)."""
    path = Path(path)
    if (path / PLAN_NAME).is_file():
        return True
    try:
        return path.is_dir() and _hf_qins_config(path) is not None
    except ValueError:
        return False


def _plan_from_hf_config(path: Path) -> dict:
    """The plan of a directory written by transformers' save_pretrained of a qins model."""
    qc = _hf_qins_config(path)
    if qc is None:
        raise FileNotFoundError(f"{path / PLAN_NAME} is missing and {path / 'config.json'} has no qins "
                                f"quantization_config: not a directory written by qins")
    check_version(qc.get("format_version"), f"{path / 'config.json'} (quantization_config)")
    return {"format_version": qc["format_version"], "modules": qc.get("modules", {}), "tied": None}
