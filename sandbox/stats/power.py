"""Power and the number of seeds that would resolve an inconclusive point: exact paired-t and TOST
power by quadrature over the sample SD, and the smallest n reaching a target power."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
from scipy import special

from sandbox.stats.comparison import DEFAULT_ALPHA


#: Default target power for ``seeds_needed``.
DEFAULT_POWER = 0.8
#: Beyond this many seeds an inconclusive point is reported as unreachable (``seeds_needed=None``).
MAX_SEEDS = 10_000


# Gauss-Legendre rule for expectations over the sample-SD ratio (96 nodes: error ~1e-11 here).
_GL_X, _GL_W = np.polynomial.legendre.leggauss(96)
_TAIL = 1e-17  # chi2 tail mass left out at each end


def _expect_over_sd(g: Callable[[np.ndarray], np.ndarray], df: int, upper: float = math.inf) -> float:
    """``E[g(V)]`` for ``V = s / sd = sqrt(W / df)``, ``W ~ chi2(df)``, over ``V <= upper``.

    The density of V is smooth, so a Gauss-Legendre rule on its central range
    ``[V_(1e-17), V_(1 - 1e-17)]`` (cut at ``upper``) is accurate; ``g`` is vectorised over V.
    """
    k = df / 2
    lo = math.sqrt(2 * special.gammaincinv(k, _TAIL) / df)
    hi = min(math.sqrt(2 * special.gammainccinv(k, _TAIL) / df), upper)
    if not hi > lo:
        return 0.0
    v = lo + (hi - lo) * (_GL_X + 1) / 2                                  # (96,) nodes
    w_chi = df * v * v                                                    # chi2 variate at each node
    log_pdf = (k - 1) * np.log(w_chi) - w_chi / 2 - k * math.log(2) - special.gammaln(k)
    dens = np.exp(log_pdf + np.log(2 * df * v))                           # density of V
    return float(np.sum(_GL_W * (hi - lo) / 2 * dens * g(v)))


def _power_t_integral(mean: float, sd: float, n: int, alpha: float = DEFAULT_ALPHA) -> float:
    """Two-sided paired t power as ``E_V[P(|xbar| > c sd V / sqrt(n))]``, ``xbar ~ N(mean, sd^2/n)``."""
    df, rn = n - 1, math.sqrt(n)
    c = -float(special.stdtrit(df, alpha / 2))  # t_{1-alpha/2, df}
    z = mean * rn / sd

    def g(v):
        return special.ndtr(z - c * v) + special.ndtr(-c * v - z)

    return min(1.0, max(0.0, _expect_over_sd(g, df)))


def power_tost(mean: float, sd: float, n: int, eps: float, alpha: float = DEFAULT_ALPHA) -> float:
    """Exact power of the paired TOST at level alpha for margin eps (true mean delta, SD, n seeds).

    With ``xbar ~ N(mean, sd^2/n)`` independent of ``s = sd V``, ``V = sqrt(W/df)``,
    ``W ~ chi2(df)``, and ``c = t_{1-alpha, df}``, TOST rejects iff
    ``-eps + c s/sqrt(n) < xbar < eps - c s/sqrt(n)``. So power =
    ``E_V[Phi(sqrt(n)(eps - mean)/sd - c V) - Phi(sqrt(n)(-eps - mean)/sd + c V)]`` over the V for
    which the window is open, ``V < sqrt(n) eps / (c sd)``.
    """
    if n < 2:
        return 0.0
    df, rn = n - 1, math.sqrt(n)
    c = -float(special.stdtrit(df, alpha))  # t_{1-alpha, df}
    a, b = (eps - mean) * rn / sd, (-eps - mean) * rn / sd

    def g(v):
        return np.maximum(0.0, special.ndtr(a - c * v) - special.ndtr(b + c * v))

    return min(1.0, max(0.0, _expect_over_sd(g, df, upper=eps * rn / (c * sd))))


def _smallest_n(power_at: Callable[[int], float], target: float, n_max: int) -> int | None:
    """Smallest n in [2, n_max] with ``power_at(n) >= target`` for a power increasing in n."""
    if power_at(n_max) < target:
        return None
    lo, hi = 1, 2  # invariant once hi is found: power_at(lo) < target <= power_at(hi)
    while power_at(hi) < target:
        lo, hi = hi, min(2 * hi, n_max)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if power_at(mid) < target else (lo, mid)
    return hi


def seeds_needed(mean: float, sd: float, eps: float, alpha: float = DEFAULT_ALPHA, power: float = DEFAULT_POWER,
                 n_max: int = MAX_SEEDS, n_tests: int = 1) -> tuple[int | None, str]:
    """Total seeds for power ``power`` at the observed mean delta and SD, with a one-line reason.

    If ``|mean| < eps`` the point looks like a tie, so the count is for the TOST (level alpha, as in
    `classify`) to show equivalence; otherwise for the two-sided paired t test to show a difference
    at the Bonferroni level ``alpha / n_tests``: the level Holm applies to the smallest of
    ``n_tests`` p-values, so that many seeds clear the correction whatever the other points do.
    ``None`` when no n up to ``n_max`` reaches the power (e.g. a mean of ~0 for the difference
    test). The observed mean and SD are noisy with few seeds: a planning guide, not a promise.
    """
    alpha_t = alpha / max(1, n_tests)
    if not (math.isfinite(mean) and math.isfinite(sd)) or sd <= 0:
        return None, "no spread estimate"
    if abs(mean) < eps:
        n = _smallest_n(lambda k: power_tost(mean, sd, k, eps, alpha), power, n_max)
        what = f"TOST (equivalence within +-{eps:g})"
    else:
        n = _smallest_n(lambda k: _power_t_integral(mean, sd, k, alpha_t), power, n_max)
        what = "paired t test" + (f" (Holm over {n_tests} points)" if n_tests > 1 else "")
    if n is None:
        return None, f"{what} does not reach power {power:g} with <= {n_max} seeds at mean {mean:.3g}, sd {sd:.3g}"
    return n, f"~{n} seeds give the {what} power {power:g} at the observed mean {mean:.3g} and sd {sd:.3g}"
