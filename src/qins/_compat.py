"""The one transformers version gate, shared by the HF quantizer and QINSCache.

A leaf utility below every layer (imports nothing of qins). Keep SUPPORTED_TRANSFORMERS in
step with pyproject.toml: the lower bound is the oldest version the code adapts to (5.17:
`kv/_compat.layer_types`, measured on the device machine), the upper the next major.
"""
from __future__ import annotations

import inspect
import warnings

SUPPORTED_TRANSFORMERS = ("5.17", "6.0")      # [lower, upper); the test suite runs on 5.24
_checked = False


def check_transformers() -> None:
    """Warn once when the installed transformers is outside the supported range."""
    global _checked
    if _checked:
        return
    import transformers
    from packaging.version import Version
    lo, hi = SUPPORTED_TRANSFORMERS
    if not Version(lo) <= Version(Version(transformers.__version__).base_version) < Version(hi):
        warnings.warn(f"qins supports transformers >= {lo}, < {hi}; found {transformers.__version__}",
                      RuntimeWarning, stacklevel=3)
    _checked = True


def cache_kwarg(model) -> str:
    """Keyword under which `model.generate`/`forward` take a cache: 'cache' (5.2x) or
    'past_key_values' (older; still accepted with a deprecation warning by 5.2x)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"
