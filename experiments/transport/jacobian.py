"""Jacobian weight transport (the seed's Pattern B): the math, in float64, as pure functions.

A linear layer y = W x (W: (O, I)) is to run as  x -> u = E(x) -> z = T(u) -> D(z) ~ y, with
T affine in the code u, so that no weight is decoded. E and D are the QINS maps of
`qins.codec.qins` with one global alpha:

    E(x) = sign(x) / (1 + alpha |x|)         D(z) = sign(z) (1 - |z|) / (alpha |z|)
    dE/dx = -alpha / (1 + alpha |x|)^2       dD/dz = -1 / (alpha z^2)        (x, z != 0)

Both derivatives are even functions, so a per-channel Jacobian is fixed by an operating
MAGNITUDE: a_j = mean |x_j| for input channel j and b_i = mean |y_i| for output channel i,
over calibration tokens (`OperatingPoint`). With  J = diag(dE/dx at a)  (I,) and
K = diag(dE/dx at b) = diag(1 / dD/dz at z0 = E(b))  (O,):

  variant "seed"          W' = diag(dD/dz at E(b)) . W . diag(dE/dx at a)^-1 = K^-1 W J^-1,
                          z = W' u, no offset terms: the formula exactly as the seed writes it.
  variant "first-order"   W' = diag(dD/dz at E(b))^-1 . W . diag(dE/dx at a)^-1 = K W J^-1,
                          plus the affine offset terms of the first-order expansion. The
                          seed's formula multiplies by dD/dz where this one divides.

E jumps from -1 to +1 at x = 0, so a linearization of E in x is wrong by ~2 for every
element whose sign differs from the operating point's. `signs` chooses what to do:

  "carry"  (first-order default) linearize the magnitude, carry the sign bit separately:
           |x_j| ~ a_j + (|u_j| - m_j)/J_j with m = E(a), so
               x ~ J^-1 u + c * s,      s = sign(u),  c_j = a_j - m_j / J_j = 2 a_j + 1/alpha
           and  t = K (W x^) = W' u + W'' s  with  W'' = K W diag(c). On the output side
           |z_i| ~ n_i + K_i (|y_i| - b_i), n = E(b); K < 0 so sign(y) = -sign(t) and
               z = -sign(t) * (d - |t|),   d_i = n_i - K_i b_i = (1 + 2 alpha b_i) / (1 + alpha b_i)^2
  "ignore" the linearization in x as it stands, around the (positive) operating points:
               x ~ a + J^-1 (u - E(a)),  z ~ E(b) + K (W x^ - b)  =  W' u + offset,
               offset = E(b) + K (W a - b) - W' E(a)
           valid only while every sign matches the operating point's (measured, README).

Both variants decode with D on |z| clamped to [z_min_i, 1], z_min_i = E(2 max |y_i|): the
seed's "clamp intermediate values". It keeps every output finite and within twice the
largest calibrated |y_i|; |z| > 1 is not a code (D would flip the sign), z -> 0 is D = inf.
Denominators (dE/dx and z0 in dD/dz) are clamped away from 0 by EPS.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qins.codec.qins import SEED_ALPHA, sign_nonzero

VARIANTS = ("seed", "first-order")
SIGNS = ("carry", "ignore")
EPS = 1e-12                # clamp of the Jacobian denominators (float64)
CLAMP_MARGIN = 2.0         # decode range: |D(z)| <= CLAMP_MARGIN * max calibrated |y_i|


def encode(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """E(x) = sign(x) / (1 + alpha |x|), sign(0) = +1."""
    return sign_nonzero(x) / (1.0 + alpha * x.abs())


def decode(z: torch.Tensor, alpha: float, z_min: torch.Tensor | float = 0.0) -> torch.Tensor:
    """D(z) = sign(z) (1 - |z|) / (alpha |z|) with |z| clamped to [z_min, 1] (z_min broadcasts)."""
    m = torch.maximum(z.abs(), torch.as_tensor(z_min, dtype=z.dtype, device=z.device)).clamp(max=1.0)
    m = m.clamp_min(torch.finfo(z.dtype).tiny)
    return sign_nonzero(z) * (1.0 - m) / (alpha * m)


def d_encode(x: torch.Tensor, alpha: float) -> torch.Tensor:
    """dE/dx = -alpha / (1 + alpha |x|)^2, elementwise (x != 0)."""
    return -alpha / (1.0 + alpha * x.abs()) ** 2


def d_decode(z: torch.Tensor, alpha: float) -> torch.Tensor:
    """dD/dz = -1 / (alpha z^2), elementwise (z != 0); |z| is clamped to >= EPS."""
    return -1.0 / (alpha * z.abs().clamp_min(EPS) ** 2)


@dataclass
class OperatingPoint:
    """Per-channel calibration statistics of one linear layer y = W x (bias excluded).

    x_abs   (I,) float64   mean |x_j| over calibration tokens: input operating magnitudes a
    y_abs   (O,) float64   mean |y_i|: output operating magnitudes b
    y_max   (O,) float64   max |y_i|: sets the decode clamp
    tokens  number of calibration tokens
    """

    x_abs: torch.Tensor
    y_abs: torch.Tensor
    y_max: torch.Tensor
    tokens: int

    @classmethod
    def from_samples(cls, x: torch.Tensor, w: torch.Tensor) -> "OperatingPoint":
        """From calibration inputs x (N, I) and the weight w (O, I)."""
        x = x.double().reshape(-1, x.shape[-1])
        y = x @ w.double().t()                                       # (N, O)
        return cls(x.abs().mean(0), y.abs().mean(0), y.abs().amax(0), x.shape[0])


@dataclass
class Transport:
    """A transported weight: z = T(u) for u = E(x), then y = D(z) (+ bias, in float).

    weight      (O, I) float64   W' (multiplies u)
    sign_shift  (I,) float64     e = c * J, signs="carry": t = W' (u + e * sign(u)) = W' u + W'' s
                                 with W'' = W' diag(e) = K W diag(c); None otherwise
    offset      (O,) float64     additive z offset (first-order, signs="ignore"); None otherwise
    level       (O,) float64     d: |z| = d - |t| (signs="carry"); None otherwise
    z_min       (O,) float64     decode clamp: |z| in [z_min, 1]
    alpha, variant, signs
    """

    weight: torch.Tensor
    sign_shift: torch.Tensor | None
    offset: torch.Tensor | None
    level: torch.Tensor | None
    z_min: torch.Tensor
    alpha: float
    variant: str
    signs: str

    def code_output(self, u: torch.Tensor) -> torch.Tensor:
        """z (..., O) from the code u (..., I), in u's dtype; no weight decode."""
        w = self.weight.to(u.dtype)
        if self.sign_shift is not None:
            u = u + self.sign_shift.to(u.dtype) * sign_nonzero(u)
        t = u @ w.t()                                                # (..., O)
        if self.level is not None:
            # z = -sign(t) (d - |t|): K < 0, so sign(y) = -sign(t). Past the tangent's root
            # (|t| > d) keep the sign and let the decode clamp take |z| up to z_min
            mag = (self.level.to(t.dtype) - t.abs()).clamp_min(torch.finfo(t.dtype).tiny)
            return -sign_nonzero(t) * mag
        if self.offset is not None:
            t = t + self.offset.to(t.dtype)
        return t

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """y ~ W x for float x (..., I): E, the code matmul, then D (clamped)."""
        z = self.code_output(encode(x, self.alpha))
        return decode(z, self.alpha, self.z_min.to(z.dtype))

    def to(self, dtype: torch.dtype) -> "Transport":
        cast = lambda t: None if t is None else t.to(dtype)          # noqa: E731
        return Transport(cast(self.weight), cast(self.sign_shift), cast(self.offset), cast(self.level),
                         cast(self.z_min), self.alpha, self.variant, self.signs)


