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
checkpoint tensor by name). Pre-quantized checkpoints only: nothing is quantized on the fly
(`qins.quantize` does that), and the quantized modules are not trainable.
"""
from __future__ import annotations

import copy
from typing import Any

from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from .._compat import check_transformers
from ..codec.config import FORMAT_VERSION
from .parallel import shard_qins_modules
from .placement import check_device_map, check_placement
from .plan import PLAN_ATTR, QUANT_METHOD, check_modules, check_version
from .swap import modules_from_plan


class QINSQuantizationConfig(QuantizationConfigMixin):
    """The qins plan as transformers' `config.quantization_config`.

    quant_method    "qins"
    format_version  layout version of the saved tensors (newer than this qins reads: refused)
    modules         {module name: {"kind": "linear" | "embedding" | "tied_linear",
                                   "config": WeightConfig dict (not for tied_linear),
                                   "tied_to": embedding module name (tied_linear only)}}

    Its dict is exactly the "quantization_config" that `qins.save` writes into config.json.
    """

    def __init__(self, modules: dict | None = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **unknown: Any):
        where = "the qins quantization_config (config.json)"
        check_version(format_version, where)
        if quant_method != QUANT_METHOD:
            raise ValueError(f"{where}: quant_method is {quant_method!r}, expected {QUANT_METHOD!r}")
        if unknown:
            raise ValueError(f"{where}: unknown fields {sorted(unknown)}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.modules = copy.deepcopy(dict(modules or {}))
        self.post_init()

    def post_init(self) -> None:
        """Validate every module entry now, so a bad plan fails before any model is built."""
        check_modules(self.modules, "qins quantization_config")

    @classmethod
    def from_plan(cls, plan: dict) -> "QINSQuantizationConfig":
        """From the {"quant_method", "format_version", "modules"} doc `qins.quantize` records."""
        return cls(**plan)

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": self.quant_method, "format_version": self.format_version,
                "modules": copy.deepcopy(self.modules)}


class QINSHfQuantizer(HfQuantizer):
    """Loads qins checkpoints in `from_pretrained`: swaps in empty QINS modules, then
    transformers' loader fills their buffers (qweight, scales, offsets, curvature) by name.

    The buffers keep their stored dtypes (int32 codes, float16 scales, float32 curvature):
    transformers casts a checkpoint tensor only to the dtype of the empty tensor it fills.
    """

    requires_calibration = True          # pre-quantized checkpoints only
    quantization_config: QINSQuantizationConfig

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, device_map=None, **kwargs):
        modules = self.quantization_config.modules
        modules_from_plan(model, modules)
        for name in modules:                 # transformers' TP hooks run our forward on local shards
            model.get_submodule(name)._hf_quantized_needs_local_tp = True
        if isinstance(device_map, dict):
            check_device_map(model, device_map)
        drop_quantized_ties(model, modules)
        _skip_init_of_parents(model, modules)
        _check_checkpoint(checkpoint_files)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        _check_all_loaded(model, self.quantization_config.modules)
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
