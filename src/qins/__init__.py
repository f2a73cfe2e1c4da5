"""qins: calibrated QINS compression of LLM weights and KV cache, measured honestly.

Importing does no work: heavy modules load on first use.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from importlib import import_module
from typing import Any

from .config import FORMAT_VERSION, WeightConfig

__version__ = "0.1.0"

_LAZY = {
    "quantize": ("qins.weights.quantize", "quantize"),
    "quantize_to_budget": ("qins.weights.budget", "quantize_to_budget"),
    "plan_table": ("qins.weights.budget", "plan_table"),
    "input_hessians": ("qins.weights.calibration", "input_hessians"),
    "save": ("qins.weights.serialization", "save"),
    "load": ("qins.weights.serialization", "load"),
    "QINSLinear": ("qins.weights.linear", "QINSLinear"),
    "QINSEmbedding": ("qins.weights.linear", "QINSEmbedding"),
    "load_default_model": ("qins.models", "load_default_model"),
    "load_model": ("qins.models", "load_model"),
    "default_corpus": ("qins.models", "default_corpus"),
    "eval": ("qins.eval", None),
    "QINSCache": ("qins.kv.cache", "QINSCache"),
    "KeyPlan": ("qins.kv.plan", "KeyPlan"),
    "calibrate_keys": ("qins.kv.plan", "calibrate_keys"),
}

__all__ = ["WeightConfig", "FORMAT_VERSION", "__version__", *_LAZY]


def _register_with_transformers() -> None:
    """Register qins' quantizer with transformers; a failure warns, never breaks an import."""
    try:
        import_module("qins.weights.hf")               # registers on import
    except Exception as e:                             # noqa: BLE001 - any failure only warns
        warnings.warn(f"qins could not register its transformers integration ({type(e).__name__}: {e}); "
                      f"from_pretrained will not read qins checkpoints", RuntimeWarning, stacklevel=2)


class _AfterImport:
    """A sys.meta_path finder that calls `callback` once, right after module `name` executed.

    It removes itself, finds the module's spec with the other finders and wraps the
    `exec_module` of that spec's loader instance (a fresh one per module for ordinary source
    files); the module itself loads exactly as before. Where the loader cannot be wrapped,
    the import goes on untouched and nothing is registered.
    """

    def __init__(self, name: str, callback) -> None:
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)                 # one shot; also no recursion below
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        exec_module = getattr(loader, "exec_module", None)
        if exec_module is None or isinstance(loader, type):
            return spec                                # shared or legacy loader: leave it alone

        def exec_then_callback(module):
            try:
                exec_module(module)
            finally:
                with contextlib.suppress(AttributeError):
                    del loader.exec_module             # the instance attribute set below
            self.callback()

        with contextlib.suppress(AttributeError, TypeError):   # e.g. a loader with __slots__
            loader.exec_module = exec_then_callback
        return spec


# transformers' quantizer registry: register now if it is loaded, else right after it loads.
# Importing qins imports neither transformers nor torch.
_REGISTRY = "transformers.quantizers.auto"
if _REGISTRY in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _AfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterImport(_REGISTRY, _register_with_transformers))


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        m = import_module(mod)
        value = m if attr is None else getattr(m, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qins' has no attribute {name!r}")
