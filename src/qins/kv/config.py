"""KVConfig: how QINSCache stores keys and values; frozen, round-trips through JSON."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..codec.config import JsonConfig

KV_FORMAT_VERSION = 1
KV_FORMATS = ("qins", "int-sym")          # both are a decode table times one scale per group
KV_BITS = (2, 3, 4, 5, 6, 8)
PAGE_KB_RANGE = (16, 64)
KV_GROUPS = (16, 32, 64, 128)
SLIDING_MODES = ("full",)                 # sliding-window layers stay uncompressed

# Per-width defaults. Chosen on CALIBRATION text only: the first 4 windows of the default corpus,
# cache in the loop, residual 0 (benchmarks/kv_defaults.py -> benchmarks/results/kv_defaults.md;
# rule fixed before measuring: lowest perplexity, ties within 0.05 points to curvature 0 and the
# larger group). Reports (README, qins eval/compare) use the corpus's last windows.
# - value curvature a: 0.5 at 2 and 4 bits (+90.3% / +1.49% against +95.0% / +1.76% at a = 0),
#   1 at 3 bits (+8.22% against +12.1%), 0 at 5 and 6 bits (within the tie of the best; uniform
#   levels also decode without a table) and at 8 bits.
# - key group: 128 tokens at 3, 4 and 5 bits (64 measured no better: +8.34% / +1.90% / +0.32%
#   against +8.22% / +1.76% / +0.23%; scale + zero point then cost 0.25 bits/element of K); 64
#   at 2, 6 and 8 bits, where 128 tokens of codes would not fit a 32 KiB page (6, 8 bits).
# - keys carry a zero point per (group, channel) below 8 bits (KIVI's asymmetric keys; 4-bit
#   keys alone measured KL 0.028 with a fixed per-channel offset against 0.020 with zero points);
#   8-bit keys use the fixed offset (within +0.1%, 8.26 bits/element against 8.375).
# - keys stay uniform (a = 0): a = 0.5 and 1 measured a larger attention-output error
#   (experiments/kv_probe; 7.4e-3, 9.2e-3 against 7.1e-3 at 4 bits).
DEFAULT_CURVATURE_K: dict[int, float] = {8: 0.0, 6: 0.0, 5: 0.0, 4: 0.0, 3: 0.0, 2: 0.0}
DEFAULT_CURVATURE_V: dict[int, float] = {8: 0.0, 6: 0.0, 5: 0.0, 4: 0.5, 3: 1.0, 2: 0.5}
DEFAULT_GROUP: dict[int, int] = {8: 64, 6: 64, 5: 128, 4: 128, 3: 128, 2: 64}
# - pre-RoPE keys (rope.py, `k_prerope=True`) measure better at every width (4 bits, residual 0,
#   corpus windows 8..23: +2.47% -> +1.62%, KL 0.0222 -> 0.0163; experiments/kv_prerope) but are
#   not the default yet: the CUDA decode-attention kernel does not read them, so on a GPU they
#   take the first Triton kernel (2.8-4x slower than the CUDA kernel at 32k tokens before the
#   rotation was added, benchmarks/results/gpu_kv_attention.md). Off until the CUDA kernel turns
#   keys, so that a default cache decodes alike, and as fast as measured, on every device.
DEFAULT_K_PREROPE: dict[int, bool] = {8: False, 6: False, 5: False, 4: False, 3: False, 2: False}
# - rotated values (vrot.py, `v_rotate=True`) lower KL too (4 bits, residual 0, reported windows:
#   0.0203 -> 0.0189; with pre-RoPE keys and a key plan 0.0113 -> 0.0082 against the plan alone)
#   but every CPU decode step turns the whole history (1.34x at 4k context) and the GPU cost is
#   not yet timed: off until measured on both.
DEFAULT_K_ZERO: dict[int, bool] = {8: False, 6: True, 5: True, 4: True, 3: True, 2: True}
DEFAULT_V_ZERO: dict[int, bool] = {8: False, 6: False, 5: False, 4: False, 3: False, 2: False}
DEFAULT_CURVATURE = DEFAULT_CURVATURE_V       # kept name: value curvature per width


@dataclass(frozen=True)
class KVConfig(JsonConfig):
    """How a QINSCache quantizes and pages the KV cache.

    format       "qins" (default) or "int-sym" (uniform INT baseline through the same code)
    k_bits       bits per key code: 2, 3, 4, 5, 6 or 8
    v_bits       bits per value code (None = k_bits)
    residual     most recent tokens held in full precision (the model's dtype); 0 = every
                 token is read back from quantized codes
    sink         first tokens also held in full precision ("attention sinks"; they still
                 sit in the first page, so pages stay aligned; < group); 0 = none
    page_kb      bytes of one page per sequence (batch row), codes + scales of K and V,
                 16..64 KiB; a page holds the largest multiple of `group` tokens that fits
    group        tokens per key scale (keys: one scale per channel per group of tokens);
                 None = DEFAULT_GROUP[k_bits] (per layer where layer_bits changes k_bits)
    k_curvature  qins curvature a of keys (None = DEFAULT_CURVATURE[k_bits])
    v_curvature  qins curvature a of values (None = DEFAULT_CURVATURE[v_bits])
    k_zero       keys store a zero point per group (its mid-range) beside the scale
                 (None = DEFAULT_K_ZERO[k_bits]); without one a fixed per-channel offset is used
    v_zero       values store a zero point per token beside the scale (None = DEFAULT_V_ZERO)
    v_rotate     values are quantized turned by an orthonormal block-Hadamard matrix and turned
                 back when read (kv/vrot.py; nothing stored; off by default)
    k_prerope    keys are quantized with the model's RoPE turned back and turned again when read
                 (kv/rope.py; nothing stored; None = DEFAULT_K_PREROPE[k_bits]); models without
                 RoPE keep their keys as given
    layer_bits   per-layer overrides: ((layer_idx, k_bits, v_bits), ...)
    sliding      what sliding-window layers do: "full" keeps them uncompressed
                 (transformers' DynamicSlidingWindowLayer, bytes counted in nbytes)
    """

    format: str = "qins"
    k_bits: int = 4
    v_bits: int | None = None
    residual: int = 128
    sink: int = 1
    page_kb: int = 32
    group: int | None = None
    k_curvature: float | None = None
    v_curvature: float | None = None
    k_zero: bool | None = None
    v_zero: bool | None = None
    k_prerope: bool | None = None
    v_rotate: bool = False
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
        if self.group is not None and self.group not in KV_GROUPS:
            raise ValueError(f"group must be one of {KV_GROUPS} tokens, got {self.group!r}")
        for name in ("k_curvature", "v_curvature"):
            a = getattr(self, name)
            if a is not None and not a >= 0:
                raise ValueError(f"{name} must be >= 0, got {a!r}")
        if not isinstance(self.v_rotate, bool):
            raise ValueError(f"v_rotate must be True or False, got {self.v_rotate!r}")
        for name in ("k_zero", "v_zero", "k_prerope"):
            z = getattr(self, name)
            if z is not None and not isinstance(z, bool):
                raise ValueError(f"{name} must be True, False or None, got {z!r}")
        if self.sink >= min(self.group_for(b) for b in [self.k_bits] + [t[1] for t in lb]):
            raise ValueError(f"sink ({self.sink}) must be smaller than the key group")
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
        default = DEFAULT_CURVATURE_K if which == "k" else DEFAULT_CURVATURE_V
        return default[bits] if a is None else float(a)

    def group_for(self, k_bits: int) -> int:
        return DEFAULT_GROUP[k_bits] if self.group is None else self.group

    def zero_for(self, bits: int, which: str) -> bool:
        z = self.k_zero if which == "k" else self.v_zero
        return (DEFAULT_K_ZERO if which == "k" else DEFAULT_V_ZERO)[bits] if z is None else z

    def prerope_for(self, k_bits: int) -> bool:
        return DEFAULT_K_PREROPE[k_bits] if self.k_prerope is None else self.k_prerope

    @property
    def label(self) -> str:
        bits = f"{self.k_bits}" if self.k_bits == self.v_bits else f"k{self.k_bits}v{self.v_bits}"
        extra = ("-prerope" if self.k_prerope else "") + ("-vrot" if self.v_rotate else "")
        return f"kv-{self.format}-{bits}b-r{self.residual}{extra}"

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


def from_flags(kv_bits: str | None, residual: int | None = None, page_kb: int | None = None,
               prerope: bool | None = None, rotate_values: bool | None = None) -> KVConfig | None:
    """The KVConfig of the CLI flags --kv-bits K[,V] --kv-residual N --kv-page-kb N --kv-prerope
    --kv-rotate-values (None when --kv-bits is not given)."""
    if kv_bits is None:
        if any(x is not None for x in (residual, page_kb, prerope, rotate_values)):
            raise ValueError("--kv-residual, --kv-page-kb, --kv-prerope and --kv-rotate-values need --kv-bits")
        return None
    k, v = parse_kv_bits(kv_bits)
    fields = dict(k_bits=k, v_bits=v)
    if residual is not None:
        fields["residual"] = residual
    if page_kb is not None:
        fields["page_kb"] = page_kb
    if prerope is not None:
        fields["k_prerope"] = prerope
    if rotate_values is not None:
        fields["v_rotate"] = rotate_values
    return KVConfig(**fields)
