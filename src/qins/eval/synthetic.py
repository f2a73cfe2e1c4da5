"""Synthetic sources with a known density: how far each format is from the best possible.

For i.i.d. unit-variance Gaussian and Laplacian matrices two references are exact:

Lloyd-Max (fixed rate, `levels` reconstruction values, MSE): the best scalar quantizer with
that many levels for the known density. `lloyd_max` computes it by Lloyd iterations on the
half line (the optimum is symmetric), with closed-form cell integrals (no sampling):

    Gaussian  phi(x) = exp(-x^2/2) / sqrt(2 pi)
        P[a,b]    = (erfc(a/sqrt2) - erfc(b/sqrt2)) / 2          (erfc: no loss in the tail)
        int x     = phi(a) - phi(b)
        int x^2   = P[a,b] + a phi(a) - b phi(b)
    Laplacian f(x) = (lam/2) exp(-lam |x|), lam = sqrt(2)       (variance 2/lam^2 = 1)
        P[a,b]    = (e^{-lam a} - e^{-lam b}) / 2                                  0 <= a < b
        int x     = ((a + 1/lam) e^{-lam a} - (b + 1/lam) e^{-lam b}) / 2
        int x^2   = ((a^2 + 2a/lam + 2/lam^2) e^{-lam a} - (same at b)) / 2

Rate-distortion bound (any quantizer, any block length, entropy coding allowed), MSE D at a
rate of R bits per sample, unit variance, SNR = -10 log10 D:

    Gaussian   D(R) = 2^{-2R}                  SNR = 20 log10(2) R   = 6.0206 R dB  (exact)
    Laplacian  Shannon lower bound  R(D) >= h(X) - 1/2 log2(2 pi e D), with the differential
               entropy h(X) = log2(2 e b) bits for scale b = 1/sqrt(2) (variance 2 b^2 = 1):
                   D >= 2^{2h} / (2 pi e) 2^{-2R} = (2 e b)^2 / (2 pi e) 2^{-2R} = (e / pi) 2^{-2R}
               SNR <= 6.0206 R + 10 log10(pi / e) = 6.0206 R + 0.6276 dB
               The bound is approached as D -> 0 (it is tight in the limit, not exactly at a
               finite rate: a Laplacian is not a Gaussian-smoothed density), so the distance
               reported from it is an upper bound on the distance from the true R(D).

`synthetic_report` quantizes such matrices with each format (`QuantizedWeight.from_float`)
and reports, per row, the SQNR against the Lloyd-Max quantizer with the same number of
levels (2^bits) and against the bound at the rate that counts every stored bit (R = bpw).
Grouped formats rescale every group to its own max |x|, so on a finite sample they can beat
the global Lloyd-Max quantizer: the gap column then goes negative, and that is reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..metrics import render
from ..metrics.render import Column

DENSITIES = ("gaussian", "laplacian")
DB_PER_BIT = 20.0 * math.log10(2.0)                  # 6.0206 dB
LAPLACE_SLB_DB = 10.0 * math.log10(math.pi / math.e)  # 0.6276 dB
_LAM = math.sqrt(2.0)                                # Laplacian rate at unit variance


def snr_db(mse: float, power: float = 1.0) -> float:
    return 10.0 * math.log10(power / mse)


# -- cell integrals over [a, b], 0 <= a < b <= inf, float64 -------------------------------
def _cell_moments(density: str, a: torch.Tensor, b: torch.Tensor):
    """(P, int x f, int x^2 f) of each cell [a_i, b_i] on the positive half line."""
    if density == "gaussian":
        r2 = math.sqrt(2.0)
        phi_a = torch.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        phi_b = torch.exp(-0.5 * b * b) / math.sqrt(2.0 * math.pi)   # inf -> 0
        p = 0.5 * (torch.special.erfc(a / r2) - torch.special.erfc(b / r2))
        m1 = phi_a - phi_b
        b_phi_b = torch.where(torch.isinf(b), torch.zeros_like(b), b * phi_b)
        m2 = p + a * phi_a - b_phi_b
        return p, m1, m2
    if density == "laplacian":
        ea, eb = torch.exp(-_LAM * a), torch.exp(-_LAM * b)
        fin = ~torch.isinf(b)
        bb = torch.where(fin, b, torch.zeros_like(b))
        p = 0.5 * (ea - eb)
        m1 = 0.5 * ((a + 1 / _LAM) * ea - torch.where(fin, (bb + 1 / _LAM) * eb, torch.zeros_like(b)))
        q = lambda x: x * x + 2 * x / _LAM + 2 / _LAM**2            # noqa: E731
        m2 = 0.5 * (q(a) * ea - torch.where(fin, q(bb) * eb, torch.zeros_like(b)))
        return p, m1, m2
    raise ValueError(f"unknown density {density!r}; choose one of {DENSITIES}")


@dataclass(frozen=True)
class LloydMax:
    """The MSE-optimal `levels`-level scalar quantizer of a unit-variance density.

    thresholds  (levels - 1,) decision boundaries, increasing
    levels      (levels,) reconstruction values, increasing (0 is one of them iff odd)
    mse         mean squared error (the variance is 1)
    sqnr_db     -10 log10(mse)
    iterations  Newton / Lloyd iterations run
    """

    density: str
    thresholds: tuple[float, ...]
    levels: tuple[float, ...]
    mse: float
    sqnr_db: float
    iterations: int

    def __iter__(self):                     # thresholds, levels, mse, sqnr_db = lloyd_max(...)
        return iter((self.thresholds, self.levels, self.mse, self.sqnr_db))


def _pdf(density: str, x: torch.Tensor) -> torch.Tensor:
    if density == "gaussian":
        return torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return 0.5 * _LAM * torch.exp(-_LAM * x)


@lru_cache(maxsize=None)
def lloyd_max(density: str, levels: int, tol: float = 1e-12, max_iter: int = 10_000) -> LloydMax:
    """Lloyd-Max quantizer of a unit-variance `density` with `levels` reconstruction values.

    Solves the Lloyd conditions (thresholds at the midpoints of adjacent levels, each level
    at its cell's centroid, exact integrals: module docstring) on the positive half line, the
    optimum being symmetric; for an odd count the level at 0 stays there. Starts from the
    asymptotically optimal compander (point density ~ f^(1/3)); each iteration takes the
    Newton step on centroid(y) - y = 0 (tridiagonal Jacobian) when it lowers the MSE and a
    plain Lloyd step otherwise, until no level moves by more than `tol` (plain Lloyd needs
    ~50,000 iterations at 256 levels; Newton ~10). The MSE is then converged far below 1e-6
    relative (it is stationary in the levels).
    """
    if density not in DENSITIES:
        raise ValueError(f"unknown density {density!r}; choose one of {DENSITIES}")
    if levels < 2:
        raise ValueError("levels must be >= 2")
    odd = levels % 2
    m = levels // 2                                          # free positive levels
    # compander start: f^(1/3) is again Gaussian (variance 3) / Laplacian (rate lam/3)
    u = (torch.arange(m, dtype=torch.float64) + 0.5 + 0.5 * odd) / (m + 0.5 * odd)
    if density == "gaussian":
        y = math.sqrt(6.0) * torch.special.erfinv(u)
    else:
        y = -3.0 / _LAM * torch.log1p(-u)
    inf = torch.tensor([math.inf], dtype=torch.float64)
    zero = torch.zeros(1, dtype=torch.float64)

    def cells(y):
        """Cell bounds of the free levels y (m,) on the half line; odd: level 0 sits below."""
        t = 0.5 * (y[1:] + y[:-1])
        lo = torch.cat([0.5 * y[:1] if odd else zero, t])
        return lo, torch.cat([t, inf])

    def mse_of(y):
        lo, hi = cells(y)
        p, m1, m2 = _cell_moments(density, lo, hi)
        err = 2.0 * (m2 - 2 * y * m1 + y * y * p).sum()
        if odd:                                              # zero level's cell [-y1/2, y1/2]
            _, _, z2 = _cell_moments(density, zero, lo[:1])
            err = err + 2.0 * z2.sum()
        return float(err)

    def centroid_and_jacobian(y):
        lo, hi = cells(y)
        p, m1, _ = _cell_moments(density, lo, hi)
        c = m1 / p
        # dc/db = f(b)(b - c)/P, dc/da = f(a)(c - a)/P; a, b are midpoints (half of each y)
        fb = torch.where(torch.isinf(hi), torch.zeros_like(hi), _pdf(density, hi.clamp(max=1e300)))
        dcdb = torch.where(torch.isinf(hi), torch.zeros_like(hi), fb * (hi.clamp(max=1e300) - c) / p)
        dcda = _pdf(density, lo) * (c - lo) / p
        if not odd:
            dcda[0] = 0.0                                    # a = 0 is fixed by symmetry
        J = torch.zeros(m, m, dtype=torch.float64)
        i = torch.arange(m)
        J[i, i] = 0.5 * (dcda + dcdb)
        J[i[1:], i[1:] - 1] = 0.5 * dcda[1:]
        J[i[:-1], i[:-1] + 1] = 0.5 * dcdb[:-1]
        return c, J

    err = mse_of(y)
    for it in range(1, max_iter + 1):
        c, J = centroid_and_jacobian(y)
        F = c - y
        cand = y - torch.linalg.solve(J - torch.eye(m, dtype=torch.float64), F)
        ok = bool((cand > 0).all() and (cand[1:] > cand[:-1]).all())
        new_err = mse_of(cand) if ok else math.inf
        if not new_err <= err:
            cand, new_err = c, mse_of(c)                     # Lloyd step: never raises the MSE
        step = float((cand - y).abs().max())
        y, err = cand, new_err
        if step < tol:
            break
    else:
        raise RuntimeError(f"lloyd_max({density!r}, {levels}) did not converge in {max_iter} iterations")
    t = 0.5 * (y[1:] + y[:-1])
    pos_levels = ([0.0] if odd else []) + y.tolist()
    pos_t = ([0.5 * float(y[0])] if odd else []) + t.tolist()
    neg_levels = [-v for v in reversed(pos_levels[1:] if odd else pos_levels)]
    # odd: the zero cell is [-y1/2, y1/2]; even: 0 is a threshold
    thresholds = [-v for v in reversed(pos_t)] + ([] if odd else [0.0]) + pos_t
    return LloydMax(density, tuple(thresholds), tuple(neg_levels + pos_levels), err, snr_db(err), it)


# -- rate-distortion bounds ----------------------------------------------------------------
def rd_bound_db(density: str, rate: float) -> float:
    """Highest SNR (dB) any code at `rate` bits per sample can reach (module docstring).

    Gaussian: 6.0206 R (exact R(D)); Laplacian: 6.0206 R + 10 log10(pi/e) (Shannon lower bound).
    """
    if density == "gaussian":
        return DB_PER_BIT * rate
    if density == "laplacian":
        return DB_PER_BIT * rate + LAPLACE_SLB_DB
    raise ValueError(f"unknown density {density!r}; choose one of {DENSITIES}")


# -- synthetic matrices ----------------------------------------------------------------------
def sample(density: str, shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """i.i.d. unit-variance samples (float32): N(0, 1), or Laplace(b = 1/sqrt2) as b (E1 - E2)."""
    if density == "gaussian":
        return torch.randn(shape, generator=generator, dtype=torch.float64).float()
    if density == "laplacian":
        e = torch.empty((2, *shape), dtype=torch.float64).exponential_(generator=generator)
        return ((e[0] - e[1]) / _LAM).float()
    raise ValueError(f"unknown density {density!r}; choose one of {DENSITIES}")


def measure(w: torch.Tensor, config, density: str) -> dict:
    """Quantize w with `config` (a WeightConfig) and compare with Lloyd-Max and the R-D bound.

    sqnr_db             10 log10(sum w^2 / sum (w - q)^2) over the sample
    lloyd_db            Lloyd-Max with 2^bits levels (the same number of codes)
    gap_lloyd_db        lloyd_db - sqnr_db (positive: worse than Lloyd-Max)
    lloyd_same_rate_db  Lloyd-Max with floor(2^bpw) levels: the best fixed-rate scalar code
                        that spends the overhead bits on levels instead of group scales
    bound_db            R-D bound at R = bpw (every stored bit counted)
    from_bound_db       bound_db - sqnr_db
    """
    from ..codec.formats import n_levels
    from ..codec.tensor import QuantizedWeight

    qw = QuantizedWeight.from_float(w, config)
    q = qw.dequantize(torch.float32)
    err = (w.double() - q.double()).pow(2).sum()
    sqnr = snr_db(float(err), float(w.double().pow(2).sum()))
    bpw = qw.bits_per_weight()
    lm = lloyd_max(density, 2**config.bits).sqnr_db
    n_same = int(math.floor(2.0**bpw + 1e-9))              # most levels a fixed-rate code affords
    lm_same = lloyd_max(density, n_same).sqnr_db
    bound = rd_bound_db(density, bpw)
    return {
        "density": density,
        "format": config.format,
        "bits": config.bits,
        "group_size": config.group_size,
        "label": config.label,
        "levels": n_levels(config.format, config.bits),
        "bpw": bpw,
        "sqnr_db": sqnr,
        "lloyd_db": lm,
        "gap_lloyd_db": lm - sqnr,
        "lloyd_same_rate_levels": n_same,
        "lloyd_same_rate_db": lm_same,
        "bound_db": bound,
        "from_bound_db": bound - sqnr,
        "curvature": None if qw.curvature is None else [round(float(a), 4) for a in qw.curvature],
    }


DEFAULT_BITS = (2, 3, 4, 5, 6, 8)
DEFAULT_GROUPS = (64, 128, None)
DEFAULT_FORMATS = ("qins", "int-sym", "int-asym", "nf4", "fp8")


def synthetic_report(bits=DEFAULT_BITS, shape: tuple[int, int] = (1024, 4096),
                     group_sizes=DEFAULT_GROUPS, formats=DEFAULT_FORMATS, densities=DENSITIES, seed: int = 0,
                     progress: bool = True, on_row=None) -> list[dict]:
    """One row per (density, format, bits, group) that the format supports (`measure`).

    Each density's matrix (`shape`, unit variance) is drawn once from a torch.Generator seeded
    with `seed` (Gaussian first, then Laplacian, each from a fresh generator), so every format
    sees the same weights. `on_row(rows)` is called after each row (for partial results).
    """
    from tqdm.auto import tqdm

    from ..codec.formats import get_format
    from ..codec.config import WeightConfig

    jobs = []
    for d in densities:
        for b in bits:
            for f in formats:
                if b not in get_format(f).bits:
                    continue
                for g in group_sizes:
                    jobs.append((d, WeightConfig(format=f, bits=b, group_size=g)))
    mats: dict[str, torch.Tensor] = {}
    rows: list[dict] = []
    for d, cfg in tqdm(jobs, desc="synthetic", disable=not progress):
        if d not in mats:
            mats[d] = sample(d, shape, torch.Generator().manual_seed(seed))
        rows.append(measure(mats[d], cfg, d))
        if on_row is not None:
            on_row(rows)
    return rows


def _group(r: dict) -> str:
    return "ch" if r["group_size"] is None else str(r["group_size"])


COLUMNS = (
    Column("density", "density", left=True), Column("format", "format", left=True), Column("bits", "bits"),
    Column("group_size", "group", _group), Column("levels", "levels"), Column("bpw", "bpw", "{:.4f}"),
    Column("sqnr_db", "SQNR dB", "{:.2f}"), Column("lloyd_db", "Lloyd-Max dB (2^bits)", "{:.2f}"),
    Column("gap_lloyd_db", "gap to Lloyd-Max dB", "{:+.2f}"),
    Column("lloyd_same_rate_db", "Lloyd-Max dB (floor 2^bpw levels)",
           lambda r: f"{r['lloyd_same_rate_db']:.2f} ({r['lloyd_same_rate_levels']})"),
    Column("bound_db", "R-D bound dB at bpw", "{:.2f}"), Column("from_bound_db", "from bound dB", "{:.2f}"),
)


def markdown_table(rows: list[dict]) -> str:
    return render.markdown_table(rows, COLUMNS)
