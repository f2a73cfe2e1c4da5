"""The QINS number system (codec/qins.py): the seed's maps, the closed-form levels, the tables.

References are computed here from the formulas of DESIGN.md ("The QINS number system"):

    E(x) = sign(x) / (1 + alpha |x|)        D(z) = sign(z) (1 - |z|) / (alpha |z|)
"""
from __future__ import annotations

import math

import pytest
import torch

from qins.codec import qins

BITS = (2, 3, 4, 5, 6, 8)
ALPHAS = (1e-3, 0.1, 1.0, 7.5, 1e3)
EPS64 = torch.finfo(torch.float64).eps


def _log_uniform(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp(torch.empty(n, dtype=torch.float64).uniform_(math.log(lo), math.log(hi), generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return sign * mag


# -- the continuous maps -------------------------------------------------------------------
@pytest.mark.parametrize("alpha", ALPHAS)
def test_decode_inverts_encode(alpha):
    # alpha|x| spans 1e-4 .. 1e4. D(E(x)) computes 1 - |z| with |z| ~ 1/(1 + alpha|x|): the
    # cancellation costs a relative error ~ eps / (alpha|x|): measured max
    # 1.65 eps (1 + 1/(alpha|x|)) over these alphas. rtol = 8 eps (1 + 1/(alpha|x|)), i.e.
    # 1.8e-11 at the smallest alpha|x| here, 1.8e-15 at the largest.
    x = _log_uniform(20_000, 1e-4 / alpha, 1e4 / alpha, seed=1)
    back = qins.decode_map(qins.encode_map(x, alpha), alpha)
    rtol = 8 * EPS64 * (1.0 + 1.0 / (alpha * x.abs()))
    assert ((back - x).abs() <= rtol * x.abs()).all()
    assert torch.equal(torch.sign(back), torch.sign(x))


@pytest.mark.parametrize("alpha", ALPHAS)
def test_encode_inverts_decode(alpha):
    # z in [-1, 1] without a neighbourhood of 0 (D(0) = inf). Measured max relative error
    # 2.9e-16 (~1.3 eps) for every alpha here; rtol = 8 eps.
    g = torch.Generator().manual_seed(2)
    z = torch.rand(20_000, generator=g, dtype=torch.float64) * 2 - 1
    z = z[z.abs() > 1e-6]
    back = qins.encode_map(qins.decode_map(z, alpha), alpha)
    torch.testing.assert_close(back, z, rtol=8 * EPS64, atol=0.0)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_encode_range_and_monotone(alpha):
    x = torch.linspace(-1e3, 1e3, 10_001, dtype=torch.float64)
    z = qins.encode_map(x, alpha)
    assert (z.abs() <= 1).all() and (z.abs() > 0).all()
    # small |x| near |z| = 1, large |x| near 0: |z| decreases with |x| on each side
    pos = z[x > 0]
    assert (pos[1:] < pos[:-1]).all()


def test_zero_maps_to_one_and_back():
    # sign(0) = +1: E(0) = 1 and D(+-1) = 0, exactly
    for alpha in ALPHAS:
        assert qins.encode_map(torch.zeros(1, dtype=torch.float64), alpha).item() == 1.0
        d = qins.decode_map(torch.tensor([1.0, -1.0], dtype=torch.float64), alpha)
        assert d.tolist() == [0.0, 0.0]
    assert qins.sign_nonzero(torch.tensor([0.0, -0.0, 2.0, -3.0])).tolist() == [1.0, 1.0, 1.0, -1.0]


# -- the quantized magnitude levels --------------------------------------------------------
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("a", (0.05, 0.5, 1.0, 4.5, 20.0, 1000.0))
def test_magnitude_levels_are_the_decoded_uniform_z_grid(bits, a):
    # Direct evaluation of the seed's maps: scale s, alpha = a/s. |z| runs uniformly from 1
    # (x = 0) to E(s) = 1/(1+a) (|x| = s) in K steps; D of each grid point, divided by s,
    # must equal the closed form t / (1 + a(1 - t)). Both float64; z_end = 1/(1+a) carries
    # a rounding that D amplifies ~a times: measured max abs difference 3.4e-14 at a = 1000
    # (0.15 eps a), 1.1e-15 at a = 0.05 (5 eps). atol = 16 eps (1 + a).
    s = 0.037
    k_max = 2 ** (bits - 1) - 1
    alpha = a / s
    z_end = qins.encode_map(torch.tensor([s], dtype=torch.float64), alpha)
    t = torch.arange(k_max + 1, dtype=torch.float64) / k_max
    z = 1.0 - t * (1.0 - z_end)
    ref = qins.decode_map(z, alpha) / s
    got = qins.magnitude_levels(bits, a)
    assert got.shape == (k_max + 1,) and got.dtype == torch.float64
    torch.testing.assert_close(got, ref, rtol=0.0, atol=16 * EPS64 * (1 + a))
    assert got[0].item() == 0.0 and got[-1].item() == 1.0            # zero and max exact


@pytest.mark.parametrize("bits", BITS)
def test_magnitude_levels_uniform_at_zero_curvature(bits):
    k_max = 2 ** (bits - 1) - 1
    expect = torch.arange(k_max + 1, dtype=torch.float64) / k_max
    assert torch.equal(qins.magnitude_levels(bits, 0.0), expect)


def test_magnitude_levels_batched():
    a = torch.tensor([0.0, 1.0, 9.0])
    got = qins.magnitude_levels(4, a)
    assert got.shape == (3, 8)
    for i in range(3):
        assert torch.equal(got[i], qins.magnitude_levels(4, float(a[i])))


# -- the decode tables ---------------------------------------------------------------------
CURVS = (0.0, 0.25, 1.0, 4.5, 20.0, 100.0, 1000.0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("a", CURVS)
def test_default_table_properties(bits, a):
    t = qins.qins_table(bits, a)
    assert t.dtype == torch.float32 and t.shape == (2**bits,)
    assert torch.isfinite(t).all()
    assert (t[1:] > t[:-1]).all()                                     # strictly increasing, float32
    assert (t == 0).sum().item() == 1                                 # zero exact, once
    assert t[-1].item() == 1.0                                        # the group max, exactly
    assert t[0].item() > -1.0                                         # short side: -(N-1) levels
    n = 2 ** (bits - 1)
    assert t[n - 1].item() == 0.0                                     # code N-1 is zero


@pytest.mark.parametrize("bits", BITS)
def test_default_table_at_zero_is_twos_complement_int(bits):
    # a = 0: j/N for j = -(N-1)..N, e.g. -7..8 of 8 at 4 bits (exact in float32: N is a power of 2)
    n = 2 ** (bits - 1)
    expect = torch.arange(-(n - 1), n + 1, dtype=torch.float32) / n
    assert torch.equal(qins.qins_table(bits, 0.0), expect)


@pytest.mark.parametrize("bits", BITS)
def test_default_table_matches_closed_form(bits):
    # sign(j) v(|j|/N); float64 closed form cast to float32 -> equal to the last bit
    n = 2 ** (bits - 1)
    for a in (0.5, 3.0):
        j = torch.arange(-(n - 1), n + 1, dtype=torch.float64)
        t = j.abs() / n
        expect = (torch.sign(j) * t / (1 + a * (1 - t))).float()
        assert torch.equal(qins.qins_table(bits, a), expect)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("a", CURVS)
def test_symmetric_table_properties(bits, a):
    t = qins.qins_table(bits, a, symmetric=True)
    k = 2 ** (bits - 1) - 1
    assert t.shape == (2**bits,) and t.dtype == torch.float32
    assert torch.isfinite(t).all()
    levels = t[:-1]                                                   # 2K+1 real levels
    assert (levels[1:] > levels[:-1]).all()
    assert t[-1].item() == 0.0                                        # spare code decodes to 0
    assert levels[k].item() == 0.0
    assert levels[0].item() == -1.0 and levels[-1].item() == 1.0
    assert torch.equal(levels, -levels.flip(0))                      # symmetric to the bit


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_table_at_zero_is_int_sym(bits):
    k = 2 ** (bits - 1) - 1
    expect = (torch.arange(-k, k + 1, dtype=torch.float64) / k).float()
    t = qins.qins_table(bits, 0.0, symmetric=True)
    assert torch.equal(t[:-1], expect)
    assert t[-1].item() == 0.0


@pytest.mark.parametrize("symmetric", (False, True))
def test_table_batched_over_curvature(symmetric):
    a = torch.tensor([0.0, 2.0, 50.0], dtype=torch.float64)
    t = qins.qins_table(4, a, symmetric=symmetric)
    assert t.shape == (3, 16)
    for i in range(3):
        assert torch.equal(t[i], qins.qins_table(4, float(a[i]), symmetric=symmetric))


@pytest.mark.parametrize("bits", (3, 4, 8))
@pytest.mark.parametrize("symmetric", (False, True))
def test_larger_curvature_more_levels_near_zero(bits, symmetric):
    # count of levels with |x|/s < 0.1 never decreases as a grows, and grows overall
    grid = (0.0, 0.5, 1.0, 2.0, 4.5, 9.0, 20.0, 100.0, 1000.0)
    counts = [int((qins.qins_table(bits, a, symmetric=symmetric).abs() < 0.1).sum()) for a in grid]
    assert counts == sorted(counts)
    assert counts[-1] > counts[0]
    # and each positive level moves towards zero: v(t) decreases in a for 0 < t < 1
    mags = qins.magnitude_levels(bits, torch.tensor(grid))
    assert (mags[1:, 1:-1] < mags[:-1, 1:-1]).all()


def test_no_inf_or_nan_over_curvature_range():
    a = torch.cat([torch.linspace(0, 10, 101), torch.logspace(1, 3, 41)]).double()  # 0 .. 1000
    for bits in BITS:
        for symmetric in (False, True):
            t = qins.qins_table(bits, a, symmetric=symmetric)
            assert torch.isfinite(t).all()
            assert (t.abs() <= 1).all()


# -- the seed's Pattern A codec ------------------------------------------------------------
def test_seed_table():
    t = qins.seed_table()
    assert t.shape == (256,) and t.dtype == torch.float32
    # 255 is odd, so z = 0 (x = inf) is no code: the table is finite; |x| <= D(1/255) = 254
    assert torch.isfinite(t).all()
    assert t.abs().max().item() == pytest.approx(254.0, rel=1e-6)    # float32 of 254.000...
    # code c <-> z = 2c/255 - 1: codes in z order, not value order. Negative half decreases
    # from -0 to -254 (codes 0..127), positive half decreases from 254 to 0 (128..255).
    assert (t[:128] <= 0).all() and (t[128:] >= 0).all()
    assert (t[1:128] < t[:127]).all() and (t[129:] < t[128:255]).all()
    assert t[0].item() == 0.0 and t[255].item() == 0.0


def test_seed_encode_zero():
    # E(0) = 1 (sign(0) = +1) -> code 255 -> decodes to 0
    code = qins.seed_encode(torch.zeros(3))
    assert code.dtype == torch.uint8 and code.tolist() == [255, 255, 255]
    assert qins.seed_table()[255].item() == 0.0


def test_seed_encode_decode_round_trip_on_codes():
    # every code's value encodes back to the same code, except code 0 (-0.0, read as +0 by
    # sign(0) = +1), which lands on 255 with the same value 0
    t = qins.seed_table()
    back = qins.seed_encode(t).long()
    expect = torch.arange(256)
    expect[0] = 255
    assert torch.equal(back, expect)


def test_seed_encode_rounds_in_z():
    # reference: round((E(x) + 1) * 127.5), alpha = 1, clamped to 0..255
    x = _log_uniform(5000, 1e-4, 1e4, seed=3)
    z = torch.sign(x) / (1 + x.abs())
    ref = torch.round((z + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    assert torch.equal(qins.seed_encode(x), ref)
