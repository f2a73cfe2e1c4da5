"""qins.save / qins.load: safetensors tensors + a versioned JSON plan; never pickle.

A saved directory holds

    model.safetensors   every tensor of the state dict (quantized buffers and float params),
                        each storage once; tied float parameters are listed in qins.json
    config.json         the HF model config, with quantization_config = the qins plan, so
                        transformers' from_pretrained finds the qins quantizer
    qins.json           {"format_version", "qins_version", "modules": plan, "tied": {...},
                         "source": {"path", "sha256"} of the float checkpoint it was made from
                         (metrics.models.fingerprint), or null for a model built in memory,
                         "checksums": {"algorithm": "xxh3_64", "tensors": {name: hex digest
                         of the tensor's bytes}}}
    tokenizer files     when a tokenizer is given

`load` also reads a directory written by transformers' `save_pretrained` of a qins model
(no qins.json: the plan is config.json's quantization_config, ties are transformers').

`load` verifies every tensor against its recorded checksum (verify=False skips it, for trusted
storage); a directory saved before checksums existed (no "checksums" in qins.json) loads
unverified, as before.

Writes are atomic: everything goes to a temporary sibling directory that replaces `path`
only once complete, so an interrupted save leaves the previous state intact.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from .._files import atomic_write, replace_dir, temp_dir_beside
from ..codec.config import FORMAT_VERSION
from ..metrics.models import SOURCE_ATTR, fingerprint, model_source, resolve_device
from .placement import dispatch
from .plan import PLAN_ATTR, PLAN_NAME, read_plan
from .quantize import record_plan
from .skeleton import check_materialised, params_on_meta
from .swap import modules_from_plan

WEIGHTS_NAME = "model.safetensors"
CHECKSUM = "xxh3_64"


def tensor_checksum(t: torch.Tensor) -> str:
    """xxh3_64 hex digest of a CPU tensor's bytes (row-major)."""
    import xxhash

    t = t.detach().cpu().contiguous()
    return xxhash.xxh3_64_hexdigest(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")


def verify_checksums(state: dict[str, torch.Tensor], doc: dict, where: str) -> None:
    """Raise ValueError naming the first tensor whose bytes differ from qins.json's checksum."""
    sums = doc.get("checksums")
    if sums is None:
        return                                         # saved before checksums existed
    if not isinstance(sums, dict) or sums.get("algorithm") != CHECKSUM or not isinstance(sums.get("tensors"), dict):
        raise ValueError(f"{where}: qins.json field 'checksums' is not a {CHECKSUM} table")
    for name, digest in sums["tensors"].items():
        if name not in state:
            raise ValueError(f"{where}: tensor {name} is missing")
        if tensor_checksum(state[name]) != digest:
            raise ValueError(f"{where}: tensor {name} is corrupt ({CHECKSUM} checksum mismatch); "
                             f"load with verify=False only if the storage is trusted")


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

    path = Path(path)
    plan = getattr(model, PLAN_ATTR, None)
    if plan is None:
        raise ValueError("model has no qins plan: call qins.quantize(model, ...) before qins.save")
    tmp = temp_dir_beside(path)
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
               "modules": plan["modules"], "tied": tied, "source": model_source(model),
               "checksums": {"algorithm": CHECKSUM,
                             "tensors": {k: tensor_checksum(t) for k, t in tensors.items()}}}
        if plan.get("allocation"):
            doc["allocation"] = plan["allocation"]
        atomic_write(tmp / PLAN_NAME, json.dumps(doc, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def reference_checkpoint(path: str | os.PathLike, reference: str | os.PathLike | None = None) -> str:
    """The float checkpoint to compare the model saved at `path` against.

    Without `reference`: the source recorded in its qins.json, if it still exists with the
    recorded content (sha256 of its config and weight files). With one: `reference`, unless
    the recorded source's hash says it is another checkpoint. Raises ValueError otherwise, so
    a model is never measured against a model it was not made from (models that share a
    vocabulary give a plausible KL that means nothing).
    """
    source = read_plan(path).get("source")
    if reference is not None:
        if source and source.get("sha256") and Path(reference).exists() \
                and fingerprint(reference) != source["sha256"]:
            raise ValueError(f"--reference {reference} is not the checkpoint {path} was made from (recorded: "
                             f"{source['path']}, sha256 {source['sha256'][:12]}...); compare against that one")
        return str(reference)
    if not source:
        raise ValueError(f"{path}/qins.json records no source model (saved by an older qins or from a model "
                         f"built in memory): give --reference")
    if not Path(source["path"]).exists():
        raise ValueError(f"{path} was made from {source['path']}, which no longer exists: give --reference")
    if source.get("sha256") and fingerprint(source["path"]) != source["sha256"]:
        raise ValueError(f"{source['path']} changed since {path} was made from it (content hash differs): "
                         f"give --reference")
    return source["path"]


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def load(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
         device_map=None, max_memory: dict | None = None, verify: bool = True,
         state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Load a directory written by `qins.save` (no pickle; version-checked) onto `device`.

    `device_map` ("auto", "balanced", ... or {module prefix: device}) places the layers across
    devices with accelerate instead (weights/placement.py); a map that splits a QINS module
    is refused, naming the module. `device` is then ignored.

    verify  check every tensor against the checksums recorded at save (xxh3_64: measured
            0.05 s for the 78 MB default model); False for trusted storage
    state   the tensors, already read (the .qins archive decodes them itself); then the
            directory needs no model.safetensors

    The model is built with its parameters on the meta device (`skeleton.params_on_meta`) and
    filled from the file by `load_state_dict(assign=True)`: no float weight of a quantized
    layer is allocated (measured on the default model, 8-bit with its embedding: peak RSS
    growth 256 MB against 846 MB when the float model was built first).
    """
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    device = resolve_device(device)
    path = Path(path)
    doc = read_plan(path)
    wfile = path / WEIGHTS_NAME
    if state is None and not wfile.is_file():
        raise FileNotFoundError(f"{wfile} is missing")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config                 # build the float skeleton, then swap
    # parameters on meta (never allocated), buffers real (see skeleton.py); QINS modules on
    # meta too: their zero codes would only be replaced
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.device("meta"):
        modules_from_plan(model, doc["modules"])
    if state is None:
        try:
            state = load_file(str(wfile))
        except Exception as e:                         # safetensors raises its own error types
            raise ValueError(f"{wfile}: cannot read the tensors ({e}); the file is corrupt or truncated") from e
    else:
        state = dict(state)
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
    if verify:
        verify_checksums(state, doc, str(wfile))
    cast: dict[int, torch.Tensor] = {}                 # by id: tied entries stay one tensor
    for k, t in state.items():
        e = expected[k]
        # assign=True keeps the file's dtype: float parameters take `dtype`; stored formats
        # (float16 scales, float32 curvature) keep theirs, as a copy into the skeleton would
        if id(t) not in cast:
            cast[id(t)] = t.to(e.dtype)
        state[k] = cast[id(t)]
    model.load_state_dict(state, strict=True, assign=True)
    record_plan(model, doc["modules"])                 # first: forgets ties of quantized modules
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    check_materialised(model, str(wfile))
    setattr(model, SOURCE_ATTR, doc.get("source"))    # a re-save keeps the original source
    if device_map is not None:
        dispatch(model, device_map, max_memory)
    else:
        model.to(device)
    model.eval()
    return model
