"""Which modules `qins.quantize` replaces, and with which config: one selection shared by the
in-memory quantizer, streaming compression and quantize-while-loading (all work on a meta
skeleton too). No tensors are touched.
"""
from __future__ import annotations

import fnmatch
from typing import Mapping

from torch import nn

from ..codec.config import WeightConfig
from .linear import is_linear_like


def _matches(name: str, pattern: str) -> bool:
    return name == pattern or fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, f"*.{pattern}")


def _resolve(name: str, config: WeightConfig, overrides: Mapping[str, WeightConfig | dict] | None) -> WeightConfig:
    for pattern, cfg in (overrides or {}).items():
        if _matches(name, pattern):
            return cfg if isinstance(cfg, WeightConfig) else config.replace(**cfg)
    return config


def _embedding_name(model: nn.Module, getter: str) -> str | None:
    """Qualified name of the module transformers' get_input/output_embeddings returns."""
    get = getattr(model, getter, None)
    mod = get() if get is not None else None
    if mod is None:
        return None
    return next((n for n, m in model.named_modules() if m is mod), None)


def select_targets(model: nn.Module, skip=(), include_embeddings: bool = False
                   ) -> tuple[list[tuple[str, nn.Module]], str | None, str | None]:
    """(targets, input embedding name, output embedding name): the modules `quantize` replaces,
    the input embedding first so that a tied lm_head can point at it. Works on a meta skeleton."""
    out_name = _embedding_name(model, "get_output_embeddings")
    in_name = _embedding_name(model, "get_input_embeddings")
    targets: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if any(_matches(name, p) for p in skip):
            continue
        if is_linear_like(mod) and (name != out_name or include_embeddings):
            targets.append((name, mod))
        elif include_embeddings and name == in_name and isinstance(mod, nn.Embedding):
            targets.append((name, mod))
    targets.sort(key=lambda t: t[0] != in_name)
    return targets, in_name, out_name


def _tied_output(model: nn.Module, in_name: str | None, out_name: str | None) -> bool:
    if in_name is None or out_name is None:
        return False
    a = getattr(model.get_submodule(in_name), "weight", None)
    b = getattr(model.get_submodule(out_name), "weight", None)
    if a is None or b is None:            # one of them already quantized: codes, no float tie
        return False
    # meta tensors (a skeleton) all have data_ptr 0: only identity says they are tied
    return a is b or (not a.is_meta and a.data_ptr() == b.data_ptr())


def plan_modules(model: nn.Module, config: WeightConfig, skip=(), overrides=None,
                 include_embeddings: bool = False, embeddings: WeightConfig | None = None) -> dict:
    """The plan `qins.quantize` would record for `model` (a skeleton, e.g. on the meta device).

    An input embedding planned with rounding="gptq" is rounded to nearest, as `qins.quantize`
    does for one without input statistics: sequential GPTQ quantizes it before any exist."""
    include_embeddings = include_embeddings or embeddings is not None
    targets, in_name, out_name = select_targets(model, skip, include_embeddings)
    tied = _tied_output(model, in_name, out_name)
    plan = {}
    names = [n for n, _ in targets]
    base = {n: embeddings for n in (in_name, out_name) if n is not None and embeddings is not None}
    for name, mod in targets:
        cfg = _resolve(name, base.get(name, config), overrides)
        if isinstance(mod, nn.Embedding):
            if cfg.rounding == "gptq":          # quantized first, before any input statistics exist
                cfg = cfg.replace(rounding="nearest")
            plan[name] = {"kind": "embedding", "config": cfg.to_dict()}
        elif name == out_name and tied and in_name in names:
            plan[name] = {"kind": "tied_linear", "tied_to": in_name}
        else:
            plan[name] = {"kind": "linear", "config": cfg.to_dict()}
    return plan
