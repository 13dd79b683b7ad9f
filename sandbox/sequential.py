"""Group-sequential design for adding seeds in rounds (`sandbox factorial --seeds-to-resolve N`).

A factorial with few seeds leaves contrasts ``inconclusive``; adding seeds and re-testing after
every round inflates the error rate unless the level is spent across the looks. This module is that
design, and only that (numpy/scipy, no torch):

- **Alpha spending (Lan-DeMets).** The information fraction of a look with ``n`` seeds is
  ``t = n / N`` (``N`` = the most seeds the run may reach). The cumulative level spent by ``t`` is
  ``alpha(t)``: O'Brien-Fleming type (``obf``, the default) ``2 - 2 Phi(z_{1-alpha/2} / sqrt(t))``,
  which keeps almost all of alpha for the last look, or Pocock type (``pocock``)
  ``alpha ln(1 + (e - 1) t)``, which spends more early. ``alpha(1) = alpha``.
- **Boundaries.** Two-sided z boundaries ``c_1..c_K`` with
  ``P(|Z_1| < c_1, .., |Z_{k-1}| < c_{k-1}, |Z_k| >= c_k) = alpha(t_k) - alpha(t_{k-1})`` under the
  canonical joint normal of the looks (``Z_k = W(t_k) / sqrt(t_k)``, W a Brownian motion), by
  recursive numerical integration (Armitage, McPherson and Rowe 1969) on a grid. Looks may be
  unplanned and uneven: only their fractions so far enter.
- **Exact with t tests on few seeds: the inverse-normal combination** (Lehmacher and Wassmer
  1999). Each round's new seeds form a stage; the stage's own paired t statistic becomes
  ``z_j = Phi^-1(F_t(T_j))`` (exactly N(0, 1) under the null for normal deltas, independent across
  stages), and look k tests ``Z_k = sum_j sqrt(n_j) z_j / sqrt(sum_j n_j)`` against ``c_k``.
  ``(Z_1..Z_K)`` has exactly the joint law the boundaries assume, so the level holds with a t test
  on 3 seeds. (Applying the boundaries' nominal p-levels to the pooled paired t instead was measured
  at 0.052-0.056 for alpha 0.05 with looks at 3, 6, 9, 12 seeds: the looks' variance estimates
  are correlated in a way the normal theory ignores.) Rounds must add at least 2 seeds.
- **Several contrasts: Holm with recycling** (Maurer and Bretz 2013, the graphical approach with
  Holm's graph). Each open contrast is tested with the boundaries of a design at level
  ``alpha / m_open``; when one is rejected its level passes to the rest (``m_open`` drops) and the
  current look is re-checked. The familywise error over contrasts AND looks stays at ``alpha``.
- **Equivalence** (``ties``): both one-sided tests of the TOST (``delta <= -eps``, ``delta >= eps``),
  each combined the same way, beyond the boundaries of a two-sided design at ``2 alpha`` (one-sided
  alpha each; as in `sandbox.stats.classify`, the TOST is not Holm-adjusted: an intersection-union
  test). Once a
  contrast is classified (``beats``/``degrades``, ``<eps`` when the repeated CI lies inside +-eps,
  or ``ties``) it stays so; the run stops when every contrast is classified or N is reached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize, special, stats

from sandbox.errors import check, require

SPENDINGS = ("obf", "pocock")
_GRID = 801          # grid points of the continuation region (odd: includes 0)


def spent(t: float, alpha: float, kind: str = "obf") -> float:
    """Cumulative level spent by information fraction ``t`` (clamped to [0, 1])."""
    require(kind in SPENDINGS, "spending", kind, "one of " + ", ".join(SPENDINGS))
    t = min(1.0, max(0.0, float(t)))
    if t == 0.0:
        return 0.0
    if kind == "obf":
        return float(2.0 - 2.0 * special.ndtr(special.ndtri(1.0 - alpha / 2.0) / math.sqrt(t)))
    return float(alpha * math.log(1.0 + (math.e - 1.0) * t))


def boundaries(fractions: Sequence[float], alpha: float, kind: str = "obf") -> np.ndarray:
    """Two-sided z boundaries ``(K,)`` for looks at increasing information fractions (``inf`` where a
    look spends nothing, e.g. past ``t = 1``)."""
    t = np.minimum(np.asarray(fractions, dtype=float), 1.0)
    check(t.ndim == 1 and t.size >= 1 and (t > 0).all() and (np.diff(t) >= 0).all(), "fractions", list(fractions),
            "increasing information fractions in (0, 1]")
    out = np.empty(t.size)
    grid, dens = None, None           # continuation density of W(t_{k-1}) on its grid
    prev_t, prev_spent = 0.0, 0.0
    for k, tk in enumerate(t):
        inc = spent(tk, alpha, kind) - prev_spent
        if grid is None:              # first look: |W(t1)| >= c sqrt(t1) with probability inc
            c = math.inf if inc <= 1e-15 else float(special.ndtri(1.0 - inc / 2.0))
            b = c * math.sqrt(tk)
            out[k] = c
            half = b if math.isfinite(b) else 9.0 * math.sqrt(tk)
            grid = np.linspace(-half, half, _GRID)
            dens = np.exp(-grid ** 2 / (2 * tk)) / math.sqrt(2 * math.pi * tk)
        else:
            sd = math.sqrt(max(tk - prev_t, 1e-300))
            w = _trapezoid_weights(grid) * dens                                  # (G,) mass per grid point

            def cross(bnd: float) -> float:
                return float(w @ (special.ndtr((-bnd - grid) / sd) + special.ndtr((grid - bnd) / sd)))

            if inc <= 1e-15 or cross(60.0) >= inc:
                b = math.inf
            else:
                hi = 60.0
                lo = 1e-9
                b = optimize.brentq(lambda x: cross(x) - inc, lo, hi, xtol=1e-12) if cross(lo) > inc else lo
            out[k] = b / math.sqrt(tk)
            half = b if math.isfinite(b) else float(np.abs(grid).max() + 9.0 * sd)
            new = np.linspace(-half, half, _GRID)
            kern = np.exp(-(new[:, None] - grid[None, :]) ** 2 / (2 * sd * sd)) / (sd * math.sqrt(2 * math.pi))
            grid, dens = new, kern @ w
        prev_t, prev_spent = tk, spent(tk, alpha, kind)
    return out


def _trapezoid_weights(x: np.ndarray) -> np.ndarray:
    h = np.diff(x)
    w = np.zeros_like(x)
    w[:-1] += h / 2
    w[1:] += h / 2
    return w


def nominal_levels(fractions: Sequence[float], alpha: float, kind: str = "obf") -> np.ndarray:
    """Two-sided nominal p-value thresholds ``(K,)``, ``2 (1 - Phi(c_k))`` (0 where ``c_k = inf``)."""
    c = boundaries(fractions, alpha, kind)
    return np.where(np.isfinite(c), 2.0 * special.ndtr(-c), 0.0)


def holm_levels(fractions: Sequence[float], alpha: float, m: int, kind: str = "obf") -> np.ndarray:
    """``(m + 1, K)``: row j = the nominal levels of a design at ``alpha / j`` (row 0 = zeros)."""
    rows = [np.zeros(len(fractions))] + [nominal_levels(fractions, alpha / j, kind) for j in range(1, m + 1)]
    return np.stack(rows)


def sequential_holm(p: np.ndarray, fractions: Sequence[float], alpha: float, kind: str = "obf",
                    levels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Holm with recycling over looks: ``p (..., K, m)`` two-sided p-values of m contrasts at K looks.

    Returns ``(rejected_at (..., m), level (..., K, m))``: the first look (0-based) at which each
    contrast is rejected (-1 = never) and the nominal level each open contrast faced at each look
    (after the look's recycling; NaN once rejected). NaN p-values never reject.
    """
    p = np.asarray(p, dtype=float)
    K, m = p.shape[-2], p.shape[-1]
    L = holm_levels(fractions, alpha, m, kind) if levels is None else levels       # (m + 1, K)
    shape = p.shape[:-2]
    p = p.reshape(-1, K, m)                                                       # (B, K, m)
    batch = p.shape[:1]
    rejected = np.zeros((*batch, m), dtype=bool)
    at = np.full((*batch, m), -1, dtype=int)
    faced = np.full((*batch, K, m), np.nan)
    for k in range(K):
        pk = np.where(np.isnan(p[..., k, :]), np.inf, p[..., k, :])               # (..., m)
        while True:
            open_ = ~rejected
            m_open = open_.sum(-1)                                                # (...)
            level = L[m_open, k]                                                  # (...)
            cand = np.where(open_, pk, np.inf)
            i = cand.argmin(-1)                                                   # (...)
            pmin = np.take_along_axis(cand, i[..., None], -1)[..., 0]
            new = pmin < level
            if not new.any():
                break
            idx = np.nonzero(new)
            rejected[(*idx, i[idx])] = True
            at[(*idx, i[idx])] = k
            faced[idx[0], k, i[idx]] = level[idx]                                # the level it beat
        still = ~rejected                                                         # open after this look
        lvl = L[np.maximum(still.sum(-1), 1), k][..., None]                       # (..., 1)
        faced[..., k, :] = np.where(still, lvl, faced[..., k, :])
    return at.reshape(*shape, m), faced.reshape(*shape, K, m)


