"""QuantizedWeight: a 2-D weight held as packed codes plus per-group parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WeightConfig
from . import calibrate, grid, packing
from . import scales as log8
from .formats import get_format, table
from .qins import seed_encode


@dataclass
class QuantizedWeight:
    """Stored state of one quantized (O, I) weight, G = I / group_size groups per row.

    qweight    (O, packing.packed_words(I, bits)) int32   bit-packed codes (packing.py)
    scales     (O, G) float16 or None                    group scale s (None: qins-seed); with
                                                         scale_dtype "log8" on that grid, and
                                                         stored as 8-bit codes (codec/scales.py)
    offsets    (O, G) float16 or None                    group offset m (int-asym only)
    curvature  (A,) float32 or None                      a per tensor (A=1) or row (A=O); qins only
    config     the WeightConfig it was made with (format, bits, group_size)
    shape      (O, I)
    table      (1, 2^bits) float32 decode table on the codes' device, or None: then rebuilt
               from the curvature on each decode (on its device, no host round trip). Derived,
               never stored; the modules hold the per-tensor table and move it with `.to()`.

    G = max(1, I // group_size); the last group of a row also takes the remainder I mod g.
    """

    qweight: torch.Tensor
    scales: torch.Tensor | None
    offsets: torch.Tensor | None
    curvature: torch.Tensor | None
    config: WeightConfig
    shape: tuple[int, int]
    table: torch.Tensor | None = None

    @classmethod
    def from_float(cls, w: torch.Tensor, config: WeightConfig, importance: torch.Tensor | None = None,
                   name: str = "weight") -> "QuantizedWeight":
        """Calibrate and encode `w` (O, I) on its device; the stored tensors end there too.

        importance  (I,) error weight per input channel (mean squared input), or (I, I) the
                    input's second-moment matrix E[x x^T]: its diagonal weights the error and
                    config.rounding="gptq" compensates rounding with it (codec/gptq.py).
                    Moved to w's device if it sits elsewhere.
        """
        if w.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(w.shape)}")
        if not torch.isfinite(w).all():
            bad = int((~torch.isfinite(w)).sum())
            raise ValueError(f"{name}: {bad} NaN/Inf values in the weight; refusing to quantize")
        I_ = w.shape[1]
        if importance is not None and importance.shape not in ((I_,), (I_, I_)):
            raise ValueError(f"{name}: importance must have shape ({I_},) or ({I_}, {I_}), "
                             f"got {tuple(importance.shape)}")
        hessian = importance if importance is not None and importance.dim() == 2 else None
        if config.rounding == "gptq" and hessian is None:
            raise ValueError(f"{name}: rounding='gptq' needs the input's ({I_}, {I_}) second-moment "
                             f"matrix (qins.weights.calibration.input_hessians)")
        fmt = get_format(config.format)
        O, I = w.shape
        if fmt.seed_rounding:
            codes = seed_encode(w.detach())
            qweight = packing.pack(codes, config.bits)
            return cls(qweight, None, None, None, config, (O, I))
        g = I if config.group_size is None else config.group_size
        codes, scale, offset, a = calibrate.fit(
            w.detach().float(), fmt, config.bits, g,
            importance=None if hessian is not None else importance, hessian=hessian,
            curvature=config.curvature, curvature_value=config.curvature_value,
            clip_search=config.clip_search, rounding=config.rounding, scale_dtype=config.scale_dtype)
        return cls(
            qweight=packing.pack(codes, config.bits),
            scales=scale.to(torch.float16).contiguous(),
            offsets=None if offset is None else offset.to(torch.float16).contiguous(),
            curvature=None if a is None else a.to(torch.float32).contiguous(),
            config=config,
            shape=(O, I),
        )

    # -- decoding ------------------------------------------------------------------------
    def decode_table(self) -> torch.Tensor:
        """(A, 2^bits) float32 on the codes' device: the held table, else rebuilt from the curvature."""
        if self.table is not None:
            return self.table
        return build_table(self.config, self.curvature).to(self.qweight.device)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(O, I) or (len(rows), I) uint8 codes."""
        packed = self.qweight if rows is None else self.qweight[rows]
        return packing.unpack(packed, self.config.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference decode: table lookup times scale (plus offset) -> (O, I) or (len(rows), I)."""
        def pick(t):
            return t if t is None or rows is None else t[rows]
        tab = self.decode_table()
        return decode(pick(self.qweight), pick(self.scales), pick(self.offsets),
                      tab if tab.shape[0] == 1 else pick(tab),
                      self.config.bits, self.group_size, self.shape[1], dtype)

    @property
    def group_size(self) -> int:
        return self.shape[1] if self.config.group_size is None else self.config.group_size

    # -- accounting ----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight}
        for k in ("scales", "offsets", "curvature"):
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        return out

    def stored_tensors(self, name: str = "weight") -> dict[str, torch.Tensor]:
        """The tensors as saved: `tensors()`, except that log8 scales are saved as
        `scale_codes` (O, G) uint8 and `scale_refs` (O,) float16 (codec/scales.py)."""
        out = self.tensors()
        if self.scales is None or self.config.scale_dtype != "log8":
            return out
        code, ref = log8.encode(out.pop("scales"), name=f"{name}.scales")
        return {"qweight": out.pop("qweight"), "scale_codes": code, "scale_refs": ref, **out}

    @classmethod
    def from_stored(cls, t: dict[str, torch.Tensor], config: WeightConfig, shape: tuple[int, int],
                    name: str = "weight") -> "QuantizedWeight":
        """The inverse of `stored_tensors` (log8 scales decoded bit-exactly, on the codes' device)."""
        scales = t.get("scales")
        if "scale_codes" in t:
            scales = log8.decode(t["scale_codes"], t["scale_refs"], f"{name}.scales").to(t["scale_codes"].device)
        return cls(t["qweight"], scales, t.get("offsets"), t.get("curvature"), config, tuple(shape))

    def nbytes(self) -> int:
        """Bytes stored: packed codes (with row padding) + scales + offsets + curvature; log8
        scales count as stored (a byte per group and a float16 per row), not as held."""
        n = sum(t.numel() * t.element_size() for t in self.tensors().values())
        if self.scales is not None and self.config.scale_dtype == "log8":
            n += log8.nbytes(*self.scales.shape) - self.scales.numel() * self.scales.element_size()
        return n

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])


