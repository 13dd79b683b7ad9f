"""Statistics that cannot mislead: balanced log metrics, paired tests, equivalence, Holm, attribution.

Every conclusion of the tool comes from this module. Its rules:

1. **Balanced log metric per seed.** ``balanced_log_ppl`` is the equal-weight mean over the M
   domains of each domain's mean token NLL (nats). Domains are never weighted by token count
   (pooling can flip a conclusion: tests/test_stats.py shows one) and PPL values are never
   averaged: there is deliberately no function here that takes a mean of ``exp(...)``.
2. **Across seeds only paired differences of log quantities.** ``delta_i = reference_i - test_i``
   for seed i, lower is better for both, so ``delta > 0`` means the test arm (or treated cell) is
   better. Sandbox: ``log loss_grad - log loss_evo``; full system: ``log PPL_ref - log PPL_test``.
3. **Diverged runs are counted, never averaged in.** A pair with a non-finite value on either side
   is dropped from the statistics and counted in ``n_diverged``; every table reports the count.
4. **Not significant is not a tie.** ``ties`` needs a positive equivalence result (TOST for a margin
   ``eps`` fixed before the comparison, with the reported CI inside ``(-eps, eps)``); otherwise the
   point is ``inconclusive`` and we say how many seeds would resolve it.

Why the arithmetic mean of PPLs misleads (Jensen): two domains, reference log-PPLs ``(2.0, 2.0)``
and test log-PPLs ``(1.5, 2.4)``. Balanced log-PPL: reference 2.0, test 1.95, so
``delta = +0.05`` (the test is better, a 4.9% lower geometric-mean PPL). Mean of PPLs: reference
``e^2 = 7.39``, test ``(e^1.5 + e^2.4) / 2 = 7.75``, so the PPL mean calls the test *worse*. One
bad domain dominates an arithmetic mean of exponentials. This module gives the balanced answer::

    >>> nll = np.array([[200.0, 20.0], [150.0, 24.0]])    # (arms, M) NLL sums
    >>> tok = np.array([[100, 10], [100, 10]])            # (arms, M) token counts
    >>> balanced_log_ppl(nll, tok)                         # (arms,)
    array([2.  , 1.95])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd
from scipy import special, stats

from sandbox.factors import CHAIN, CONTRASTS, Cell, contrasts_for, interactions_for, parse_cell
from sandbox.errors import BadInput, check, require

#: Default equivalence margin (nats): +-0.01 in a log quantity is a 1% ratio of losses / PPLs.
DEFAULT_EPS = 0.01
#: Default target power for ``seeds_needed``.
DEFAULT_POWER = 0.8
#: Beyond this many seeds an inconclusive point is reported as unreachable (``seeds_needed=None``).
MAX_SEEDS = 10_000

#: The decomposition columns of summary.csv (after ``by`` and ``SUMMARY_STATS``): each control
#: contrast with its CI, Holm-adjusted p and its own label, and what the search did.
DECOMPOSITION = ("delta_restart", "restart_ci_low", "restart_ci_high", "restart_p_holm", "restart_regime",
                 "delta_beta2", "beta2_ci_low", "beta2_ci_high", "beta2_p_holm", "beta2_regime",
                 "room", "room_ci_low", "room_ci_high", "room_p_holm", "room_regime",
                 "room_joint", "room_joint_ci_high", "room_grad", "room_evo", "room_restart", "room_beta2",
                 "grad_drop", "converged", "grad_lr", "grad_adapter_lr", "grad_beta2",
                 "accepted", "accepted_seeds", "accepted_gain", "lifecycle_events", "value")
#: The acar arm's columns of summary.csv (only when the results hold an ``acar`` arm):
#: acar vs grad (its CI, Holm p over the points, `classify` regime and seeds needed) and its mode
#: usage pooled over seeds (shares of inputs gated with 1 / 2 / 3 slots, mean slots, compute saved
#: against always running three).
ACAR_SUMMARY = ("delta_acar", "acar_ci_low", "acar_ci_high", "acar_p_holm", "acar_regime", "acar_seeds_needed",
                "acar_share1", "acar_share2", "acar_share3", "acar_mean_slots", "acar_saved")
#: Statistic columns of summary.csv (after the point/axis columns given as ``by``).
SUMMARY_STATS = ("n", "n_diverged", "mean_delta", "se", "ci_low", "ci_high", "t", "df", "p", "p_holm",
                 "d_z", "boot_low", "boot_high", "p_tost", "eps", "regime", "reason", "seeds_needed")
ATTRIBUTION_COLUMNS = ("contrast", "kind", "reference", "treated", "n", "n_diverged", "mean_delta", "se",
                       "ci_low", "ci_high", "t", "df", "p", "d_z", "p_holm", "regime", "seeds_needed", "reason", "note")
#: Kinds of attribution.csv rows that are tested (Holm family, regimes, seeds_needed, sequential design).
TESTED_KINDS = ("named", "interaction")


# ---------------------------------------------------------------------------------------------
# Per-seed metrics


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
    alpha: float = 0.05
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


def paired(reference, test, eps: float = DEFAULT_EPS, alpha: float = 0.05, n_boot: int = 10_000,
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


def bootstrap_ci(delta, alpha: float = 0.05, n_boot: int = 10_000, seed: int = 0) -> tuple[float, float]:
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


# ---------------------------------------------------------------------------------------------
# Power and the number of seeds that would resolve an inconclusive point


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


def _power_t_integral(mean: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Two-sided paired t power as ``E_V[P(|xbar| > c sd V / sqrt(n))]``, ``xbar ~ N(mean, sd^2/n)``."""
    df, rn = n - 1, math.sqrt(n)
    c = -float(special.stdtrit(df, alpha / 2))  # t_{1-alpha/2, df}
    z = mean * rn / sd

    def g(v):
        return special.ndtr(z - c * v) + special.ndtr(-c * v - z)

    return min(1.0, max(0.0, _expect_over_sd(g, df)))


