"""Placing a QINS model across devices with accelerate's device maps (pipeline style).

A QINS module (QINSLinear, QINSEmbedding) is the unit of placement: its codes, scales, offsets,
curvature and bias live on one device, and a tied lm_head reads its embedding's codes, so it
sits where the embedding sits. A fused projection (Phi-3's qkv_proj, gate_up_proj) is one
module, so it is never split either.

    device_map   "auto" | "balanced" | ... (accelerate's strategies) or
                 {module name prefix: device}   device = "cpu", a CUDA index, "cuda:N"

"disk" and "meta" are refused for QINS modules: accelerate offloads parameters, and every
stored tensor of a QINS module is a buffer, which it would leave behind.

QINSCache needs no map: each of its layers allocates its pages on the device of the first
keys it is given (kv/layer.py), which is the device of that layer's attention module.
"""
from __future__ import annotations

from torch import nn

from .linear import QINSEmbedding, QINSLinear

QINS_CLASSES = (QINSLinear, QINSEmbedding)
_OFF_DEVICE = ("disk", "meta")


def qins_module_names(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QINS_CLASSES)}


def _owner(key: str, names) -> str | None:
    """The QINS module that map entry `key` names or lies inside, if any."""
    for n in names:
        if key == n or key.startswith(n + "."):
            return n
    return None


def check_device_map(model: nn.Module, device_map: dict) -> None:
    """Raise, naming the module, if `device_map` splits a QINS module, puts one off device,
    or puts a tied lm_head on another device than its embedding."""
    mods = qins_module_names(model)
    for key, dev in device_map.items():
        owner = _owner(key, mods)
        if owner is not None and key != owner:
            raise ValueError(f"device_map entry {key!r} splits the QINS module {owner!r} "
                             f"({type(mods[owner]).__name__}): map the whole module to one device")
    for name in mods:
        dev = device_for(name, device_map)
        if dev is None:
            raise ValueError(f"device_map places no device for the QINS module {name!r}")
        if str(dev) in _OFF_DEVICE:
            raise ValueError(f"device_map puts the QINS module {name!r} on {dev!r}: its codes are buffers, "
                             f"which accelerate does not offload; map it to a GPU or 'cpu'")
    for name, m in mods.items():
        tied = getattr(m, "tied_to", None)
        if tied is not None:
            emb = next(n for n, e in mods.items() if e is tied)
            if str(device_for(name, device_map)) != str(device_for(emb, device_map)):
                raise ValueError(f"device_map puts the tied QINS lm_head {name!r} on {device_for(name, device_map)!r} "
                                 f"and its embedding {emb!r} on {device_for(emb, device_map)!r}: they share codes, "
                                 f"map them to one device")


def device_for(name: str, device_map: dict):
    """Device of module `name` under `device_map` (longest matching prefix; "" = everything)."""
    best, dev = -1, None
    for key, d in device_map.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best:
            best, dev = len(key), d
    return dev


def check_placement(model: nn.Module) -> None:
    """Raise if any QINS module holds tensors on more than one device (e.g. after a hand move)."""
    for name, m in qins_module_names(model).items():
        devs = {t.device for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t is not None}
        if len(devs) > 1:
            raise ValueError(f"QINS module {name!r} holds tensors on several devices {sorted(map(str, devs))}: "
                             f"a QINS module must live whole on one device")


def resolve_device_map(model: nn.Module, device_map, max_memory: dict | None = None) -> dict:
    """An explicit {prefix: device} map from a strategy name ("auto", ...) or a dict."""
    if isinstance(device_map, str):
        from accelerate.utils import get_balanced_memory, infer_auto_device_map

        no_split = list(getattr(model, "_no_split_modules", None) or []) + [c.__name__ for c in QINS_CLASSES]
        if device_map not in ("auto", "balanced", "balanced_low_0", "sequential"):
            raise ValueError(f"device_map {device_map!r}: use 'auto', 'balanced', 'balanced_low_0', "
                             f"'sequential' or a dict")
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise TypeError(f"device_map must be a strategy name or a dict, not {type(device_map).__name__}")
    check_device_map(model, device_map)
    return device_map


def dispatch(model: nn.Module, device_map, max_memory: dict | None = None) -> nn.Module:
    """Place `model` by `device_map` with accelerate's dispatch_model (hooks move activations
    between devices); returns the model, with `hf_device_map` set."""
    from accelerate import dispatch_model

    device_map = resolve_device_map(model, device_map, max_memory)
    devices = {str(d) for d in device_map.values()}
    if devices <= {"cpu"} or len(devices) == 1:      # one device: a plain move, no hooks needed
        model.to(next(iter(device_map.values())))
        model.hf_device_map = dict(device_map)
    else:
        dispatch_model(model, device_map=device_map)
    check_placement(model)
    return model
