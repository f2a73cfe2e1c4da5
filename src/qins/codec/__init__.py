"""Number formats, calibration and bit packing (pure tensor math, no modules)."""
from .formats import FORMATS, get_format, table
from .tensor import QuantizedWeight

__all__ = ["FORMATS", "get_format", "table", "QuantizedWeight"]
