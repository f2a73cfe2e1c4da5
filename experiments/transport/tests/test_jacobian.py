"""The transport math against a direct float64 evaluation of its formulas, and its limits.

Cases: random (O, I) = (7, 5), (33, 64), (64, 33) (odd next to round, wide and tall),
weights N(0, 1/I), inputs N(0, 1) times a per-channel scale in [0, 3) (mixed signs),
operating points from 100 calibration rows, errors on 100 other rows. All float64.
"""
from __future__ import annotations

import pytest
import torch

from experiments.transport.jacobian import (CLAMP_MARGIN, OperatingPoint, d_decode, d_encode, decode, encode,
                                     transport)

SHAPES = [(7, 5), (33, 64), (64, 33)]
IDS = [f"{o}x{i}" for o, i in SHAPES]
F64 = torch.float64


def case(shape, seed=0, positive=False):
    """(W (O, I), calibration X (100, I), held-out X (100, I)), float64."""
    O, I = shape
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, I, generator=g, dtype=F64) / I ** 0.5
    x = torch.randn(200, I, generator=g, dtype=F64) * torch.rand(I, generator=g, dtype=F64) * 3
    if positive:
        w, x = w.abs(), x.abs()
    return w, x[:100], x[100:]


def rel(a, b):
    return float((a - b).norm() / b.norm())


# -- the maps and their derivatives ---------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.0, 0.37, 1e-3])
def test_derivatives_equal_autograd(alpha):
    x = torch.tensor([-7.5, -1.0, -0.2, 0.3, 1.0, 4.0], dtype=F64, requires_grad=True)
    (gx,) = torch.autograd.grad(encode(x, alpha).sum(), x)
    torch.testing.assert_close(d_encode(x.detach(), alpha), gx, rtol=1e-14, atol=0)
    z = torch.tensor([-0.9, -0.3, -0.05, 0.02, 0.5, 0.99], dtype=F64, requires_grad=True)
    (gz,) = torch.autograd.grad(decode(z, alpha).sum(), z)
    torch.testing.assert_close(d_decode(z.detach(), alpha), gz, rtol=1e-14, atol=0)


def test_decode_inverts_encode_and_clamps():
    x = torch.linspace(-50, 50, 1001, dtype=F64)
    torch.testing.assert_close(decode(encode(x, 0.7), 0.7), x, rtol=1e-12, atol=1e-12)
    z = torch.tensor([1.5, -2.0, 1e-30, -1e-30], dtype=F64)          # not codes: clamped
    out = decode(z, 1.0, z_min=torch.tensor(0.5, dtype=F64))
    assert torch.equal(out, torch.tensor([0.0, -0.0, 1.0, -1.0], dtype=F64))   # |D| <= (1-0.5)/0.5


# -- each variant equals its formula, evaluated directly ---------------------------------------
def direct_parts(w, xcal, alpha):
    """Operating magnitudes and the diagonal Jacobians by autograd, no library code."""
    a = xcal.abs().mean(0)                                            # (I,)
    y = xcal @ w.t()
    b, ymax = y.abs().mean(0), y.abs().amax(0)                        # (O,)

    def grad(f, v):
        v = v.clone().requires_grad_(True)
        (gv,) = torch.autograd.grad(f(v).sum(), v)
        return gv

    J = grad(lambda v: 1 / (1 + alpha * v), a)                        # dE/dx at a (positive side)
    z0 = 1 / (1 + alpha * b)
    Jd = grad(lambda v: (1 - v) / (alpha * v), z0)                    # dD/dz at E(b)
    zmin = 1 / (1 + alpha * CLAMP_MARGIN * ymax)
    return a, b, J, z0, Jd, zmin


def D(z, alpha, zmin):
    m = torch.minimum(torch.maximum(z.abs(), zmin), torch.ones_like(z))
    return torch.where(z < 0, -1.0, 1.0) * (1 - m) / (alpha * m)


def E(x, alpha):
    return torch.where(x < 0, -1.0, 1.0) / (1 + alpha * x.abs())


