"""transformers integration: `from_pretrained` and `save_pretrained` of qins checkpoints.

A thin adapter over the plan (`weights/plan.py`) and the module swap (`weights/swap.py`),
registered with transformers' own hooks (`register_quantization_config("qins")`,
`register_quantizer("qins")`) by an explicit call:

    import qins
    qins.register_transformers()
    model = AutoModelForCausalLM.from_pretrained(dir)    # a dir written by qins.save or save_pretrained

qins.load, qins.save and qins.quantize of a transformers model register too.

Supported transformers: qins._compat.SUPPORTED_TRANSFORMERS (the pin in pyproject.toml; written against 5.24, whose
loader builds the model on the meta device, lets the quantizer swap modules, then loads every
checkpoint tensor by name). The quantized modules are not trainable.

Quantize while loading (a float checkpoint, no calibration data):

    model = AutoModelForCausalLM.from_pretrained(dir, quantization_config=qins.QINSConfig(bits=4, group_size=64))

plans the modules as `qins.quantize(model, config, embeddings=...)` would (`targets.plan_modules`
on transformers' meta skeleton), swaps in empty QINS modules, and quantizes each float weight
as the loader reads it (`QINSQuantize`, transformers' quantize-op hook): one float weight in
memory at a time, never the float model. Rounding is to nearest (data-free): the codes equal
`qins.quantize` of the model loaded in the same dtype (and so compress-then-load); for GPTQ use
`qins compress` (`--stream --rounding gptq` for a model that does not fit in memory).
transformers refuses a quantization_config together with `gguf_file=`: convert a GGUF to a
safetensors directory first. After loading, the config is the plan, so `save_pretrained`
writes a pre-quantized qins checkpoint.
"""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
try:
    from transformers.core_model_loading import ConversionOps
except ImportError:                      # a transformers without quantize ops: loading saved checkpoints only
    ConversionOps = object
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._compat import check_transformers
from ..codec.config import FORMAT_VERSION, WeightConfig
from ..codec.tensor import QuantizedWeight
from .parallel import shard_qins_modules
from .placement import check_device_map, check_placement
from .plan import PLAN_ATTR, QUANT_METHOD, check_modules, check_version
from .swap import modules_from_plan
from .targets import plan_modules


class QINSQuantizationConfig(QuantizationConfigMixin):
    """The qins plan as transformers' `config.quantization_config`.

    quant_method    "qins"
    format_version  layout version of the saved tensors (newer than this qins reads: refused)
    modules         {module name: {"kind": "linear" | "embedding" | "tied_linear",
                                   "config": WeightConfig dict (not for tied_linear),
                                   "tied_to": embedding module name (tied_linear only)}}

    Its dict is exactly the "quantization_config" that `qins.save` writes into config.json.
    A config still to be applied to a float checkpoint (`QINSConfig`) has no modules yet but
    `weights` (WeightConfig dict), `embeddings` (WeightConfig dict or None: kept in float) and
    `skip` (name patterns kept in float); loading turns it into the plan.
    """

    def __init__(self, modules: dict | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, weights: dict | None = None, embeddings: dict | None = None,
                 skip: list[str] | None = None, **unknown: Any):
        where = "the qins quantization_config (config.json)"
        check_version(format_version, where)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"{where}: quant_method is {quant_method!r}, expected {QUANT_METHOD!r}")
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        if modules and weights is not None:
            raise ValueError(f"{where}: give a plan (modules) or the config to quantize with (weights), not both")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = copy.deepcopy(dict(modules or {}))
        self.weights = None if weights is None else WeightConfig.from_dict(dict(weights)).to_dict()
        self.embeddings = None if embeddings is None else WeightConfig.from_dict(dict(embeddings)).to_dict()
        self.skip = list(skip or [])
        self.post_init()

    def post_init(self) -> None:
        """Validate every module entry now, so a bad plan fails before any model is built."""
        check_modules(self.modules, "qins quantization_config")
        for c in (self.weights, self.embeddings):
            if c is not None and c["rounding"] != "nearest":
                raise ValueError("quantize while loading rounds to nearest (no calibration data); for GPTQ use "
                                 "`qins compress` (or `qins compress --stream --rounding gptq`), then load the result")

    @classmethod
    def from_plan(cls, plan: dict) -> "QINSQuantizationConfig":
        """From the {"quant_method", "format_version", "modules"} doc `qins.quantize` records."""
        return cls(**plan)

    def to_dict(self) -> dict[str, Any]:
        d = {"quant_method": self.quant_method, "format_version": self.format_version,
             "modules": copy.deepcopy(self.modules)}
        if not self.modules and self.weights is not None:             # not applied yet
            d.update(weights=dict(self.weights), embeddings=copy.deepcopy(self.embeddings), skip=list(self.skip))
        return d


