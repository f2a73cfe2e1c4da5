"""Bytes a model's tensors actually hold, by class: codes, metadata, float parameters.

A quantized module (QINSLinear, QINSEmbedding) is recognised by a buffer named `qweight`;
its stored state is

    qweight    int32    bit-packed codes                      -> "codes"
    scales     float16  group scales                          -> "scales"
    offsets    float16  group offsets (optional)              -> "offsets"
    curvature  float32  QINS curvature (optional)             -> "curvature"

Every other parameter is "float_params" and every other buffer (rotary inv_freq, ...)
"other_buffers". Each storage is counted once, so tied weights are not counted twice.

The classes are bytes held in memory. Bits per weight count bytes stored (DESIGN.md): they
differ only for log8 scales (codec/scales.py), held as float16 and stored as a byte per group
plus a float16 per row.
"""
from __future__ import annotations

import torch
from torch import nn

from ..codec.scales import nbytes as log8_nbytes

_QUANT_BUFFERS = {"qweight": "codes", "scales": "scales", "offsets": "offsets", "curvature": "curvature"}
CLASSES = ("codes", "scales", "offsets", "curvature", "float_params", "other_buffers")


def format_bytes(n: float) -> str:
    """`n` bytes in binary units: '512 B', '1.50 KiB', '256.00 MiB'."""
    n = float(n)
    if abs(n) < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}"
    raise AssertionError("unreachable")


def _is_quantized(module: nn.Module) -> bool:
    return "qweight" in module._buffers and module._buffers["qweight"] is not None


def _quantized_numel(name: str, module: nn.Module) -> int:
    """Number of weight elements the quantized module stands for (O*I, or rows*dim)."""
    if hasattr(module, "quantized_numel"):
        return int(module.quantized_numel)
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features) * int(module.out_features)
    if hasattr(module, "num_embeddings") and hasattr(module, "embedding_dim"):
        return int(module.num_embeddings) * int(module.embedding_dim)
    raise ValueError(f"{name} ({type(module).__name__}) has a qweight buffer but no "
                     "in/out_features or num_embeddings/embedding_dim to count its weights")


def _storage_key(t: torch.Tensor):
    s = t.untyped_storage()
    ptr = s.data_ptr()
    # meta and empty tensors all have data_ptr 0: never merge them
    return (t.device, ptr) if ptr else ("id", id(s))


def memory_report(model: nn.Module) -> dict:
    """Bytes held by `model`'s parameters and buffers, each distinct storage counted once.

    Returns
      classes            {class: bytes} over CLASSES (whole storages, in bytes)
      quantized_weights  weight elements held as codes (sum of O*I over quantized modules)
      quantized_bytes    codes + scales + offsets + curvature, held
      quantized_bpw      bits per stored weight of the quantized modules (0 if none): 8 * their
                         stored bytes / quantized_weights
      total_bytes        all classes together, held
      stored_bytes       total_bytes with log8 scales counted as stored
      params             weight elements of the original model: quantized + float parameters
      bpw_all            8 * stored_bytes / params, bits per weight of the whole model
    """
    classes = dict.fromkeys(CLASSES, 0)
    seen: set = set()
    quantized_weights = params = saved = 0      # saved: held - stored bytes of log8 scales

    def add(t: torch.Tensor, cls: str) -> bool:
        key = _storage_key(t)
        if key in seen:
            return False
        seen.add(key)
        classes[cls] += t.untyped_storage().nbytes()
        return True

    for mname, module in model.named_modules(remove_duplicate=False):
        quantized = _is_quantized(module)
        for bname, buf in module._buffers.items():
            if buf is None:
                continue
            cls = _QUANT_BUFFERS.get(bname) if quantized else None
            first = add(buf, cls or "other_buffers")
            if first and bname == "qweight":
                # count the weights once per qweight storage: a tied head shares its codes
                quantized_weights += _quantized_numel(mname, module)
            elif first and cls == "scales" and getattr(getattr(module, "config", None), "scale_dtype", None) == "log8":
                saved += buf.untyped_storage().nbytes() - log8_nbytes(*buf.shape)
        for pname, p in module._parameters.items():
            if p is not None and add(p, "float_params"):
                params += p.numel()

    quantized_bytes = sum(classes[c] for c in _QUANT_BUFFERS.values())
    total = sum(classes.values())
    params += quantized_weights
    return {
        "classes": classes,
        "quantized_weights": quantized_weights,
        "quantized_bytes": quantized_bytes,
        "quantized_bpw": 8 * (quantized_bytes - saved) / quantized_weights if quantized_weights else 0.0,
        "total_bytes": total,
        "stored_bytes": total - saved,
        "params": params,
        "bpw_all": 8 * (total - saved) / params if params else 0.0,
    }


def tensor_bytes(obj, seen=None) -> int:
    """Bytes of every distinct tensor storage reachable from obj (lists, tuples, dicts,
    attributes): the held memory of caches that have no nbytes() (DynamicCache, QuantizedCache)."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen:
            return 0
        seen.add(key)
        return st.nbytes()
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(o, seen) for o in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(o, seen) for o in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, type) and not callable(obj):
        return sum(tensor_bytes(o, seen) for o in vars(obj).values())
    return 0


def cache_nbytes(cache) -> int:
    return cache.nbytes() if hasattr(cache, "nbytes") else tensor_bytes(cache.layers)