@pytest.mark.parametrize("alpha", [1.0, 0.05])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_seed_variant_is_the_seed_formula(shape, alpha):
    w, xcal, xt = case(shape)
    a, b, J, z0, Jd, zmin = direct_parts(w, xcal, alpha)
    wp = torch.diag(Jd) @ w @ torch.diag(1 / J)                      # W' = dD/dz . W . (dE/dx)^-1
    t = transport(w, OperatingPoint.from_samples(xcal, w), "seed", alpha)
    # float64 evaluations of the same products in another order: agree to rounding (~1e-16)
    torch.testing.assert_close(t.weight, wp, rtol=1e-13, atol=1e-13)
    assert t.offset is None and t.sign_shift is None and t.level is None
    # the seed's z sums terms of size ~1/alpha^2 and D takes 1 - |z|: cancellation; measured
    # worst difference 4.8e-12 (33x64, alpha 0.05), so atol 1e-10
    torch.testing.assert_close(t(xt), D(E(xt, alpha) @ wp.t(), alpha, zmin), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("alpha", [1.0, 0.05])
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_first_order_carry_is_its_formula(shape, alpha):
    w, xcal, xt = case(shape)
    a, b, J, z0, Jd, zmin = direct_parts(w, xcal, alpha)
    K = 1 / Jd                                                        # = dE/dx at b
    wp = torch.diag(K) @ w @ torch.diag(1 / J)                        # W' = (dD/dz)^-1 W (dE/dx)^-1
    c = a - (1 / (1 + alpha * a)) / J                                 # |x| ~ a + (|u| - E(a)) / J
    torch.testing.assert_close(c, 2 * a + 1 / alpha, rtol=1e-13, atol=1e-13)
    wpp = torch.diag(K) @ w @ torch.diag(c)                           # W'' multiplies sign(u)
    d = z0 - K * b
    u = E(xt, alpha)
    tt = u @ wp.t() + torch.where(u < 0, -1.0, 1.0).to(F64) @ wpp.t()
    z = torch.where(tt < 0, 1.0, -1.0) * (d - tt.abs()).clamp_min(1e-300)
    t = transport(w, OperatingPoint.from_samples(xcal, w), "first-order", alpha, "carry")
    torch.testing.assert_close(t.weight, wp, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(t(xt), D(z, alpha, zmin), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_first_order_ignore_is_the_plain_expansion(shape):
    alpha = 0.3
    w, xcal, xt = case(shape)
    a, b, J, z0, Jd, zmin = direct_parts(w, xcal, alpha)
    K = 1 / Jd
    u = E(xt, alpha)
    xhat = a + (u - 1 / (1 + alpha * a)) / J                          # x ~ x0 + J^-1 (u - u0)
    z = z0 + K * (xhat @ w.t() - b)                                   # z ~ E(y0) + K (y - y0)
    t = transport(w, OperatingPoint.from_samples(xcal, w), "first-order", alpha, "ignore")
    torch.testing.assert_close(t(xt), D(z, alpha, zmin), rtol=1e-11, atol=1e-11)


# -- limits ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_first_order_is_exact_at_its_operating_point(shape):
    # calibrated on one input, applied to it: every |x_j| and |y_i| sits on its operating point
    w, xcal, _ = case(shape)
    x = xcal[:1]
    for alpha in (1.0, 0.05):
        t = transport(w, OperatingPoint.from_samples(x, w), "first-order", alpha, "carry")
        torch.testing.assert_close(t(x), x @ w.t(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=IDS)
def test_first_order_becomes_exact_as_curvature_vanishes(shape):
    """E linear (alpha -> 0): the error of the first-order variant -> 0, linearly in alpha.

    Measured relative errors (carry) at alpha = 1e-1, 1e-2, 1e-3, 1e-4, 1e-6: 7.2e-2 .. 8.1e-7
    (7x5), 1.1e-1 .. 1.4e-6 (33x64), 1.3e-1 .. 1.5e-6 (64x33): the ratio err/alpha stays
    within 0.7..1.6 over five decades. Bounds: err <= 3 alpha, and a 100x drop per 100x alpha
    within a factor 2.
    """
    w, xcal, xt = case(shape)
    op = OperatingPoint.from_samples(xcal, w)
    y = xt @ w.t()
    errs = {a: rel(transport(w, op, "first-order", a, "carry")(xt), y) for a in (1e-2, 1e-4, 1e-6)}
    for a, e in errs.items():
        assert e <= 3 * a, (a, e)
    assert 50 < errs[1e-2] / errs[1e-4] < 200 and 50 < errs[1e-4] / errs[1e-6] < 200


def test_ignoring_signs_is_exact_only_without_sign_changes():
    # positive W and x: the plain expansion converges like the carried one (measured
    # 4.4e-7 .. 8.6e-7 at alpha 1e-6); mixed signs: the jump of E at 0 stays, error ~3.5-3.8
    for shape in SHAPES:
        w, xcal, xt = case(shape, positive=True)
        e = rel(transport(w, OperatingPoint.from_samples(xcal, w), "first-order", 1e-6, "ignore")(xt), xt @ w.t())
        assert e < 3e-6
        w, xcal, xt = case(shape)
        e = rel(transport(w, OperatingPoint.from_samples(xcal, w), "first-order", 1e-6, "ignore")(xt), xt @ w.t())
        assert e > 1.0


def test_seed_formula_is_not_exact_even_when_e_is_linear():
    # it multiplies by dD/dz = -1/(alpha z^2) where first order divides, and has no offsets:
    # as alpha -> 0 its codes leave [-1, 1] and decode to 0 (measured error 1.00 at alpha <= 1e-2)
    for shape in SHAPES:
        w, xcal, xt = case(shape)
        e = rel(transport(w, OperatingPoint.from_samples(xcal, w), "seed", 1e-4)(xt), xt @ w.t())
        assert e > 0.99


def test_bad_arguments():
    w, xcal, _ = case((7, 5))
    op = OperatingPoint.from_samples(xcal, w)
    with pytest.raises(ValueError, match="variant"):
        transport(w, op, "second-order")
    with pytest.raises(ValueError, match="signs"):
        transport(w, op, signs="drop")
    with pytest.raises(ValueError, match="alpha"):
        transport(w, op, alpha=0.0)
    with pytest.raises(ValueError, match="does not match"):
        transport(w.t(), op)
