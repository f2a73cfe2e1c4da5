"""QuantizedWeight: a 2-D weight held as packed codes plus per-group parameters."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import WeightConfig
from . import calibrate, grid, packing
from .formats import get_format, table
from .qins import seed_encode


@dataclass
class QuantizedWeight:
    """Stored state of one quantized (O, I) weight, G = I / group_size groups per row.

    qweight    (O, packing.packed_words(I, bits)) int32   bit-packed codes (packing.py)
    scales     (O, G) float16 or None                    group scale s (None: qins-seed)
    offsets    (O, G) float16 or None                    group offset m (int-asym only)
    curvature  (A,) float32 or None                      a per tensor (A=1) or row (A=O); qins only
    config     the WeightConfig it was made with (format, bits, group_size)
    shape      (O, I)

    G = max(1, I // group_size); the last group of a row also takes the remainder I mod g.
    """

    qweight: torch.Tensor
    scales: torch.Tensor | None
    offsets: torch.Tensor | None
    curvature: torch.Tensor | None
    config: WeightConfig
    shape: tuple[int, int]

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
            clip_search=config.clip_search, rounding=config.rounding)
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
        """(A, 2^bits) float32 on the codes' device; rebuilt from the curvature, never stored."""
        t = table(self.config.format, self.config.bits, self.curvature.cpu() if self.curvature is not None else None)
        return t.to(self.qweight.device)

    def codes(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(O, I) or (len(rows), I) uint8 codes."""
        packed = self.qweight if rows is None else self.qweight[rows]
        return packing.unpack(packed, self.config.bits, self.shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Reference decode: table lookup times scale (plus offset) -> (O, I) or (len(rows), I)."""
        codes = self.codes(rows).long()                              # (R, I)
        tab = self.decode_table()
        if tab.shape[0] == 1:
            vals = tab[0][codes]
        else:
            row_tab = tab if rows is None else tab[rows]
            vals = torch.gather(row_tab, 1, codes)
        if self.scales is None:
            return vals.to(dtype)
        g, I = self.group_size, self.shape[1]
        s = self.scales if rows is None else self.scales[rows]
        x = vals * grid.expand_groups(s.float(), g, I)           # fp32 math, then cast
        if self.offsets is not None:
            m = self.offsets if rows is None else self.offsets[rows]
            x = x + grid.expand_groups(m.float(), g, I)
        return x.to(dtype)

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

    def nbytes(self) -> int:
        """Bytes stored: packed codes (with row padding) + scales + offsets + curvature."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])