def QINSConfig(format: str = "qins", bits: int = 4, group_size: int | None = 64, *, curvature: str = "tensor",
               clip_search: bool = True, scale_dtype: str = "float16",
               embeddings: WeightConfig | dict | None | bool = True,
               skip: list[str] | tuple[str, ...] = ()) -> QINSQuantizationConfig:
    """The quantization_config that makes `from_pretrained` quantize a float checkpoint as it loads.

    format, bits, group_size, curvature, clip_search, scale_dtype: the WeightConfig of every
                 linear layer ("log8": the 8-bit scales `qins compress` stores at 2-6 bits).
    embeddings   True (default): input embedding and lm_head in 6-bit g128 of `format` with
                 the same scale_dtype (the `qins compress` default); a WeightConfig (or dict
                 of its fields); False/None: kept in float. A tied lm_head shares the
                 embedding's codes.
    skip         module name patterns kept in float (as `qins.quantize`)
    Rounding is to nearest: see the module docstring.
    """
    register()                                   # so from_pretrained finds quant_method "qins"
    weights = WeightConfig(format=format, bits=bits, group_size=group_size, curvature=curvature,
                           clip_search=clip_search, scale_dtype=scale_dtype)
    if embeddings is True:
        emb = weights.replace(bits=6, group_size=128)
    elif embeddings is None or embeddings is False:
        emb = None
    elif isinstance(embeddings, WeightConfig):
        emb = embeddings
    else:
        emb = weights.replace(**embeddings)
    return QINSQuantizationConfig(weights=weights.to_dict(), embeddings=None if emb is None else emb.to_dict(),
                                  skip=list(skip))


