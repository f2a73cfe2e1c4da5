"""qins.quantize(model, config): replace linear layers (and optionally embeddings) in place."""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ..codec.config import WeightConfig
from ..codec.tensor import QuantizedWeight
from .linear import QINSEmbedding, QINSLinear, is_linear_like
from .plan import PLAN_ATTR, plan_doc
from .swap import replace_module
from .targets import _matches, _resolve, _tied_output, select_targets


def quantize(
    model: nn.Module,
    config: WeightConfig | None = None,
    skip: list[str] | tuple[str, ...] | None = None,
    overrides: Mapping[str, WeightConfig | dict] | None = None,
    include_embeddings: bool = False,
    calibration: Mapping[str, torch.Tensor] | None = None,
    progress: bool = True,
    prequantized: Mapping[str, QuantizedWeight] | None = None,
    embeddings: WeightConfig | None = None,
) -> nn.Module:
    """Quantize `model` in place and return it.

    Every nn.Linear (and transformers Conv1D) is replaced by a QINSLinear, except the output
    embedding (lm_head) unless `include_embeddings`, which also quantizes the input embedding
    (a tied lm_head then shares the embedding's codes: stored once).

    skip         name patterns (fnmatch; a bare name matches as a suffix) left in float
    overrides    {pattern: WeightConfig or dict of fields to change} per module, first match wins
    calibration  {module name: (in_features,) mean squared input} from
                 `qins.weights.calibration.input_second_moments`: activation-weighted error;
                 or {module name: (in_features, in_features) E[x x^T]} from `input_hessians`,
                 which a config with rounding="gptq" needs. A tied embedding uses its
                 lm_head's entry; an untied input embedding has none and rounds to nearest.
    prequantized {module name: QuantizedWeight} codes already made from that module's weight
                 (the bit allocator's choice); its config wins over `config` and `overrides`
    embeddings   the config of the input embedding and lm_head (implies include_embeddings),
                 e.g. WeightConfig("qins", 8, 128) beside a 4-bit `config`; an `overrides`
                 pattern that names them still wins. None: they take `config`.
    """
    prequantized = dict(prequantized or {})
    config = config or WeightConfig()
    include_embeddings = include_embeddings or embeddings is not None
    skip = list(skip or [])
    for pattern in overrides or {}:
        # a pattern that reaches quantizable layers may also cover other leaves ("mlp.*" covers
        # act_fn); one that names only unsupported leaves is a mistake worth an error
        matched = [(n, m) for n, m in model.named_modules() if _matches(n, pattern)]
        if not any(_quantizable(m) for _, m in matched):
            bad = [(n, m) for n, m in matched if not any(True for _ in m.children())]
            if bad:
                name, mod = bad[0]
                raise TypeError(f"override {pattern!r} matches {name} of type {type(mod).__name__}, "
                                f"which qins cannot quantize (nn.Linear, Conv1D, nn.Embedding)")
    plan: dict = dict(getattr(model, PLAN_ATTR, {}).get("modules", {}))
    targets, in_name, out_name = select_targets(model, skip, include_embeddings)

    # bad input must lose nothing: check every target before the (slow) fits, and swap the
    # new modules in only once all of them are built, so an error leaves the model as it was
    for name, mod in targets:
        w = mod.weight
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{name}: {bad} NaN/Inf values in the weight; refusing to quantize "
                             f"(the model is left unchanged)")

    tied = _tied_output(model, in_name, out_name)
    base = {n: embeddings for n in (in_name, out_name) if n is not None and embeddings is not None}

    def config_of(name: str) -> WeightConfig:
        return _resolve(name, base.get(name, config), overrides)

    for name, mod in targets:
        cfg = config_of(name)
        if name in prequantized or (name == out_name and tied and in_name in [n for n, _ in targets]):
            continue                              # given codes, or the embedding's (tied) codes
        if cfg.rounding == "gptq" and not isinstance(mod, nn.Embedding) and (
                calibration is None or calibration.get(name) is None or calibration[name].dim() != 2):
            raise ValueError(f"{name}: rounding='gptq' needs calibration={{name: (I, I) E[x x^T]}} "
                             f"from qins.weights.calibration.input_hessians (the model is left unchanged)")
    new_embedding: QINSEmbedding | None = None
    replacements: list[tuple[str, nn.Module]] = []
    for name, mod in tqdm(targets, desc=f"quantize {config.label}", disable=not progress, leave=False):
        pre = prequantized.get(name)
        cfg = pre.config if pre is not None else config_of(name)
        if isinstance(mod, nn.Embedding):
            stat = calibration.get(out_name) if (calibration is not None and tied and out_name) else None
            if stat is None and cfg.rounding == "gptq":
                cfg = cfg.replace(rounding="nearest")     # no input statistics for a lookup table
            new = QINSEmbedding.from_float(mod, cfg, importance=stat, name=name, quantized=pre)
            new_embedding = new
            plan[name] = {"kind": "embedding", "config": new.config.to_dict()}
        elif name == out_name and tied and new_embedding is not None:
            bias = getattr(mod, "bias", None)
            new = QINSLinear(mod.in_features, mod.out_features, bias is not None, new_embedding.config,
                             tied_to=new_embedding)
            if bias is not None:
                new.bias.data.copy_(bias.detach())
            plan[name] = {"kind": "tied_linear", "tied_to": in_name}
        else:
            imp = None if calibration is None else calibration.get(name)
            new = QINSLinear.from_float(mod, cfg, importance=imp, name=name, quantized=pre)
            plan[name] = {"kind": "linear", "config": new.config.to_dict()}
        replacements.append((name, new))
    for name, new in replacements:
        replace_module(model, name, new)
    record_plan(model, plan)
    return model


def _quantizable(mod: nn.Module) -> bool:
    return is_linear_like(mod) or isinstance(mod, (nn.Embedding, QINSLinear, QINSEmbedding))


def record_plan(model: nn.Module, plan: dict, allocation: dict | None = None) -> None:
    """Keep the per-module plan on the model and in its HF config (saved in config.json).

    A transformers model also gets the qins quantizer attached (`qins.weights.hf.attach`), as
    `from_pretrained` would, so its own `save_pretrained` writes a loadable qins checkpoint.
    """
    doc = plan_doc(plan)
    allocation = allocation or getattr(model, PLAN_ATTR, {}).get("allocation")
    # how a mixed plan was chosen rides on the model and in qins.json, not in config.json
    setattr(model, PLAN_ATTR, dict(doc, allocation=allocation) if allocation else doc)
    cfg = getattr(model, "config", None)
    if cfg is not None:
        cfg.quantization_config = doc
        modeling = sys.modules.get("transformers.modeling_utils")   # never import transformers here
        if modeling is not None and isinstance(model, modeling.PreTrainedModel):
            from .hf import attach
            attach(model, doc)


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, mod in model.named_modules():
        if isinstance(mod, (QINSLinear, QINSEmbedding)):
            yield name, mod


@contextlib.contextmanager
def decoded_weights(model: nn.Module):
    """Hold decoded float weights while inside (fast CPU evaluation); outputs are identical."""
    mods = [m for _, m in quantized_modules(model) if not (isinstance(m, QINSLinear) and m.tied_to is not None)]
    try:
        for m in mods:
            m.cache_decoded(True)
        yield model
    finally:
        for m in mods:
            m.cache_decoded(False)
