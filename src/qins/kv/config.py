"""KVConfig: how QINSCache stores keys and values; frozen, round-trips through JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..config import JsonConfig

KV_FORMAT_VERSION = 1
KV_FORMATS = ("qins", "int-sym")          # both are a decode table times one scale per group
KV_BITS = (2, 3, 4, 5, 6, 8)
PAGE_KB_RANGE = (16, 64)
KV_GROUPS = (16, 32, 64, 128)
SLIDING_MODES = ("full",)                 # sliding-window layers stay uncompressed

# Default curvature a per bit width, for keys and values alike (qins format only).
# a = 0 (uniform levels) at every width: on one 512-token window of the default corpus at
# 4 bits, residual 0, a = 1 and a = 3 measured +14% and +27% worse perplexity than a = 0.
# A per-width calibration has not been run yet. int-sym always uses a = 0.
DEFAULT_CURVATURE: dict[int, float] = {8: 0.0, 6: 0.0, 5: 0.0, 4: 0.0, 3: 0.0, 2: 0.0}


@dataclass(frozen=True)
class KVConfig(JsonConfig):
    """How a QINSCache quantizes and pages the KV cache.

    format       "qins" (default) or "int-sym" (uniform INT baseline through the same code)
    k_bits       bits per key code: 2, 3, 4, 5, 6 or 8
    v_bits       bits per value code (None = k_bits)
    residual     most recent tokens held in full precision (the model's dtype); 0 = every
                 token is read back from quantized codes
    sink         first tokens held in full precision ("attention sinks"); 0 = none
    page_kb      bytes of one page per sequence (batch row), codes + scales of K and V,
                 16..64 KiB; a page holds the largest multiple of `group` tokens that fits
    group        tokens per key scale (keys: one scale per channel per group of tokens)
    k_curvature  qins curvature a of keys (None = DEFAULT_CURVATURE[k_bits])
    v_curvature  qins curvature a of values (None = DEFAULT_CURVATURE[v_bits])
    layer_bits   per-layer overrides: ((layer_idx, k_bits, v_bits), ...)
    sliding      what sliding-window layers do: "full" keeps them uncompressed
                 (transformers' DynamicSlidingWindowLayer, bytes counted in nbytes)
    """

    format: str = "qins"
    k_bits: int = 4
    v_bits: int | None = None
    residual: int = 128
    sink: int = 0
    page_kb: int = 32
    group: int = 64
    k_curvature: float | None = None
    v_curvature: float | None = None
    layer_bits: tuple[tuple[int, int, int], ...] = ()
    sliding: str = "full"
    version: int = field(default=KV_FORMAT_VERSION)

    def __post_init__(self) -> None:
        if self.format not in KV_FORMATS:
            raise ValueError(f"KV format must be one of {KV_FORMATS}, got {self.format!r}")
        if self.v_bits is None:
            object.__setattr__(self, "v_bits", self.k_bits)
        lb = tuple(tuple(int(x) for x in t) for t in self.layer_bits)
        object.__setattr__(self, "layer_bits", lb)
        for name, b in [("k_bits", self.k_bits), ("v_bits", self.v_bits)] + \
                [(f"layer_bits[{t[0]}]", x) for t in lb for x in t[1:]]:
            if not isinstance(b, int) or isinstance(b, bool) or b not in KV_BITS:
                raise ValueError(f"{name} must be one of {KV_BITS}, got {b!r}")
        for t in lb:
            if len(t) != 3 or t[0] < 0:
                raise ValueError(f"layer_bits entries are (layer_idx >= 0, k_bits, v_bits), got {t}")
        if len({t[0] for t in lb}) != len(lb):
            raise ValueError("layer_bits names a layer twice")
        for name in ("residual", "sink"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        lo, hi = PAGE_KB_RANGE
        if not isinstance(self.page_kb, int) or isinstance(self.page_kb, bool) or not lo <= self.page_kb <= hi:
            raise ValueError(f"page_kb must be an int in [{lo}, {hi}] (KiB per page), got {self.page_kb!r}")
        if self.group not in KV_GROUPS:
            raise ValueError(f"group must be one of {KV_GROUPS} tokens, got {self.group!r}")
        for name in ("k_curvature", "v_curvature"):
            a = getattr(self, name)
            if a is not None and not a >= 0:
                raise ValueError(f"{name} must be >= 0, got {a!r}")
        if self.sliding not in SLIDING_MODES:
            raise ValueError(f"sliding must be one of {SLIDING_MODES}, got {self.sliding!r}")
        if self.version > KV_FORMAT_VERSION:
            raise ValueError(f"KV config version {self.version} is newer than this qins reads "
                             f"({KV_FORMAT_VERSION}); upgrade qins")

    # -- per layer -------------------------------------------------------------------------
    def bits_for(self, layer_idx: int) -> tuple[int, int]:
        for i, k, v in self.layer_bits:
            if i == layer_idx:
                return k, v
        return self.k_bits, self.v_bits

    def curvature_for(self, bits: int, which: str) -> float:
        if self.format == "int-sym":
            return 0.0
        a = self.k_curvature if which == "k" else self.v_curvature
        return DEFAULT_CURVATURE[bits] if a is None else float(a)

    @property
    def label(self) -> str:
        bits = f"{self.k_bits}" if self.k_bits == self.v_bits else f"k{self.k_bits}v{self.v_bits}"
        return f"kv-{self.format}-{bits}b-r{self.residual}"

    # -- serialization -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        d["layer_bits"] = [list(t) for t in self.layer_bits]
        return d

    @classmethod
    def _from_plain(cls, d: dict[str, Any]) -> dict[str, Any]:
        if "layer_bits" in d:
            d["layer_bits"] = tuple(tuple(t) for t in d["layer_bits"])
        return d


def parse_kv_bits(s: str) -> tuple[int, int]:
    """'4' -> (4, 4); '8,4' -> (8, 4) (keys, values)."""
    parts = [p.strip() for p in str(s).split(",")]
    if not 1 <= len(parts) <= 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"--kv-bits takes K or K,V (e.g. 4 or 8,4), got {s!r}")
    k = int(parts[0])
    return k, int(parts[1]) if len(parts) == 2 else k


def from_flags(kv_bits: str | None, residual: int | None = None, page_kb: int | None = None) -> KVConfig | None:
    """The KVConfig of the CLI flags --kv-bits K[,V] --kv-residual N --kv-page-kb N (None
    when --kv-bits is not given)."""
    if kv_bits is None:
        if residual is not None or page_kb is not None:
            raise ValueError("--kv-residual and --kv-page-kb need --kv-bits")
        return None
    k, v = parse_kv_bits(kv_bits)
    fields = dict(k_bits=k, v_bits=v)
    if residual is not None:
        fields["residual"] = residual
    if page_kb is not None:
        fields["page_kb"] = page_kb
    return KVConfig(**fields)