def stage_z(delta: np.ndarray, looks: Sequence[int], shift: float = 0.0) -> np.ndarray:
    """Per-stage z statistics ``(..., K, m)`` from per-seed deltas ``(..., S, m)`` (seeds in the order
    they were added; NaN = diverged or missing, dropped within its stage).

    Stage k holds seeds ``looks[k-1] .. looks[k] - 1``; its paired t statistic
    ``T = (mean + shift) / (sd / sqrt(n))`` on ``n - 1`` df becomes ``z = Phi^-1(F_t(T))``, exactly
    N(0, 1) under ``delta = -shift`` for normal deltas, and independent across stages (disjoint
    seeds). A stage with fewer than 2 finite deltas gives 0 (no information); zero spread gives
    ``+-inf`` (or 0 when ``mean + shift`` is exactly 0)."""
    delta = np.asarray(delta, dtype=float)
    out = []
    lo = 0
    for hi in looks:
        d = delta[..., lo:hi, :] + shift                                              # (..., n_k, m)
        ok = np.isfinite(d)
        n = ok.sum(-2)                                                                # (..., m)
        dz = np.where(ok, d, 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = dz.sum(-2) / n
            var = (np.where(ok, d - mean[..., None, :], 0.0) ** 2).sum(-2) / (n - 1)
            t = mean / np.sqrt(var / n)
            df = np.maximum(n - 1, 1)
            z = np.where(t > 0, stats.norm.isf(stats.t.sf(t, df)), stats.norm.ppf(stats.t.cdf(t, df)))
            z = np.where(var == 0, np.where(mean == 0, 0.0, np.sign(mean) * np.inf), z)
        z = np.where(n >= 2, z, 0.0)
        out.append(np.nan_to_num(z, nan=0.0, posinf=np.inf, neginf=-np.inf))
        lo = hi
    return np.stack(out, -2)


def combined_z(z: np.ndarray, looks: Sequence[int]) -> np.ndarray:
    """Inverse-normal combination (Lehmacher and Wassmer 1999): ``Z_k = sum_{j<=k} w_j z_j /
    sqrt(sum_{j<=k} w_j^2)`` with the planned weights ``w_j = sqrt(stage size)``. Under the null,
    ``(Z_1..Z_K)`` has exactly the canonical joint normal of a group-sequential design with
    information fractions ``looks_k / N``, so `boundaries` apply exactly, whatever the spread
    and however few seeds a stage has (>= 2)."""
    sizes = np.diff(np.r_[0, np.asarray(looks, dtype=float)])                        # (K,)
    w = np.sqrt(sizes)
    shape = [1] * z.ndim
    shape[-2] = len(sizes)
    w = w.reshape(shape)
    with np.errstate(invalid="ignore"):
        num = np.cumsum(w * z, axis=-2)
    return num / np.sqrt(np.cumsum(sizes)).reshape(shape)


@dataclass(frozen=True)
class Decision:
    """The sequential verdict of one contrast.

    Attributes:
        contrast: the contrast's name.
        regime: ``beats``, ``degrades`` (``<eps`` when the look's repeated CI lies inside +-eps),
            ``ties`` or ``inconclusive``.
        look: 1-based look at which it was classified (0 = not yet).
        seeds: seeds in the run at that look (the last look's when unclassified).
        reason: one line: the combined z against the boundary of that look.
    """

    contrast: str
    regime: str
    look: int
    seeds: int
    reason: str


def decide(delta: np.ndarray, names: Sequence[str], looks: Sequence[int], n_max: int, alpha: float, eps: float,
           kind: str = "obf") -> tuple[list[Decision], list[dict]]:
    """Replay the design over the looks so far.

    Args:
        delta: ``(S, m)`` per-seed deltas of the m contrasts (``reference - treated``), rows in the
            order the seeds were added; NaN = diverged or missing.
        names: the m contrast names.
        looks: seeds in the run at each look so far (increasing; stages of >= 2 seeds).
        n_max: the most seeds the run may reach (``--seeds-to-resolve``); fractions ``looks_k / n_max``.
    Returns one `Decision` per contrast and the rows of ``sequential.csv`` (one per look and contrast:
    ``look, seeds, fraction, alpha_spent, contrast, n, mean_delta, z, boundary, z_tost, boundary_tost,
    decision``).
    """
    require(isinstance(n_max, int) and n_max >= 2, "seeds_to_resolve", n_max, "an integer >= 2")
    require(kind in SPENDINGS, "spending", kind, "one of " + ", ".join(SPENDINGS))
    delta = np.asarray(delta, dtype=float)
    frac = [min(1.0, s / n_max) for s in looks]
    Z = combined_z(stage_z(delta, looks), looks)                                      # (K, m)
    p = 2.0 * special.ndtr(-np.abs(Z))
    rej_at, faced = sequential_holm(p, frac, alpha, kind)
    # TOST: H0 delta <= -eps (statistic of delta + eps) and H0 delta >= eps (of -(delta - eps)), each one-sided
    # at alpha through the two-sided boundaries of level 2 alpha.
    z_low = combined_z(stage_z(delta, looks, eps), looks)
    z_upp = -combined_z(stage_z(delta, looks, -eps), looks)
    z_tost = np.minimum(z_low, z_upp)
    c_tost = boundaries(frac, min(2 * alpha, 0.999), kind)                           # (K,)
    decisions, rows = [], []
    for j, c in enumerate(names):
        verdict, look, why = "inconclusive", 0, ""
        for k, nk in enumerate(looks):
            d = delta[:nk, j]
            d = d[np.isfinite(d)]
            mean = float(d.mean()) if d.size else math.nan
            c_k = float(stats.norm.isf(faced[k, j] / 2)) if faced[k, j] > 0 else math.inf
            if verdict == "inconclusive":
                if rej_at[j] == k:
                    lo, hi = _repeated_ci(d, faced[k, j])
                    verdict = "beats" if Z[k, j] > 0 else "degrades"
                    if -eps < lo and hi < eps:
                        verdict += "<eps"
                    look, why = k + 1, (f"combined z {Z[k, j]:+.3g} beyond boundary {c_k:.3g} at look {k + 1} "
                                        f"({nk} seeds), repeated CI [{lo:.4g}, {hi:.4g}]")
                elif z_tost[k, j] >= c_tost[k]:
                    verdict, look = "ties", k + 1
                    why = (f"TOST combined z {z_tost[k, j]:.3g} >= boundary {c_tost[k]:.3g} at look {k + 1} "
                           f"({nk} seeds), margin +-{eps:g}")
            rows.append(dict(look=k + 1, seeds=nk, fraction=frac[k], alpha_spent=spent(frac[k], alpha, kind),
                             contrast=c, n=int(d.size), mean_delta=mean, z=float(Z[k, j]), boundary=c_k,
                             z_tost=float(z_tost[k, j]), boundary_tost=float(c_tost[k]), decision=verdict))
        if verdict == "inconclusive":
            k = len(looks) - 1
            why = (f"not classified after {len(looks)} look(s) ({looks[k]} of at most {n_max} seeds): combined z "
                   f"{Z[k, j]:+.3g} vs boundary {rows[-1]['boundary']:.3g}, TOST z {z_tost[k, j]:.3g} vs "
                   f"{c_tost[k]:.3g}")
        decisions.append(Decision(c, verdict, look, looks[look - 1] if look else looks[-1], why))
    return decisions, rows


def _repeated_ci(d: np.ndarray, level: float) -> tuple[float, float]:
    """``mean -+ t_{1 - level/2, n-1} se`` of the pooled deltas: a CI at the look's nominal level."""
    n = d.size
    if n < 2:
        return (float(d.mean()),) * 2 if n else (math.nan, math.nan)
    mean, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    half = float(stats.t.isf(level / 2, n - 1)) * se if level > 0 else math.inf
    return mean - half, mean + half


def look_schedule(start: int, n_max: int, round_seeds: int) -> list[int]:
    """Seeds at each look: ``start, start + round, ..`` capped at ``n_max`` (``[start]`` if start >= n_max)."""
    out = [start]
    while out[-1] < n_max:
        out.append(min(n_max, out[-1] + round_seeds))
    return out
