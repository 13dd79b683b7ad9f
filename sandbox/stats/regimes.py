"""Regimes: the label of one paired result (`classify`), per-point summaries of a results table
(`summarize`), the label of a sweep point (`label_point`) and a sweep's summary.csv with its
control contrasts (`decompose`, `acar_summary`)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from sandbox.errors import BadInput
from sandbox.stats.comparison import DEFAULT_ALPHA, DEFAULT_EPS, Paired, _check_eps_alpha, holm, paired
from sandbox.stats.power import DEFAULT_POWER, MAX_SEEDS, seeds_needed


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
              value: str = "log_loss", eps: float = DEFAULT_EPS, alpha: float = DEFAULT_ALPHA, n_boot: int = 10_000,
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


def decompose(df: pd.DataFrame, by: list[str], eps: float = DEFAULT_EPS, alpha: float = DEFAULT_ALPHA, n_boot: int = 10_000,
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