def transport(w: torch.Tensor, op: OperatingPoint, variant: str = "first-order", alpha: float = SEED_ALPHA,
              signs: str = "carry") -> Transport:
    """Transport the weight w (O, I) at the operating point `op`; all math in float64.

    variant "seed": W' = dD/dz . W . (dE/dx)^-1 as written (signs ignored, no offsets).
    variant "first-order": W' = (dD/dz)^-1 . W . (dE/dx)^-1 with its offset terms; `signs`
    "carry" (sign bit carried, magnitudes linearized) or "ignore" (see the module docstring).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if signs not in SIGNS:
        raise ValueError(f"signs must be one of {SIGNS}, got {signs!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    w = w.detach().double().cpu()
    a, b = op.x_abs.double().cpu(), op.y_abs.double().cpu()
    if w.shape != (b.numel(), a.numel()):
        raise ValueError(f"weight {tuple(w.shape)} does not match the operating point ({b.numel()}, {a.numel()})")
    J = d_encode(a, alpha)                                           # (I,) dE/dx at a
    J = torch.where(J.abs() < EPS, torch.full_like(J, -EPS), J)      # clamped denominator
    z0 = encode(b, alpha)                                            # (O,) E(b), in (0, 1]
    Jd = d_decode(z0, alpha)                                         # (O,) dD/dz at E(b)
    z_min = encode(CLAMP_MARGIN * op.y_max.double().cpu(), alpha)
    if variant == "seed":
        wt = Jd[:, None] * w / J[None, :]                            # (O, I)
        return Transport(wt, None, None, None, z_min, alpha, variant, "ignore")
    K = 1.0 / Jd                                                     # (O,) = dE/dx at b
    wt = K[:, None] * w / J[None, :]                                 # (O, I) W' = K W J^-1
    if signs == "carry":
        m = encode(a, alpha)                                         # (I,) E(a) > 0
        c = a - m / J                                                # = 2a + 1/alpha
        level = z0 - K * b                                           # d = E(b) + |K| b
        return Transport(wt, c * J, None, level, z_min, alpha, variant, signs)
    offset = z0 + K * (w @ a - b) - wt @ encode(a, alpha)
    return Transport(wt, None, offset, None, z_min, alpha, variant, signs)
