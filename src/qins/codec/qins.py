"""The QINS number system: the seed's projective map and the calibrated, quantized format.

Continuous map (alpha > 0, the seed's "density control"):

    E(x) = sign(x) / (1 + alpha |x|)            D(z) = sign(z) (1 - |z|) / (alpha |z|)

Quantized format (DESIGN.md). A group with scale s and curvature a >= 0 uses alpha = a / s,
so |x| <= s maps to |z| in [1/(1+a), 1]. |z| is quantized uniformly on that interval into
K = 2^(b-1) - 1 steps plus a sign: level k (0..K) sits at t = k/K of the way from |z| = 1
(x = 0) to |z| = 1/(1+a) (|x| = s). Decoding it gives the closed form

    |x| / s = v(t) = t / (1 + a (1 - t))

which is continuous at a = 0 (v = t: symmetric uniform INT) and puts more levels near zero
as a grows. v(0) = 0 and v(1) = 1, so zero and the group's max are exact and no code can
decode to infinity.

Using all 2^b codes (the "spare code"): sign + magnitude leaves one code over (+0 and -0).
The default table instead uses N = 2^(b-1) steps on one side and N - 1 on the other,

    level j = sign(j) v(|j| / N),   j = -(N-1) .. N      (2^b levels, zero exact)

and the group's scale carries the sign of its largest-magnitude weight, so that weight lands
exactly on level +N. At a = 0 this is two's-complement INT (e.g. -7..8 of 8 at 4 bits) with
the extreme always on the long side. It measured better than the symmetric table at 3 and 4
bits (see tests/codec/test_tensor.py::test_default_table_beats_symmetric); `symmetric=True`
gives the 2^b - 1 level table whose spare code decodes to 0.
"""
from __future__ import annotations

import torch


def sign_nonzero(x: torch.Tensor) -> torch.Tensor:
    """sign with sign(0) = +1, so that E(0) = 1 decodes back to 0."""
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))


def encode_map(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """E(x) = sign(x) / (1 + alpha |x|)."""
    return sign_nonzero(x) / (1.0 + alpha * x.abs())


def decode_map(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """D(z) = sign(z) (1 - |z|) / (alpha |z|); D(+-1) = 0."""
    return sign_nonzero(z) * (1.0 - z.abs()) / (alpha * z.abs())


def magnitude_levels(bits: int, curvature: float | torch.Tensor) -> torch.Tensor:
    """|x|/s of levels k = 0..K, K = 2^(bits-1) - 1; shape (..., K+1) for curvature (...)."""
    k_max = 2 ** (bits - 1) - 1
    a = torch.as_tensor(curvature, dtype=torch.float64).unsqueeze(-1)
    t = torch.arange(k_max + 1, dtype=torch.float64, device=a.device) / k_max
    return t / (1.0 + a * (1.0 - t))


def _v(t: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    return t / (1.0 + a * (1.0 - t))


def qins_table(bits: int, curvature: float | torch.Tensor, symmetric: bool = False) -> torch.Tensor:
    """Decode table (..., 2^bits) float32, increasing.

    symmetric=False: 2^b levels sign(j) v(|j|/N), j = -(N-1)..N, N = 2^(b-1).
    symmetric=True:  2^b - 1 levels sign(k) v(|k|/K), K = N - 1, then the spare code -> 0.
    Built on the curvature's device in float64 (IEEE ops: the same bits on CPU and GPU), no
    host round trip.
    """
    a = torch.as_tensor(curvature, dtype=torch.float64).unsqueeze(-1)
    n = 2 ** (bits - 1)
    if symmetric:
        mag = magnitude_levels(bits, curvature)                        # (..., N)
        signed = torch.cat([-mag.flip(-1)[..., :-1], mag], dim=-1)     # (..., 2N-1)
        spare = torch.zeros(*signed.shape[:-1], 1, dtype=signed.dtype, device=a.device)
        return torch.cat([signed, spare], dim=-1).to(torch.float32)
    j = torch.arange(-(n - 1), n + 1, dtype=torch.float64, device=a.device)
    return (torch.sign(j) * _v(j.abs() / n, a)).to(torch.float32)


# The seed's Pattern A codec: global alpha = 1, z = E(x) in [-1, 1] quantized uniformly to
# 256 codes (code c <-> z = 2c/255 - 1), no scale. Reproduced as written so its claims can
# be measured; it is a baseline, not the QINS format.
SEED_ALPHA = 1.0


def seed_encode(x: torch.Tensor) -> torch.Tensor:
    z = encode_map(x.double(), SEED_ALPHA)
    return torch.round((z + 1.0) * 127.5).clamp(0, 255).to(torch.uint8)


def seed_table() -> torch.Tensor:
    """(256,) decode table of the seed codec; 255 is odd, so z = 0 (x = inf) is not a code."""
    z = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0
    return decode_map(z, SEED_ALPHA).to(torch.float32)
