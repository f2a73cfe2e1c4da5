"""Every number format behind one interface: a decode table of 2^b values per curvature.

A group decodes as  x = s * table[code] (+ m for the asymmetric format). The table is a
function of (format, bits, curvature) alone, so it is never stored: the file holds codes,
scales, offsets and curvatures, and the table is rebuilt from them.

    format     bits           table (normalized)                           group params
    qins       2,3,4,5,6,8    sign(j) v(|j|/N), j = -(N-1)..N, N = 2^(b-1)   signed s, shared a
                              v(t) = t / (1 + a(1 - t))  (qins.py)
    int-sym    2,3,4,5,6,8    k / K, k = -K..K, K = 2^(b-1) - 1            s
    int-asym   2,3,4,5,6,8    0 .. 2^b - 1                                 s, m
    nf4        4              the 16 NF4 values (normal quantiles)         s
    fp8        8              the 253 finite e4m3fn values / 448           s
    qins-seed  8              D(z), z = 2c/255 - 1, alpha = 1              none
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from . import qins as _qins
from .packing import SUPPORTED_BITS

# NF4 (Dettmers et al., QLoRA): quantiles of N(0, 1) normalized to [-1, 1], zero exact.
_NF4 = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


@dataclass(frozen=True)
class Format:
    name: str
    bits: tuple[int, ...]
    asymmetric: bool = False      # stores an offset m per group
    scaled: bool = True           # stores a scale s per group
    curved: bool = False          # has a calibrated curvature a
    signed_scale: bool = False    # scale carries the sign of the group's extreme weight
    seed_rounding: bool = False   # rounds in the z domain like the seed, not to nearest x

    def check_bits(self, bits: int) -> None:
        if bits not in self.bits:
            raise ValueError(f"format {self.name!r} supports bits {self.bits}, got {bits}")


FORMATS: dict[str, Format] = {
    "qins": Format("qins", SUPPORTED_BITS, curved=True, signed_scale=True),
    "int-sym": Format("int-sym", SUPPORTED_BITS),
    "int-asym": Format("int-asym", SUPPORTED_BITS, asymmetric=True),
    "nf4": Format("nf4", (4,)),
    "fp8": Format("fp8", (8,)),
    "qins-seed": Format("qins-seed", (8,), scaled=False, seed_rounding=True),
}


def get_format(name: str) -> Format:
    if name not in FORMATS:
        raise ValueError(f"unknown format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


@lru_cache(maxsize=None)
def _fp8_table() -> torch.Tensor:
    vals = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    vals = torch.unique(vals[torch.isfinite(vals)])               # sorted, +-0 merged: 253
    return torch.cat([vals / 448.0, torch.zeros(256 - vals.numel())])


def table(fmt: str | Format, bits: int, curvature: torch.Tensor | float | None = None) -> torch.Tensor:
    """Decode table (A, 2^bits) float32: A = curvature.numel() for qins, else 1.

    The first `n_levels(fmt, bits)` entries increase strictly; spare codes after them
    decode to 0. Exception: qins-seed keeps the seed's code order (code c <-> z = 2c/255 - 1),
    so its 256 entries are not sorted and codes 0 and 255 both decode to 0.
    """
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    f.check_bits(bits)
    if f.name == "qins":
        a = torch.as_tensor(0.0 if curvature is None else curvature, dtype=torch.float64).reshape(-1)
        return _qins.qins_table(bits, a)
    if f.name == "int-sym":
        return _qins.qins_table(bits, torch.zeros(1, dtype=torch.float64), symmetric=True)
    if f.name == "int-asym":
        return torch.arange(2**bits, dtype=torch.float32).unsqueeze(0)
    if f.name == "nf4":
        return torch.tensor(_NF4, dtype=torch.float32).unsqueeze(0)
    if f.name == "fp8":
        return _fp8_table().unsqueeze(0)
    return _qins.seed_table().unsqueeze(0)                        # qins-seed


def n_levels(fmt: str | Format, bits: int) -> int:
    """How many leading table entries are real, strictly increasing levels (qins-seed: all
    256 codes, in the seed's z order, not sorted)."""
    f = get_format(fmt) if isinstance(fmt, str) else fmt
    if f.name == "int-sym":
        return 2**bits - 1
    if f.name == "fp8":
        return 253
    return 2**bits
