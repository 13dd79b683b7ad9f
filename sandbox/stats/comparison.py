"""The paired comparison over seeds: the balanced log metric per seed, `paired` (t interval, TOST,
bootstrap, diverged pairs counted), and Holm's step-down correction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from sandbox.errors import check, require


#: Default equivalence margin (nats): +-0.01 in a log quantity is a 1% ratio of losses / PPLs.
DEFAULT_EPS = 0.01
#: Default test level of every test and interval (two-sided 1 - alpha CIs, Holm over a family).
DEFAULT_ALPHA = 0.05


def balanced_log_ppl(nll_sum, tokens):
    """Balanced log-PPL (nats): ``mean_m nll_sum[..., m] / tokens[..., m]``.

    Args:
        nll_sum: summed token NLL per domain, ``(..., M)`` (numpy array or torch tensor).
        tokens: token count per domain, ``(..., M)``, every entry > 0.
    Returns:
        ``(...)``: each domain's mean token NLL, averaged with equal weight over the M domains.
    """
    nll_sum, tokens = _as_array(nll_sum), _as_array(tokens)
    if not bool((tokens > 0).all()):
        raise ValueError("balanced_log_ppl: every domain needs at least one token")
    return (nll_sum / tokens).mean(-1)  # (..., M) -> (...)


def _as_array(x):
    return x if hasattr(x, "shape") and hasattr(x, "sum") else np.asarray(x, dtype=float)


# ---------------------------------------------------------------------------------------------
# Paired comparison


def t_to_p(t, df):
    """Two-sided p-value of a t statistic: ``2 * P(T_df > |t|)`` (scalars or arrays)."""
    return 2.0 * stats.t.sf(np.abs(t), df)


@dataclass(frozen=True)
class Paired:
    """A paired comparison over seeds of ``delta_i = reference_i - test_i`` (positive = test better).

    ``n`` finite pairs entered the statistics; ``n_diverged`` pairs had a non-finite value on either
    side (``diverged_reference`` / ``diverged_test`` count the sides) and were dropped.
    ``mean, sd`` are the sample mean and SD (ddof=1) of delta, ``se = sd / sqrt(n)``,
    ``t = mean / se`` on ``df = n - 1``, ``p`` two-sided; ``[ci_low, ci_high]`` is the t interval
    ``mean -+ t_{1-alpha/2, df} se``; ``d_z = mean / sd`` (Cohen's d for paired data);
    ``[boot_low, boot_high]`` the seeded percentile bootstrap interval of the mean; ``p_tost`` the
    larger p of the two one-sided tests ``H0: mean <= -eps`` and ``H0: mean >= eps``.
    With fewer than 2 pairs the spread-based fields are NaN; with zero spread (all deltas equal)
    they take their limits (``se = 0``, ``t = +-inf``, ``p`` 0 or 1, a zero-width CI).
    """

    n: int
    n_diverged: int
    mean: float
    sd: float
    se: float
    t: float
    df: float
    p: float
    ci_low: float
    ci_high: float
    d_z: float
    boot_low: float
    boot_high: float
    p_tost: float
    eps: float
    alpha: float = DEFAULT_ALPHA
    diverged_reference: int = 0
    diverged_test: int = 0

    @property
    def zero_variance(self) -> bool:
        return self.n >= 2 and self.sd == 0.0


def _number(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _check_eps_alpha(eps: float, alpha: float) -> None:
    e, a = _number(eps), _number(alpha)
    require(math.isfinite(e) and e > 0, "eps", eps, "a positive equivalence margin in nats, fixed before the comparison")
    require(0 < a < 1, "alpha", alpha, "a number in (0, 1)")


def paired(reference, test, eps: float = DEFAULT_EPS, alpha: float = DEFAULT_ALPHA, n_boot: int = 10_000,
           seed: int = 0) -> Paired:
    """Paired comparison of two arms (or cells) over seeds.

    Args:
        reference, test: ``(S,)`` values of a log quantity (lower is better), aligned by seed.
            NaN/inf on either side marks a diverged pair: counted, then dropped.
        eps: equivalence margin for TOST (> 0), in the units of the values.
        alpha: level of the two-sided test and of the ``1 - alpha`` intervals.
        n_boot, seed: bootstrap resamples and the seed of their generator.
    """
    _check_eps_alpha(eps, alpha)
    ref = np.asarray(reference, dtype=float).ravel()
    tst = np.asarray(test, dtype=float).ravel()
    if ref.shape != tst.shape:
        raise ValueError(f"paired: reference has {ref.size} seeds, test has {tst.size}")
    bad_ref, bad_tst = ~np.isfinite(ref), ~np.isfinite(tst)
    ok = ~(bad_ref | bad_tst)
    scale = float(np.abs(np.concatenate([ref[ok], tst[ok]])).max(initial=0.0))
    return _describe(ref[ok] - tst[ok], int((~ok).sum()), eps, alpha, n_boot, seed,
                     int(bad_ref.sum()), int(bad_tst.sum()), scale)


def _describe(delta: np.ndarray, n_diverged: int, eps: float, alpha: float, n_boot: int, seed: int,
              div_ref: int = 0, div_tst: int = 0, scale: float = 0.0) -> Paired:
    """Statistics of finite paired differences ``delta (n,)``.

    ``scale`` is the magnitude of the values the deltas came from: a spread of deltas below the
    rounding error of such values (``16 eps_machine scale``) counts as zero spread, since a t
    statistic of 1e15 from rounding noise is not evidence.
    """
    n = int(delta.size)
    nan = float("nan")
    common = dict(n=n, n_diverged=n_diverged, eps=float(eps), alpha=float(alpha),
                  diverged_reference=div_ref, diverged_test=div_tst)
    if n == 0:
        return Paired(mean=nan, sd=nan, se=nan, t=nan, df=nan, p=nan, ci_low=nan, ci_high=nan, d_z=nan,
                      boot_low=nan, boot_high=nan, p_tost=nan, **common)
    mean = float(delta.mean())
    if n == 1:
        return Paired(mean=mean, sd=nan, se=nan, t=nan, df=0.0, p=nan, ci_low=nan, ci_high=nan, d_z=nan,
                      boot_low=nan, boot_high=nan, p_tost=nan, **common)
    df = float(n - 1)
    tiny = 16 * np.finfo(float).eps * max(scale, float(np.abs(delta).max()))
    if np.ptp(delta) <= tiny:  # zero spread: take the limits instead of dividing 0 by 0
        mean = float(np.median(delta))
        t = math.copysign(math.inf, mean) if mean != 0 else 0.0
        return Paired(mean=mean, sd=0.0, se=0.0, t=t, df=df, p=0.0 if mean != 0 else 1.0,
                      ci_low=mean, ci_high=mean, d_z=t, boot_low=mean, boot_high=mean,
                      p_tost=0.0 if abs(mean) < eps else 1.0, **common)
    # Ratios (t, d_z, the TOST statistics) are computed on deltas divided by their largest
    # magnitude: squares of deltas near 1e-160 underflow to 0 and would divide by a zero
    # standard error although the spread is real (e.g. deltas [0, 4.9e-230]).
    unit = float(np.abs(delta).max())
    u = delta / unit                                                   # (n,) in [-1, 1]
    u_mean = float(u.mean())
    u_sd = float(u.std(ddof=1))
    u_se = u_sd / math.sqrt(n)
    sd, se = u_sd * unit, u_se * unit
    t = u_mean / u_se
    half = float(stats.t.isf(alpha / 2, df)) * se
    e_u = eps / unit                                                   # may be inf: sf/cdf handle it
    p_low = float(stats.t.sf((u_mean + e_u) / u_se, df))   # H0: mean <= -eps
    p_upp = float(stats.t.cdf((u_mean - e_u) / u_se, df))  # H0: mean >= +eps
    boot_low, boot_high = bootstrap_ci(delta, alpha, n_boot, seed)
    return Paired(mean=mean, sd=sd, se=se, t=t, df=df, p=float(t_to_p(t, df)), ci_low=mean - half,
                  ci_high=mean + half, d_z=u_mean / u_sd, boot_low=boot_low, boot_high=boot_high,
                  p_tost=max(p_low, p_upp), **common)


def bootstrap_ci(delta, alpha: float = DEFAULT_ALPHA, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap ``1 - alpha`` interval of the mean of ``delta (n,)``.

    Resamples seeds with replacement: ``idx (n_boot, n)`` from ``numpy.random.default_rng(seed)``,
    so the same seed gives the same interval. With n = 2 or 3 the bootstrap has only a handful of
    distinct resamples and is optimistic; the t interval is the one used for decisions.
    """
    delta = np.asarray(delta, dtype=float)
    check(isinstance(n_boot, int) and n_boot >= 1, "n_boot", n_boot, "a positive integer")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, delta.size, size=(n_boot, delta.size))  # (n_boot, n)
    means = delta[idx].mean(axis=1)                                 # (n_boot,)
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def holm(pvals) -> np.ndarray:
    """Holm step-down adjusted p-values; NaN entries stay NaN and do not count towards m.

    With the m finite p-values sorted ascending, ``p_adj_(j) = max_{i <= j} min(1, (m - i) p_(i))``
    (i from 0). Any shape; the output has the input's shape.
    """
    p = np.asarray(pvals, dtype=float)
    out = np.full(p.shape, np.nan)
    finite = np.isfinite(p)
    q = p[finite]
    if q.size and (q.min() < 0 or q.max() > 1):
        raise ValueError("holm: p-values must lie in [0, 1]")
    m = q.size
    order = np.argsort(q, kind="stable")
    adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * q[order]))
    res = np.empty(m)
    res[order] = adj
    out[finite] = res
    return out
