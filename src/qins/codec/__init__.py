"""Number formats, calibration and bit packing (pure tensor math, no modules).

Importing the package imports no torch: `qins.codec.config` (WeightConfig) is read by
`import qins`; the tensor modules load on first use.
"""
from importlib import import_module

_LAZY = {"FORMATS": "formats", "get_format": "formats", "table": "formats", "QuantizedWeight": "tensor"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