def build_table(config: WeightConfig, curvature: torch.Tensor | None) -> torch.Tensor:
    """(A, 2^bits) float32 decode table of `config`, on the curvature's device (qins, no host
    round trip) or the CPU (fixed tables)."""
    return table(config.format, config.bits, curvature.detach() if curvature is not None else None)


def decode(qweight: torch.Tensor, scales: torch.Tensor | None, offsets: torch.Tensor | None,
           tab: torch.Tensor, bits: int, group_size: int, in_features: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference decode of packed rows: tab[code] * s (+ m), fp32 math, then cast.

    qweight (R, W) int32, scales/offsets (R, G) or None, tab (1 or R, 2^bits) float32
    -> (R, in_features). Indexes with int32 and makes no host round trip.
    """
    codes = packing.unpack(qweight, bits, in_features).int()        # (R, I)
    if tab.shape[0] == 1:
        vals = tab[0][codes]
    else:
        start = torch.arange(tab.shape[0], dtype=torch.int32, device=codes.device) * tab.shape[1]
        vals = tab.reshape(-1)[codes + start[:, None]]
    if scales is None:
        return vals.to(dtype)
    x = vals * grid.expand_groups(scales.float(), group_size, in_features)
    if offsets is not None:
        x = x + grid.expand_groups(offsets.float(), group_size, in_features)
    return x.to(dtype)
