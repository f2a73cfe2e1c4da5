"""WeightConfig: the one config of `qins.quantize`, frozen and round-tripping through JSON.

JsonConfig (the JSON round trip) is shared with kv.KVConfig; FORMAT_VERSION is the version of
the saved layout. Both live in codec, the lowest layer, so every layer above can use them.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

# version of the saved layout this library writes; it reads every version up to it.
#   1  scales float16 (`<module>.scales`)
#   2  adds scale_dtype "log8": `<module>.scale_codes` uint8 + `<module>.scale_refs` float16
#      in place of `<module>.scales` (codec/scales.py); float16 scales are stored as in 1
FORMAT_VERSION = 2


class JsonConfig:
    """JSON round trip for the frozen config dataclasses; unknown fields are an error."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def _from_plain(cls, d: dict[str, Any]) -> dict[str, Any]:
        """Turn JSON lists back into the field types (tuples); override where needed."""
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}")
        return cls(**cls._from_plain(dict(d)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str):
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)


# log8 scales are offered up to this width. Measured (tests/codec/test_scales.py): weight error
# x0.98-1.00 of float16 scales' at 2-6 bits; qins 8-bit g128 x1.34, for 0.06 bpw (0.8%) saved
LOG8_MAX_BITS = 6


def log8_supported(format: str, bits: int) -> bool:
    """Whether WeightConfig(format, bits, scale_dtype="log8") is valid."""
    from .formats import get_format
    fmt = get_format(format)
    return fmt.scaled and not fmt.asymmetric and bits <= LOG8_MAX_BITS


def scale_dtype_for(choice: str, format: str, bits: int) -> str:
    """A scale_dtype from a choice of "auto", "float16" or "log8": auto is log8 where the format
    and width allow it (`log8_supported`), else float16 (`qins compress --scales`)."""
    if choice != "auto":
        return choice
    return "log8" if log8_supported(format, bits) else "float16"


@dataclass(frozen=True)
class WeightConfig(JsonConfig):
    """How to quantize a weight tensor.

    format        "qins", "qins-seed", "int-sym", "int-asym", "nf4", "fp8"
    bits          2, 3, 4, 5, 6 or 8 (nf4: 4; fp8 and qins-seed: 8)
    group_size    weights per scale along the input dimension (a multiple of 32); None = one
                  per output channel. Where it does not divide the input dimension, the last
                  group of each row takes the remainder.
    curvature     qins only: "tensor" (one a per tensor) or "channel" (one a per output row).
                  A fused layer is one tensor: Phi-3's qkv_proj (Q, K and V rows stacked) and
                  gate_up_proj (gate and up rows) share one curvature per tensor under
                  "tensor"; under "channel" every row has its own, so each logical tensor is
                  quantized exactly as it would be alone. Scales never cross rows in either
                  mode (tests/codec/test_fused.py).
    curvature_value  qins only: fix a instead of calibrating it
    clip_search   search a clip of each group's scale (largest |x| then may not be exact)
    scale_dtype   storage of scales: "float16" (16 bits each), or "log8": a sign and a step
                  of a logarithmic grid below the row's largest scale, 8 bits each plus one
                  float16 per row (codec/scales.py; symmetric formats: qins, int-sym, nf4;
                  2-6 bits).
                  In memory the scales are float16 either way. Offsets are float16.
    rounding      how codes are chosen: "nearest" level, or "gptq" (error-compensating, needs
                  calibration text; codec/gptq.py). Decoding is the same either way.
    """

    format: str = "qins"
    bits: int = 4
    group_size: int | None = 64
    curvature: str = "tensor"
    curvature_value: float | None = None
    clip_search: bool = True
    scale_dtype: str = "float16"
    rounding: str = "nearest"
    version: int = field(default=FORMAT_VERSION)

    def __post_init__(self) -> None:
        from .formats import get_format             # torch: imported on first use, not by `import qins`
        fmt = get_format(self.format)
        if not isinstance(self.bits, int) or isinstance(self.bits, bool):
            raise ValueError(f"bits must be an int, got {self.bits!r}")
        fmt.check_bits(self.bits)
        if self.group_size is not None and (
                not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 32):
            raise ValueError(
                f"group_size must be a positive multiple of 32 (each group fills whole 32-bit "
                f"words of codes) or None for per channel, got {self.group_size!r}")
        if self.curvature not in ("tensor", "channel"):
            raise ValueError(f"curvature must be 'tensor' or 'channel', got {self.curvature!r}")
        if self.curvature_value is not None and self.curvature_value < 0:
            raise ValueError("curvature_value must be >= 0")
        if self.scale_dtype not in ("float16", "log8"):
            raise ValueError(f"scale_dtype must be 'float16' or 'log8', got {self.scale_dtype!r}")
        if self.scale_dtype == "log8" and (fmt.asymmetric or not fmt.scaled):
            raise ValueError(f"scale_dtype 'log8' needs a symmetric scaled format, not {self.format!r}")
        if self.scale_dtype == "log8" and self.bits > LOG8_MAX_BITS:
            raise ValueError(f"scale_dtype 'log8' is for 2-{LOG8_MAX_BITS} bits (at {self.bits} bits its 4.4% scale "
                             f"steps cost more error than the 0.8% of bytes they save): use float16")
        if self.rounding not in ("nearest", "gptq"):
            raise ValueError(f"rounding must be 'nearest' or 'gptq', got {self.rounding!r}")
        if self.rounding == "gptq" and fmt.seed_rounding:
            raise ValueError(f"format {self.format!r} has a fixed encoder; rounding='gptq' does not apply")
        if self.version > FORMAT_VERSION:
            raise ValueError(
                f"config format version {self.version} is newer than this qins reads "
                f"({FORMAT_VERSION}); upgrade qins")

    @property
    def label(self) -> str:
        g = "ch" if self.group_size is None else f"g{self.group_size}"
        return (f"{self.format}-{self.bits}b-{g}" + ("-s8" if self.scale_dtype == "log8" else "")
                + ("-gptq" if self.rounding == "gptq" else ""))