def power_tost(mean: float, sd: float, n: int, eps: float, alpha: float = 0.05) -> float:
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


def seeds_needed(mean: float, sd: float, eps: float, alpha: float = 0.05, power: float = DEFAULT_POWER,
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


# ---------------------------------------------------------------------------------------------
# Regimes


def classify(pr: Paired, p_holm: float, alpha: float | None = None, power: float = DEFAULT_POWER,
             n_max: int = MAX_SEEDS, n_tests: int = 1) -> tuple[str, str, int | None]:
    """Regime of one point from its paired result and Holm-adjusted p: ``(regime, reason, seeds_needed)``.

    - ``beats``: ``p_holm < alpha``, ``ci_low > 0`` and ``mean >= eps``; ``degrades``: ``p_holm <
      alpha``, ``ci_high < 0`` and ``mean <= -eps`` (better / worse by at least the margin);
      ``beats<eps`` / ``degrades<eps`` when the difference is significant but its mean is inside
      ``(-eps, eps)`` (real but smaller than the margin; a constant nonzero delta inside the
      margin too);
    - ``ties``: ``p_tost < alpha`` and the ``1 - alpha`` CI inside ``(-eps, eps)``;
    - otherwise ``inconclusive`` with the seeds that would resolve it (`seeds_needed`; pass
      ``n_tests``, the size of the Holm family, so the count accounts for the correction).
    Edge cases never give NaN: no pairs, all diverged, one seed and zero spread each get a reason.
    """
    alpha = pr.alpha if alpha is None else alpha
    eps = pr.eps
    div = f"; {pr.n_diverged} diverged pair(s) dropped" if pr.n_diverged else ""
    if pr.n_diverged:
        div += f" (reference {pr.diverged_reference}, test {pr.diverged_test})"
    if pr.n == 0:
        why = "all runs diverged" if pr.n_diverged else "no paired seeds"
        return "inconclusive", why + div, None
    if pr.n == 1:
        return "inconclusive", f"one seed: no variance estimate (delta {pr.mean:.4g}){div}", None
    if pr.zero_variance:
        if pr.mean == 0:
            return "ties", f"zero variance: all {pr.n} deltas equal 0{div}", None
        regime = "beats" if pr.mean > 0 else "degrades"
        if abs(pr.mean) < eps:
            return regime + "<eps", (f"zero variance, all seeds agree: every delta = {pr.mean:.4g}, "
                                     f"inside +-{eps:g}{div}"), None
        return regime, f"zero variance, all seeds agree: every delta = {pr.mean:.4g}{div}", None
    ci = f"CI [{pr.ci_low:.4g}, {pr.ci_high:.4g}]"
    if math.isfinite(p_holm) and p_holm < alpha and (pr.ci_low > 0 or pr.ci_high < 0):
        regime = "beats" if pr.ci_low > 0 else "degrades"
        side = "above" if regime == "beats" else "below"
        if abs(pr.mean) < eps:
            return (regime + "<eps", f"p_holm {p_holm:.3g} < {alpha:g}, {ci} {side} 0 but |mean| "
                    f"{abs(pr.mean):.4g} < eps {eps:g}{div}", None)
        return regime, f"p_holm {p_holm:.3g} < {alpha:g}, {ci} {side} 0, |mean| >= eps {eps:g}{div}", None
    if pr.p_tost < alpha and -eps < pr.ci_low and pr.ci_high < eps:
        return "ties", f"TOST p {pr.p_tost:.3g} < {alpha:g}, {ci} inside +-{eps:g}{div}", None
    n, why = seeds_needed(pr.mean, pr.sd, eps, alpha, power, n_max, n_tests)
    head = f"p_holm {p_holm:.3g}, TOST p {pr.p_tost:.3g}, {ci}"
    return "inconclusive", f"{head}; {why}{div}", n


def _row(pr: Paired) -> dict[str, Any]:
    return dict(n=pr.n, n_diverged=pr.n_diverged, mean_delta=pr.mean, se=pr.se, ci_low=pr.ci_low,
                ci_high=pr.ci_high, t=pr.t, df=pr.df, p=pr.p, d_z=pr.d_z, boot_low=pr.boot_low,
                boot_high=pr.boot_high, p_tost=pr.p_tost, eps=pr.eps)


def _require_columns(df: pd.DataFrame, cols: list[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise BadInput(what, ", ".join(missing), f"a table with columns {', '.join(cols)} (missing)")


def _finite_values(df: pd.DataFrame, value: str) -> pd.Series:
    """``value`` as floats, NaN where the row is flagged ``diverged`` (flag optional)."""
    vals = pd.to_numeric(df[value], errors="coerce").astype(float)
    if "diverged" in df.columns:
        flag = df["diverged"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0", "yes"))
        vals = vals.mask(flag.to_numpy(bool))
    return vals


def summarize(df: pd.DataFrame, by: list[str], reference_arm: str = "grad", test_arm: str = "evo",
              value: str = "log_loss", eps: float = DEFAULT_EPS, alpha: float = 0.05, n_boot: int = 10_000,
              seed: int = 0, power: float = DEFAULT_POWER) -> pd.DataFrame:
    """Per-point regimes from a tidy results table (the rows of summary.csv).

    Args:
        df: one row per (point, seed, arm) with columns ``by + [seed, arm, value]`` and optionally
            ``diverged`` (a flagged row counts as diverged even if its value is finite).
        by: the columns that identify a point, e.g. ``["point", "alignment"]``.
    Arms are paired by seed within each point; seeds present in only one arm are dropped and named
    in the reason. Holm's correction runs over ALL points of the table. Columns of the result:
    ``by`` then ``SUMMARY_STATS``.
    """
    _check_eps_alpha(eps, alpha)
    _require_columns(df, [*by, "seed", "arm", value], "results table")
    arms = set(df["arm"].astype(str))
    for flag, arm in (("reference_arm", reference_arm), ("test_arm", test_arm)):
        if arm not in arms:
            raise BadInput(flag, arm, f"an arm present in the results table ({', '.join(sorted(arms))})")
    work = df.assign(_v=_finite_values(df, value), arm=df["arm"].astype(str))
    dup = work.duplicated([*by, "seed", "arm"])
    if dup.any():
        first = work.loc[dup, [*by, "seed", "arm"]].iloc[0].to_dict()
        raise BadInput("results table", first, "one row per (point, seed, arm)")
    idx = work.set_index([*by, "seed", "arm"])
    wide = idx["_v"].unstack("arm")                                   # (points x seeds, arms), NaN = diverged
    present = pd.Series(1, index=idx.index).unstack("arm").notna()    # a row exists, finite or not
    rows, results = [], []
    for key, g in wide.groupby(level=list(range(len(by))), sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        have = present.loc[g.index]
        both = (have[reference_arm] & have[test_arm]).to_numpy()
        unpaired = int((have[reference_arm] ^ have[test_arm]).sum())
        pr = paired(g[reference_arm].to_numpy()[both], g[test_arm].to_numpy()[both], eps, alpha, n_boot, seed)
        rows.append(dict(zip(by, key)))
        results.append((pr, unpaired))
    p_adj = holm([pr.p for pr, _ in results])
    n_tests = int(np.isfinite(p_adj).sum())
    for row, (pr, unpaired), ph in zip(rows, results, p_adj):
        regime, reason, need = classify(pr, float(ph), alpha, power, n_tests=n_tests)
        if unpaired:
            reason += f"; {unpaired} seed(s) present in only one arm dropped"
        row.update(_row(pr), p_holm=float(ph), regime=regime, reason=reason, seeds_needed=need)
    out = pd.DataFrame(rows, columns=[*by, *SUMMARY_STATS])
    out["seeds_needed"] = out["seeds_needed"].astype("Int64")
    return out


def label_point(regime: str, reason: str, acted: bool | None, room_high: float, eps: float,
                unconverged: str | None = None) -> tuple[str, str]:
    """The label of a point from the regime of its delta (`classify`), what the search did, the
    ceiling and the baseline's convergence.

    Precedence, first match wins:

    1. ``inert``: no seed's search made an accepted change (a gain of at least ``accept_tol``) and
       no lifecycle event ran (``acted`` is False): the evo arm did (next to) nothing, so the point
       says nothing about search, whatever the numbers;
    2. ``unconverged`` (``unconverged`` is the reason, or None): the grad baseline was still falling
       by more than the stated share of eps over its last half and had room to fall: a
       difference then measures speed against an unfinished baseline, not the solution;
    3. ``beats`` / ``degrades``: significant after Holm and better / worse by at least eps;
    4. ``no-room``: the upper 95% bound of the ceiling's room (grad vs the joint optimum) is below
       ``eps``, so no method could beat the gradient solution by eps here; it replaces
       ``beats<eps``, ``ties`` and ``inconclusive`` (the ceiling explains them), never a
       significant ``degrades<eps`` (a method can always be worse);
    5. ``beats<eps`` / ``degrades<eps``: significant, mean inside ``(-eps, eps)``;
    6. ``ties``, then ``inconclusive``.
    ``acted=None`` (unknown: a table without search counts) skips rule 1; a NaN ``room_high`` skips 4.
    """
    if acted is False:
        return "inert", "the search never made an accepted change and no lifecycle event ran: evo is grad"
    if unconverged:
        return "unconverged", f"{unconverged}; {reason}"
    if regime in ("beats", "degrades"):
        return regime, reason
    if math.isfinite(room_high) and room_high < eps and regime != "degrades<eps":
        return "no-room", f"ceiling room CI upper bound {room_high:.4g} < eps {eps:g}: no method could gain eps here; {reason}"
    return regime, reason


#: Default share of eps by which grad may still fall over its last half and count as converged.
CONVERGED_FRAC = 0.5


def _contrast(df: pd.DataFrame, by: list[str], test: str, name: str, prefix: str, kw: dict,
              reference: str = "grad") -> pd.DataFrame:
    """One paired contrast per point as columns ``name, <prefix>_ci_low, _ci_high, _p_holm, _regime``."""
    cols = [name, f"{prefix}_ci_low", f"{prefix}_ci_high", f"{prefix}_p_holm", f"{prefix}_regime"]
    part = summarize(df, by, reference, test, **kw)[[*by, "mean_delta", "ci_low", "ci_high", "p_holm", "regime"]]
    part.columns = [*by, *cols]
    return part


def decompose(df: pd.DataFrame, by: list[str], eps: float = DEFAULT_EPS, alpha: float = 0.05, n_boot: int = 10_000,
              seed: int = 0, power: float = DEFAULT_POWER, oracle_is_ceiling: bool = True,
              converged_frac: float = CONVERGED_FRAC, value: str | None = None) -> pd.DataFrame:
    """summary.csv of a sweep with control arms: the headline ``delta`` (evo vs grad) decomposed.

    ``value``: the per-seed quantity the contrasts are differences of (lower is better). Default:
    ``rel_excess`` where the table has it (the analytic sandbox: final excess loss over the
    start's, so a delta is a share of the start's reducible loss and no constant such as the loss
    floor can move it), else ``log_loss`` (log PPL on the transformer).

    Columns: ``by``, ``SUMMARY_STATS`` of evo vs grad (its ``regime`` is the `label_point` label),
    then ``DECOMPOSITION``: ``delta_restart`` (restart vs grad), ``delta_beta2`` (the beta2 control
    vs grad) and ``room`` (oracle vs grad: the best re-routing of grad's own adapters), each a paired
    contrast with its 95% CI, Holm-adjusted p (Holm over the points, per contrast) and its own
    `classify` regime; ``room_joint`` (with ``rel_excess``: grad's distance to the joint optimum of
    gates and adapters, bounded by the floor, i.e. 0, or with frozen adapters the exact best routing
    of them; no arm can end below it; its CI gates ``no-room``, `_joint_room`); ``room_<arm>`` (mean over seeds of each arm's rel_excess minus that of the
    best routing of its own final adapters: a diagnostic); ``grad_drop`` (grad's mean fall over its
    last half) and ``converged`` (``grad_drop <= converged_frac * eps``); ``accepted`` (mean share
    of generations with an accepted change), ``accepted_seeds`` (seeds with at least one),
    ``accepted_gain`` (mean total gain of the search on its objective, in ``value`` units) and
    ``lifecycle_events`` (summed over seeds); the grad arm's optimiser setting (``grad_lr``,
    ``grad_adapter_lr``, ``grad_beta2``) and, for arms tuned on their own (``<arm>_own``),
    ``delta_<arm>_own``. A missing arm or count column leaves its columns NaN (and skips its rule).
    ``oracle_is_ceiling=False`` (an oracle that is not a proven bound, e.g. domain-oracle routing
    on the transformer) reports the room but never labels a point ``no-room``.
    With an ``acar`` arm in ``df`` the ``ACAR_SUMMARY`` columns follow (`acar_summary`).
    """
    if value is None:
        value = "rel_excess" if "rel_excess" in df.columns and pd.to_numeric(df["rel_excess"], errors="coerce").notna().any() \
            else "log_loss"
    kw = dict(value=value, eps=eps, alpha=alpha, n_boot=n_boot, seed=seed, power=power)
    out = summarize(df, by, "grad", "evo", **kw)
    arms = set(df["arm"].astype(str))
    for arm, name, prefix in (("restart", "delta_restart", "restart"), ("beta2", "delta_beta2", "beta2"),
                              ("oracle", "room", "room")):
        if arm in arms:
            out = out.merge(_contrast(df, by, arm, name, prefix, kw), on=by, how="left")
        else:
            out = out.assign(**{name: np.nan, f"{prefix}_ci_low": np.nan, f"{prefix}_ci_high": np.nan,
                                f"{prefix}_p_holm": np.nan, f"{prefix}_regime": None})
    for arm in sorted(a[:-4] for a in arms if a.endswith("_own")):
        part = _contrast(df, by, f"{arm}_own", f"delta_{arm}_own", f"{arm}_own", kw)
        out = out.merge(part[[*by, f"delta_{arm}_own", f"{arm}_own_ci_low", f"{arm}_own_ci_high",
                              f"{arm}_own_regime"]], on=by, how="left")
    work = df.assign(arm=df["arm"].astype(str))
    grad = work[work["arm"] == "grad"]
    joint = value == "rel_excess" and oracle_is_ceiling
    out = out.merge(_joint_room(grad, by, value, alpha) if joint else out[by].assign(room_joint=np.nan,
                    room_joint_ci_high=np.nan), on=by, how="left")
    for arm in ("grad", "evo", "restart", "beta2"):
        rows = work[work["arm"] == arm]
        if value == "rel_excess" and "rel_oracle" in rows and len(rows):
            gap = rows.assign(_gap=_finite_values(rows, value) - pd.to_numeric(rows["rel_oracle"], errors="coerce"))
            out = out.merge(_per_point(gap, by, "_gap", "mean").rename(columns={"_gap": f"room_{arm}"}), on=by, how="left")
        else:
            out[f"room_{arm}"] = np.nan
    if value == "rel_excess" and "rel_half" in grad and len(grad):
        drop = grad.assign(_drop=pd.to_numeric(grad["rel_half"], errors="coerce") - _finite_values(grad, value))
        out = out.merge(_per_point(drop, by, "_drop", "mean").rename(columns={"_drop": "grad_drop"}), on=by, how="left")
    else:
        out["grad_drop"] = np.nan
    out["converged"] = [None if pd.isna(d) else bool(d <= converged_frac * eps) for d in out["grad_drop"]]
    for col, src in (("grad_lr", "lr"), ("grad_adapter_lr", "adapter_lr"), ("grad_beta2", "beta2")):
        out = out.merge(_per_point(grad, by, src, "first").rename(columns={src: col}), on=by, how="left")
    evo_rows = work[work["arm"] == "evo"]
    acc = _per_point(evo_rows, by, "accepted", "mean")
    acc_seeds = _per_point(evo_rows.assign(_any=pd.to_numeric(evo_rows.get("accepted", np.nan), errors="coerce") > 0)
                           if "accepted" in evo_rows else evo_rows, by, "_any", "sum")
    gain = _per_point(evo_rows, by, "rel_gain", "mean").rename(columns={"rel_gain": "accepted_gain"})
    life = _per_point(evo_rows, by, "lifecycle_events", "sum")
    out = out.merge(acc, on=by, how="left").merge(acc_seeds.rename(columns={"_any": "accepted_seeds"}), on=by, how="left") \
             .merge(gain, on=by, how="left").merge(life, on=by, how="left")
    labels = []
    for r in out.to_dict("records"):
        have = pd.notna(r["accepted_seeds"]) or pd.notna(r["lifecycle_events"])
        acted = None if not have else bool((r["accepted_seeds"] or 0) > 0 or (r["lifecycle_events"] or 0) > 0)
        if joint:
            high = float(r["room_joint_ci_high"]) if pd.notna(r["room_joint_ci_high"]) else float("nan")
        else:
            high = float(r["room_ci_high"]) if pd.notna(r["room_ci_high"]) and oracle_is_ceiling else float("nan")
        unconv = None
        if r["converged"] is False and not (math.isfinite(high) and high < eps):
            unconv = (f"grad still falls {r['grad_drop']:.4g} over its last half (> {converged_frac:g} x eps "
                      f"{eps:g}) with room to fall")
        labels.append(label_point(r["regime"], r["reason"], acted, high, eps, unconv))
    out["regime"] = [l for l, _ in labels]
    out["reason"] = [w for _, w in labels]
    out.loc[out["regime"] != "inconclusive", "seeds_needed"] = pd.NA
    out["value"] = value
    extra = [c for c in out.columns if c not in (*by, *SUMMARY_STATS, *DECOMPOSITION)]
    cols = [*by, *SUMMARY_STATS, *DECOMPOSITION, *extra]
    if "acar" in arms:
        out, cols = out.merge(acar_summary(df, by, **kw), on=by, how="left"), cols + list(ACAR_SUMMARY)
    return out[cols]


def _joint_room(grad: pd.DataFrame, by: list[str], value: str, alpha: float) -> pd.DataFrame:
    """``room_joint`` per point: mean over seeds of grad's distance to the best any method could
    reach, and its upper ``1 - alpha`` t bound. That best is the floor (rel_excess 0: it bounds the
    joint optimum of gates and adapters) and, where the adapters are frozen (``adapter_lr`` 0: every
    arm keeps the same adapters and only routing moves), the exact best routing of those adapters
    (``rel_oracle``), which is then the joint optimum itself."""
    v = _finite_values(grad, value)
    if "rel_oracle" in grad and "adapter_lr" in grad:
        frozen = pd.to_numeric(grad["adapter_lr"], errors="coerce").fillna(1.0).to_numpy(float) == 0
        best = pd.to_numeric(grad["rel_oracle"], errors="coerce").to_numpy(float)
        v = v - np.where(frozen & np.isfinite(best), best, 0.0)
    rows = []
    for key, g in grad.assign(_v=v).groupby(by, dropna=False, sort=True):
        v = g["_v"].to_numpy(float)
        v = v[np.isfinite(v)]
        key = key if isinstance(key, tuple) else (key,)
        mean = float(v.mean()) if v.size else math.nan
        high = mean + float(stats.t.isf(alpha / 2, v.size - 1)) * float(v.std(ddof=1)) / math.sqrt(v.size) \
            if v.size >= 2 else math.nan
        rows.append({**dict(zip(by, key)), "room_joint": mean, "room_joint_ci_high": high})
    return pd.DataFrame(rows, columns=[*by, "room_joint", "room_joint_ci_high"])


def acar_summary(df: pd.DataFrame, by: list[str], **kw) -> pd.DataFrame:
    """The ``ACAR_SUMMARY`` columns per point: ``delta_acar = log loss_grad - log loss_acar`` paired by
    seed (`summarize`, Holm over the points; its regime from `classify`, no room or inert rule:
    ACAR acts on every input and is not a re-routing of a search), and the acar rows' ``mode1..3``
    pooled over seeds: ``acar_share<n>`` = inputs gated with n slots / inputs, ``acar_mean_slots``,
    ``acar_saved = 1 - mean_slots / 3`` (NaN where the mode columns are absent)."""
    part = summarize(df, by, "grad", "acar", **kw)[[*by, "mean_delta", "ci_low", "ci_high", "p_holm", "regime",
                                                    "seeds_needed"]]
    part.columns = [*by, *ACAR_SUMMARY[:6]]
    rows = df[df["arm"].astype(str) == "acar"]
    counts = [_per_point(rows, by, f"mode{m}", "sum") for m in (1, 2, 3)]
    use = counts[0]
    for c in counts[1:]:
        use = use.merge(c, on=by, how="left")
    total = use[["mode1", "mode2", "mode3"]].sum(axis=1, min_count=3)
    for m in (1, 2, 3):
        use[f"acar_share{m}"] = use[f"mode{m}"] / total
    use["acar_mean_slots"] = use["acar_share1"] + 2 * use["acar_share2"] + 3 * use["acar_share3"]
    use["acar_saved"] = 1 - use["acar_mean_slots"] / 3
    return part.merge(use[[*by, *ACAR_SUMMARY[6:]]], on=by, how="left")


def _per_point(df: pd.DataFrame, by: list[str], col: str, how: str) -> pd.DataFrame:
    """``col`` aggregated per point (``by``); NaN where the column is absent."""
    if col not in df.columns:
        return df[by].drop_duplicates().assign(**{col: np.nan})
    vals = df.assign(**{col: pd.to_numeric(df[col], errors="coerce").astype(float)})
    return vals.groupby(by, dropna=False, sort=True)[col].agg(how).reset_index()


# ---------------------------------------------------------------------------------------------
# Factorial attribution


def attribution(table: pd.DataFrame, value: str = "balanced_log_ppl", eps: float = DEFAULT_EPS,
                alpha: float = 0.05, cell_col: str = "cell", n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
    """Named contrasts of the factorial, the one-factor chain and its gap to the direct contrast.

    Args:
        table: one row per (cell, seed) with columns ``cell_col, seed, value`` (and optionally
            ``diverged``); cell names in any accepted spelling (``L+R``, ``full``, ``B3``).
    Rows (columns ``ATTRIBUTION_COLUMNS``):
    - ``kind = named``: every contrast of ``sandbox.factors.CONTRASTS`` whose two cells are present,
      ``delta_s = value_s(reference) - value_s(treated)`` paired by seed (positive = treated better).
    - ``kind = chain_sum``: per seed, the sum of the ``CHAIN`` step deltas (router + scope +
      lifecycle, B3 -> R -> R+E -> R+E+L), over seeds finite in all four cells.
    - ``kind = chain_gap``: ``chain_sum.mean_delta - system.mean_delta``. The chain telescopes, so
      on identical seed sets the gap is 0 up to rounding; a non-zero gap means different seeds
      (missing or diverged runs) entered the chain and the direct contrast.
    - ``kind = interaction`` (only with all eight cells): ``sandbox.factors.INTERACTIONS``, per seed
      ``sum_c w_c value_s(c)`` over the seeds finite in all eight cells (reference/treated empty).
    Tested rows (``named``, ``interaction``) get ``p_holm`` (Holm over those rows), ``regime`` and
    ``reason`` (`classify`) and ``seeds_needed`` for EVERY such row, classified or not: the total
    seeds giving 80% power at the observed mean and SD (TOST within eps for |mean| < eps, else the
    paired t at the Bonferroni level alpha / family size; `seeds_needed`), empty when none up to
    10,000 would.
    """
    _check_eps_alpha(eps, alpha)
    _require_columns(table, [cell_col, "seed", value], "cells table")
    work = table.assign(_cell=[parse_cell(c, f"cells table column {cell_col!r}") for c in table[cell_col]],
                        _v=_finite_values(table, value))
    dup = work.duplicated(["_cell", "seed"])
    if dup.any():
        raise BadInput("cells table", work.loc[dup, [cell_col, "seed"]].iloc[0].to_dict(), "one row per (cell, seed)")
    wide = work.pivot(index="seed", columns="_cell", values="_v")        # (seeds, cells), NaN = diverged
    present = work.assign(_p=True).pivot(index="seed", columns="_cell", values="_p").fillna(False).astype(bool)

    def rows_for(cells: list[Cell]) -> pd.DataFrame:
        """Values of `cells` on the seeds that have a row for every one of them, ``(seeds, cells)``."""
        return wide.loc[present[cells].all(axis=1), cells]

    rows: list[dict[str, Any]] = []
    by_name: dict[str, Paired] = {}
    for c in contrasts_for(list(wide.columns)):
        vals = rows_for([c.reference, c.treated])
        pr = paired(vals[c.reference].to_numpy(), vals[c.treated].to_numpy(), eps, alpha, n_boot, seed)
        by_name[c.name] = pr
        rows.append(dict(contrast=c.name, kind="named", reference=c.reference.name, treated=c.treated.name,
                         **_attr_stats(pr), note=c.description))
    named = {c.name: c for c in CONTRASTS}
    if all(k in by_name for k in CHAIN):
        steps = [named[k] for k in CHAIN]
        cells = [steps[0].reference] + [s.treated for s in steps]
        vals = rows_for(cells)
        ok = np.isfinite(vals.to_numpy()).all(axis=1)                    # (seeds,) finite in every chain cell
        finite = vals[ok]
        chain = sum(finite[s.reference].to_numpy() - finite[s.treated].to_numpy() for s in steps)  # (seeds,)
        scale = float(np.abs(finite.to_numpy()).max(initial=0.0))
        pr = _describe(np.asarray(chain, dtype=float), int((~ok).sum()), eps, alpha, n_boot, seed, scale=scale)
        rows.append(dict(contrast="chain_sum", kind="chain_sum", reference=cells[0].name, treated=cells[-1].name,
                         **_attr_stats(pr), note="sum per seed of " + " + ".join(CHAIN)))
        if "system" in by_name:
            full = by_name["system"]
            same = full.n == pr.n  # the chain's seeds are a subset of the direct contrast's
            gap = pr.mean - full.mean
            note = ("telescoping chain: identical seeds, so the gap is rounding only" if same else
                    f"chain on {pr.n} seeds vs system on {full.n}: the gap comes from different seed sets")
            nan = float("nan")
            rows.append(dict(contrast="chain_sum - system", kind="chain_gap", reference=cells[0].name,
                             treated=cells[-1].name, n=min(pr.n, full.n), n_diverged=max(pr.n_diverged, full.n_diverged),
                             mean_delta=gap, se=nan, ci_low=nan, ci_high=nan, t=nan, df=nan, p=nan, d_z=nan,
                             note=note))
    for it in interactions_for(list(wide.columns)):
        w = it.weights()
        cells = list(w)
        vals = rows_for(cells)
        ok = np.isfinite(vals.to_numpy()).all(axis=1)
        finite = vals[ok]
        delta = sum(w[c] * finite[c].to_numpy() for c in cells)                # (seeds,)
        scale = float(np.abs(finite.to_numpy()).max(initial=0.0))
        pr = _describe(np.asarray(delta, dtype=float), int((~ok).sum()), eps, alpha, n_boot, seed, scale=scale)
        by_name[it.name] = pr
        rows.append(dict(contrast=it.name, kind="interaction", reference="", treated="", **_attr_stats(pr),
                         note=it.description))
    _classify_rows(rows, by_name, eps, alpha)
    return pd.DataFrame(rows, columns=list(ATTRIBUTION_COLUMNS))


def contrast_deltas(table: pd.DataFrame, value: str = "balanced_log_ppl", cell_col: str = "cell") -> pd.DataFrame:
    """Per-seed deltas of the tested contrasts (the ``named`` and ``interaction`` rows of `attribution`):
    index ``seed`` (in the table's order of first appearance), one column per contrast,
    ``value(reference) - value(treated)`` (interactions: ``sum_c w_c value(c)``); NaN where a cell is
    missing or diverged. The input of the sequential design (`sandbox.sequential.decide`)."""
    _require_columns(table, [cell_col, "seed", value], "cells table")
    work = table.assign(_cell=[parse_cell(c, f"cells table column {cell_col!r}") for c in table[cell_col]],
                        _v=_finite_values(table, value))
    wide = work.pivot_table(index="seed", columns="_cell", values="_v", aggfunc="first", dropna=False)
    wide = wide.reindex(list(dict.fromkeys(work["seed"])))
    cols = {}
    for c in contrasts_for(list(wide.columns)):
        cols[c.name] = (wide[c.reference] - wide[c.treated]).to_numpy(float)
    for it in interactions_for(list(wide.columns)):
        cols[it.name] = sum(w * wide[c].to_numpy(float) for c, w in it.weights().items())
    return pd.DataFrame(cols, index=wide.index)


def _classify_rows(rows: list[dict[str, Any]], by_name: dict[str, Paired], eps: float, alpha: float) -> None:
    """Holm over the tested rows, then regime, reason and seeds_needed per tested row (in place)."""
    tested = [r for r in rows if r["kind"] in TESTED_KINDS]
    if not tested:
        return
    p_holm = holm([r["p"] for r in tested])
    m = max(1, int(np.isfinite([r["p"] for r in tested]).sum()))
    for r, ph in zip(tested, p_holm):
        pr = by_name[r["contrast"]]
        regime, reason, _ = classify(pr, float(ph), alpha, n_tests=m)
        need, why = seeds_needed(pr.mean, pr.sd, eps, alpha, n_tests=m)
        if pr.zero_variance:
            need, why = pr.n, "zero spread: every seed gives the same delta"
        r.update(p_holm=float(ph), regime=regime, seeds_needed=need,
                 reason=reason if regime == "inconclusive" else f"{reason}; {why}")


def _attr_stats(pr: Paired) -> dict[str, Any]:
    return dict(n=pr.n, n_diverged=pr.n_diverged, mean_delta=pr.mean, se=pr.se, ci_low=pr.ci_low,
                ci_high=pr.ci_high, t=pr.t, df=pr.df, p=pr.p, d_z=pr.d_z)
