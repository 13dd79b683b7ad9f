"""The unit of replication of a factorial: seeds on one base, or bases.

A seed of a transformer factorial adapts one pretrained base (`substrate.cell.CellConfig.base_seed`,
``seed mod bases``). Seeds that share a base share its weights and specialists, so their contrasts
are not independent of the base: across 4 ``tiny`` bases the router contrast varied with an SD of
0.0013 nats, six times the within-base standard error behind a t of -43. Tests over seeds are then
conditional on that base, and a CI over them says nothing about another base.

The choice made here: **the base is the unit.** With two or more bases in the table, each cell's
value is averaged over the seeds of each base first (`base_means`), and the paired statistics of
`sandbox.stats.attribution` run across bases (n = bases, df = bases - 1): a paired t test on the
per-base means, which is the exact test of the nested design (seeds within bases) when every base has
the same number of seeds, and a conservative one otherwise (each base counts once, however many
seeds it has). A random-effects model (bases random, seeds nested) would use the seeds' spread as
well; with 3 to 5 bases its variance components are poorly estimated, and the per-base means give
the same answer in the balanced case, so they are used. With one base the statistics run across
seeds, as before, and every table and the manifest say they are conditional on that base.

Divergence: a seed whose value is not finite in some cell of the table is left out of its base's
means for every cell (so each base's cells stay paired on the same seeds); a base left with no seed
is a diverged pair of the base-level test (counted in ``n_diverged``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from sandbox import stats
from sandbox.errors import BadInput

#: The cells table's column that names a row's base.
BASE = "base"


def bases_of(table: pd.DataFrame) -> list[int]:
    """The distinct bases of a cells table (a table without a ``base`` column is on base 0)."""
    if BASE not in table:
        return [0]
    return sorted(int(b) for b in pd.unique(table[BASE]))


def replication(table: pd.DataFrame, requested: int | None = None) -> dict[str, Any]:
    """What the statistics of `table` replicate over: ``{unit, bases, seeds, seeds_per_base,
    bases_requested, statement}``; unit ``base`` with two or more bases in the table, else ``seed``."""
    bases = bases_of(table)
    per = (table.drop_duplicates("seed").groupby(BASE)["seed"].count() if BASE in table
           else pd.Series({0: table["seed"].nunique()}))
    seeds = int(table["seed"].nunique())
    multi = len(bases) >= 2
    statement = (f"CIs across {len(bases)} bases (seeds averaged within each base first)" if multi else
                 f"conditional on one base (base {bases[0]}): CIs across {seeds} seeds of that base")
    return {"unit": "base" if multi else "seed", "bases": len(bases), "seeds": seeds,
            "seeds_per_base": {str(int(b)): int(n) for b, n in per.items()},
            "bases_requested": requested, "statement": statement}


def base_means(table: pd.DataFrame, value: str = "balanced_log_ppl", cell_col: str = "cell") -> pd.DataFrame:
    """One row per (cell, base): ``value`` averaged over the base's seeds that are finite in every
    cell of the table (NaN when none is), with ``seeds`` (used) and ``seeds_dropped`` (not finite in
    some cell). Columns ``cell_col, base, value, seeds, seeds_dropped``."""
    for c in (cell_col, "seed", value):
        if c not in table:
            raise BadInput("cells table", sorted(table.columns), f"a column {c!r}")
    work = table.assign(**{BASE: table[BASE] if BASE in table else 0,
                           "_v": pd.to_numeric(table[value], errors="coerce").astype(float)})
    if "diverged" in work:
        work.loc[work["diverged"].fillna(False).astype(bool), "_v"] = math.nan
    dup = work.duplicated([cell_col, "seed"])
    if dup.any():
        raise BadInput("cells table", work.loc[dup, [cell_col, "seed"]].iloc[0].to_dict(), "one row per (cell, seed)")
    wide = work.pivot(index="seed", columns=cell_col, values="_v")          # (seeds, cells); NaN = diverged or missing
    ok = pd.Series(np.isfinite(wide.to_numpy(float)).all(axis=1), index=wide.index)
    base_of = work.drop_duplicates("seed").set_index("seed")[BASE]
    rows = []
    for b in sorted(pd.unique(base_of)):
        seeds = base_of.index[base_of == b]
        use = [s for s in seeds if ok[s]]
        for cell in wide.columns:
            v = float(wide.loc[use, cell].mean()) if use else math.nan
            rows.append({cell_col: cell, BASE: int(b), value: v, "seeds": len(use), "seeds_dropped": len(seeds) - len(use)})
    return pd.DataFrame(rows, columns=[cell_col, BASE, value, "seeds", "seeds_dropped"])


def attribution(table: pd.DataFrame, value: str = "balanced_log_ppl", eps: float = stats.DEFAULT_EPS,
                alpha: float = stats.DEFAULT_ALPHA, cell_col: str = "cell", **kw) -> pd.DataFrame:
    """`sandbox.stats.attribution` with the base as the unit when the table spans two or more bases
    (on `base_means`, one "seed" per base), else across seeds. Adds ``unit`` (base or seed) and
    ``bases``; ``n`` (and ``seeds_needed``) count units: bases when the unit is the base."""
    rep = replication(table)
    if rep["unit"] == "base":
        means = base_means(table, value, cell_col)
        att = stats.attribution(means.rename(columns={BASE: "seed"}), value=value, eps=eps, alpha=alpha,
                                cell_col=cell_col, **kw)
    else:
        att = stats.attribution(table, value=value, eps=eps, alpha=alpha, cell_col=cell_col, **kw)
    return att.assign(unit=rep["unit"], bases=rep["bases"])


def router_lr_columns(att: pd.DataFrame, cells: pd.DataFrame, tuned: bool | None = None) -> pd.DataFrame:
    """`att` with the router lr each side of a contrast ran (``treated_router_lr``,
    ``reference_router_lr``: the cell's value in `cells`, NaN for a side that is not one cell or ran
    several), ``router_lr_tuned`` (`tuned`, else read from the cells' ``router_lr_tuned`` column,
    False without it) and each side's convergence label. `att` unchanged when `cells` has no
    ``router_lr`` (tables written before the column existed)."""
    if "router_lr" not in cells:
        return att
    if tuned is None:
        tuned = bool(cells["router_lr_tuned"].astype(str).str.lower().eq("true").any()) \
            if "router_lr_tuned" in cells else False
    lr = {c: (float(v.iloc[0]) if v.nunique() == 1 else math.nan)
          for c, v in cells.groupby("cell", sort=False)["router_lr"]}
    conv = dict(zip(cells["cell"], cells["converged"])) if "converged" in cells else {}
    att = att.copy()
    for side in ("treated", "reference"):
        att[f"{side}_router_lr"] = [lr.get(c, math.nan) if isinstance(c, str) else math.nan for c in att[side]]
        att[f"{side}_converged"] = [conv.get(c, "") if isinstance(c, str) else "" for c in att[side]]
    att["router_lr_tuned"] = tuned
    return att


def contrasts(table: pd.DataFrame, value: str = "balanced_log_ppl", cell_col: str = "cell") -> pd.DataFrame:
    """Per-seed deltas of the tested contrasts (`sandbox.stats.contrast_deltas`) in long form with the
    seed's base: columns ``contrast, base, seed, delta`` (the rows behind `attribution`'s base means)."""
    deltas = stats.contrast_deltas(table, value, cell_col)
    base_of = (table.drop_duplicates("seed").set_index("seed")[BASE] if BASE in table
               else pd.Series(0, index=deltas.index))
    long = deltas.rename_axis("seed").reset_index().melt(id_vars="seed", var_name="contrast", value_name="delta")
    long[BASE] = [int(base_of[s]) for s in long["seed"]]
    return long[["contrast", BASE, "seed", "delta"]]