class QINSHfQuantizer(HfQuantizer):
    """Loads qins checkpoints in `from_pretrained`: swaps in empty QINS modules, then
    transformers' loader fills their buffers (qweight, scales, offsets, curvature) by name.

    The buffers keep their stored dtypes (int32 codes, float16 scales, float32 curvature):
    transformers casts a checkpoint tensor only to the dtype of the empty tensor it fills.

    A float checkpoint with a `QINSConfig` (pre_quantized=False) is planned first; each planned
    module gets a placeholder `weight` on the meta device, so the loader hands the checkpoint's
    float weight (in the load dtype) to `QINSQuantize`, which returns the module's buffers.
    """

    requires_calibration = False
    quantization_config: QINSQuantizationConfig

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        if not self.pre_quantized and self.quantization_config.weights is None:
            raise ValueError("this qins quantization_config is a saved plan for a quantized checkpoint; to quantize "
                             "a float checkpoint while loading, pass quantization_config=qins.QINSConfig(...)")
        self._on_load: dict[str, tuple[WeightConfig, bool]] = {}     # module -> (config, stored transposed)

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        qc = self.quantization_config
        if not self.pre_quantized:
            emb = None if qc.embeddings is None else WeightConfig.from_dict(qc.embeddings)
            _tie_on_meta(model)                  # not yet done on the skeleton: a tied head shares the codes
            qc.modules = plan_modules(model, WeightConfig.from_dict(qc.weights), tuple(qc.skip), embeddings=emb)
            self._on_load = {n: (WeightConfig.from_dict(e["config"]),
                                 type(model.get_submodule(n)).__name__ == "Conv1D")
                             for n, e in qc.modules.items() if e["kind"] != "tied_linear"}
            shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in self._on_load}
            dtypes = {n: model.get_submodule(n).weight.dtype for n in self._on_load}
        modules = qc.modules
        modules_from_plan(model, modules)
        for name in modules:                 # transformers' TP hooks run our forward on local shards
            model.get_submodule(name)._hf_quantized_needs_local_tp = True
        if isinstance(device_map, dict):
            check_device_map(model, device_map)
        for n in self._on_load:                 # where the loader puts the float weight: QINSQuantize
            model.get_submodule(n).register_parameter(
                "weight", nn.Parameter(torch.empty(shapes[n], dtype=dtypes[n], device="meta"), requires_grad=False))
        for name, e in modules.items():          # log8 scales are filled as their stored codes
            if e["kind"] != "tied_linear":           # (QINSQuantize returns those too)
                model.get_submodule(name).expect_stored_scales()
        drop_quantized_ties(model, modules)
        _skip_init_of_parents(model, modules)
        _check_checkpoint(checkpoint_files)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        mod, _, field = param_name.rpartition(".")
        return field == "weight" and mod in self._on_load

    def get_quantize_ops(self):
        return QINSQuantize(self)

    def _process_model_after_weight_loading(self, model, **kwargs):
        left = [n for n in self._on_load if "weight" in model.get_submodule(n)._parameters]
        if left:
            raise ValueError(f"the checkpoint lacks the float weight of {len(left)} planned module(s), e.g. {left[:3]}")
        if not self.pre_quantized:              # from now on the config is the plan (save_pretrained writes it)
            self.quantization_config.weights = self.quantization_config.embeddings = None
            self.quantization_config.skip = []
            self.pre_quantized = True
        _check_all_loaded(model, self.quantization_config.modules)
        for name, e in self.quantization_config.modules.items():
            if e["kind"] != "tied_linear":
                model.get_submodule(name).decode_stored_scales()
        if (getattr(model, "_tp_size", None) or 1) > 1:
            shard_for_tp(model)
        else:
            check_placement(model)
        setattr(model, PLAN_ATTR, self.quantization_config.to_dict())   # so qins.save works too
        return model

    def get_state_dict_and_metadata(self, model):
        return None, {"qins_format_version": str(FORMAT_VERSION)}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def shard_for_tp(model: nn.Module) -> list[str]:
    """After transformers loaded the full codes on each rank of a `tp_plan` model: keep this
    rank's shard of every QINS module its plan names (weights/parallel.py)."""
    mesh = model._mesh_manager.get_mesh("tp")
    rank, world = mesh.get_local_rank(), mesh.size()
    cfg = model.config.get_text_config()
    for what in ("num_attention_heads", "num_key_value_heads"):
        n = getattr(cfg, what, None)
        if n is not None and n % world:
            raise ValueError(f"tensor parallelism over {world} ranks: {what} = {n} is not divisible by {world}")
    return shard_qins_modules(model, dict(model.tp_plan), rank, world, group=mesh.get_group(), forward=True)


class QINSQuantize(ConversionOps):
    """transformers' quantize op: one float weight in, the QINS module's buffers out.

    Called by the loader with {name: [tensor]} for each planned module's "weight" (in the load
    dtype); returns {"<module>.qweight": ..., "<module>.scales": ..., ...} (log8 scales as
    "scale_codes" and "scale_refs", the buffers `expect_stored_scales` made), which the loader
    sets by name. The placeholder weight is removed, so no float weight stays behind.
    """

    def __init__(self, hf_quantizer: QINSHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                missing_keys=None, **kwargs):
        (value,) = input_dict.values()
        value = value[0] if isinstance(value, list) else value
        name = full_layer_name.rpartition(".")[0]
        cfg, transposed = self.hf_quantizer._on_load[name]
        w = value.t() if transposed else value                     # Conv1D stores (I, O)
        qw = QuantizedWeight.from_float(w, cfg, name=name)
        model.get_submodule(name)._parameters.pop("weight", None)
        if missing_keys is not None:
            missing_keys.discard(full_layer_name)
        return {f"{name}.{k}": v for k, v in qw.stored_tensors(name).items()}


def _tie_on_meta(model: nn.Module) -> None:
    """Make the parameters transformers will tie after loading one object now (the skeleton is
    on the meta device: nothing is copied), so the plan sees a tied lm_head as tied."""
    try:
        ties = model.get_expanded_tied_weights_keys(all_submodels=True)
    except (AttributeError, ValueError):
        return
    for target, source in ties.items():
        mod, _, name = target.rpartition(".")
        setattr(model.get_submodule(mod) if mod else model, name, model.get_parameter(source))


