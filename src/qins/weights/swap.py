"""Module swaps: put a module at a dotted path, and build empty QINS modules from a plan.

`modules_from_plan` turns a float skeleton (real, or on the meta device inside transformers'
from_pretrained) into one whose quantized modules hold zero codes of the planned shapes,
ready to receive the saved tensors by name.
"""
from __future__ import annotations

from torch import nn

from ..codec.config import WeightConfig
from .linear import QINSEmbedding, QINSLinear


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` at dotted path `name`; returns the module it replaced."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def modules_from_plan(model: nn.Module, modules: dict) -> None:
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
