"""Factorial attribution: the named contrasts, the one-factor chain and its gap, the interactions
(attribution.csv), and the per-seed deltas the sequential design reads."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from sandbox.errors import BadInput
from sandbox.factors import CHAIN, CONTRASTS, Cell, contrasts_for, interactions_for, parse_cell
from sandbox.stats.comparison import DEFAULT_ALPHA, DEFAULT_EPS, Paired, _check_eps_alpha, _describe, holm, paired
from sandbox.stats.power import seeds_needed
from sandbox.stats.regimes import _finite_values, _require_columns, classify


ATTRIBUTION_COLUMNS = ("contrast", "kind", "reference", "treated", "n", "n_diverged", "mean_delta", "se",
                       "ci_low", "ci_high", "t", "df", "p", "d_z", "p_holm", "regime", "seeds_needed", "reason", "note")
#: Kinds of attribution.csv rows that are tested (Holm family, regimes, seeds_needed, sequential design).
TESTED_KINDS = ("named", "interaction")


def attribution(table: pd.DataFrame, value: str = "balanced_log_ppl", eps: float = DEFAULT_EPS,
                alpha: float = DEFAULT_ALPHA, cell_col: str = "cell", n_boot: int = 10_000, seed: int = 0) -> pd.DataFrame:
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