def drop_quantized_ties(model: nn.Module, modules: dict) -> None:
    """Forget transformers' tied-weight entries that name a quantized module's float tensor.

    A tied lm_head ("tied_linear") reads its embedding's codes and has no `weight`; a plain
    QINS module has no `weight` either. Left in place, `tie_weights` and from_pretrained's
    bookkeeping would look up `lm_head.weight` / `model.embed_tokens.weight` and fail.
    Ties between float tensors (an unquantized embedding and lm_head) are kept.
    """
    from transformers import PreTrainedModel     # called after transformers is fully imported

    def quantized(key: str) -> bool:
        return any(key == n or key.startswith(n + ".") for n in modules)

    for prefix, sub in model.named_modules():
        if not isinstance(sub, PreTrainedModel):
            continue
        p = f"{prefix}." if prefix else ""
        keep = lambda ties: {t: s for t, s in ties.items() if not (quantized(p + t) or quantized(p + s))}  # noqa: E731
        try:
            own = sub.get_expanded_tied_weights_keys(all_submodels=False)
        except ValueError:        # a pattern that matches nothing once the modules are replaced
            own = None
        if own is not None and keep(own) != own:
            sub._tied_weights_keys = keep(own)   # read again by tie_weights(recompute_mapping=True)
        sub.all_tied_weights_keys = keep(getattr(sub, "all_tied_weights_keys", None) or {})


def _skip_init_of_parents(model: nn.Module, modules: dict) -> None:
    """Keep transformers' weight init away from the float weights a quantized module lacks.

    After loading, transformers runs `_init_weights` on every module not yet marked
    initialized; some models' init of a parent reaches into a child's weight (GPT-2 does
    `init.normal_(module.c_proj.weight)` for each attention and MLP block), which a QINS
    module does not have. A parent holding no tensors of its own has nothing of its own to
    initialize, so it is marked initialized; its children are still visited one by one.
    """
    for name in modules:
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        own = list(parent.parameters(recurse=False)) + [b for b in parent.buffers(recurse=False) if b is not None]
        if not own:
            parent._is_hf_initialized = True


def _check_checkpoint(files: list[str] | None) -> None:
    """Read the safetensors headers first, so a corrupt or truncated file names itself."""
    from safetensors import safe_open

    for f in files or ():
        if not str(f).endswith(".safetensors"):
            continue
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as e:                         # safetensors raises its own error types
            raise ValueError(f"{f}: cannot read the tensors ({e}); the file is corrupt or truncated") from e


def _check_all_loaded(model: nn.Module, modules: dict) -> None:
    """Every code/scale buffer must have come from the checkpoint.

    transformers reports a tensor absent from the checkpoint as a "missing key" warning and
    leaves it uninitialized (`torch.empty`); for codes and scales that is never usable. The
    loader marks each tensor it loads with `_is_hf_initialized`; a missing one lacks it.
    """
    missing = [f"{name}.{b}" for name in modules
               for b, t in model.get_submodule(name).named_buffers(recurse=False)
               if not getattr(t, "_is_hf_initialized", False)]
    if missing:
        raise ValueError(
            f"the qins checkpoint lacks {len(missing)} quantized tensor(s) that its config.json "
            f"plans, e.g. {missing[:3]}; the save is incomplete or does not belong to this config")


def attach(model: nn.Module, plan: dict) -> None:
    """Mark a model quantized in memory by `qins.quantize` as transformers would after loading
    it, so `model.save_pretrained(dir)` writes a qins checkpoint (config.json's
    quantization_config + the buffers) that `from_pretrained` and `qins.load` read back."""
    register()
    qc = QINSQuantizationConfig.from_plan(plan)
    drop_quantized_ties(model, qc.modules)
    model.config.quantization_config = qc
    model.hf_quantizer = QINSHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


def register() -> None:
    """Register the config and the quantizer with transformers (idempotent).

    Called explicitly: by `qins.register_transformers()`, and by qins.load / qins.save /
    qins.quantize of a transformers model, which need it; importing qins registers nothing."""
    check_transformers()
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not QINSQuantizationConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)    # a reloaded qins replaces its classes
        register_quantization_config(QUANT_METHOD)(QINSQuantizationConfig)
    if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not QINSHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
        register_quantizer(QUANT_METHOD)(QINSHfQuantizer)
