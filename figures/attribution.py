"""Attribution forest plot for a factorial run, from `attribution.csv`.

Rows of attribution.csv: ``contrast, kind, reference, treated, n, mean_delta, se, ci_low, ci_high,
t, df, p, d_z`` with ``kind`` = ``named`` (one paired contrast between two cells) or ``chain_sum``
(the one-factor steps router + scope + lifecycle summed per seed) or ``interaction`` (with all eight
cells: a difference of one-factor gains, `sandbox.factors.INTERACTIONS`, drawn after the named
contrasts and before ``system``). For every row
``delta = log PPL(reference) - log PPL(treated)``, so a positive delta means the treated cell is
better. A ``chain_gap`` row (chain_sum - system, as `sandbox.stats.attribution` writes it) is not
drawn as a row; its value (or, without it, the difference computed here) is printed in the title.

Layout: one row per named contrast (mean delta as a dot, 95% CI whiskers), then the direct
``system`` (R+E+L vs B3) row with the ``chain_sum`` row right beneath it, a vertical line at 0, and a
text column with mean [CI], p and n. With ``study=True`` the study's reported values are drawn as
hollow reference markers (arXiv 2605.11153: router +0.0426, scope 0 (null), lifecycle -0.028,
system +0.015).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from figures.style import OKABE_ITO, attach, format_p, new_figure, theme

#: The study's reported deltas (balanced log-PPL, nats, n = 3 seeds) per named contrast.
STUDY_VALUES: dict[str, float] = {"router": 0.0426, "scope": 0.0, "lifecycle": -0.028, "system": 0.015}


def collect(attribution: pd.DataFrame, study: bool = False) -> pd.DataFrame:
    """Forest rows in display order (top first): named contrasts as in the table, then ``system``,
    then ``chain_sum``. Adds ``label`` and ``study`` (the reported value, NaN where none or when
    ``study`` is False). ``attrs['gap']`` = chain_sum mean - system mean (NaN if either is missing)."""
    df = attribution.copy()
    if "kind" not in df:
        df["kind"] = "named"
    named = df[df["kind"] == "named"]
    chain = df[df["kind"] == "chain_sum"]
    inter = df[df["kind"] == "interaction"]
    rows = pd.concat([named[named["contrast"] != "system"], inter, named[named["contrast"] == "system"], chain])
    rows = rows.reset_index(drop=True)
    unit = str(df["unit"].iloc[0]) if "unit" in df and len(df) else "seed"
    rows.attrs["unit"] = unit   # what n counts: bases (seeds averaged within base) or seeds of one base
    rows.attrs["replication"] = (f"CIs across {int(df['bases'].iloc[0])} bases" if unit == "base" and "bases" in df
                                 else "CIs across seeds of one base" if "unit" in df else "")

    def label(r) -> str:
        if r["kind"] == "chain_sum":
            return "chain sum\n(router + scope + lifecycle)"
        if r["kind"] == "interaction":
            return f"{r['contrast']}\n(interaction, 8 cells)"
        ref, tr = r.get("reference"), r.get("treated")
        cells = f"{tr} vs {ref}" if isinstance(ref, str) and isinstance(tr, str) else ""
        return f"{r['contrast']}\n({cells})" if cells else str(r["contrast"])

    rows["label"] = [label(r) for _, r in rows.iterrows()]
    rows["study"] = [STUDY_VALUES.get(c, np.nan) if (study and k == "named") else np.nan
                     for c, k in zip(rows["contrast"], rows["kind"])]
    full = rows.loc[(rows["kind"] == "named") & (rows["contrast"] == "system"), "mean_delta"]
    csum = rows.loc[rows["kind"] == "chain_sum", "mean_delta"]
    gap_row = df[df["kind"] == "chain_gap"]
    if len(gap_row):  # the statistics module states the gap itself (and why it is not zero)
        rows.attrs["gap"] = float(gap_row["mean_delta"].iloc[0])
    else:
        rows.attrs["gap"] = float(csum.iloc[0] - full.iloc[0]) if len(full) and len(csum) else float("nan")
    return rows


def plot(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Forest plot of `collect` output; ``fig.encoding['rows']`` lists the contrasts top to bottom."""
    n = len(df)
    ypos = np.arange(n)[::-1].astype(float)  # first row at the top
    with theme():
        fig = new_figure(8.6, 1.5 + 0.62 * max(n, 1))
        ax, txt = fig.subplots(1, 2, sharey=True, width_ratios=[3.0, 1.45])
        chain_mask = (df["kind"] == "chain_sum").to_numpy()
        full_mask = ((df["kind"] == "named") & (df["contrast"] == "system")).to_numpy()
        if chain_mask.any() or full_mask.any():  # group the direct contrast with the chain's sum
            ys = ypos[chain_mask | full_mask]
            ax.axhspan(ys.min() - 0.45, ys.max() + 0.45, color="0.93", zorder=0)
        ax.axvline(0.0, color=OKABE_ITO["black"], lw=1.0, zorder=1)
        mean = df["mean_delta"].to_numpy(float)
        lo, hi = df["ci_low"].to_numpy(float), df["ci_high"].to_numpy(float)
        handles = {}
        for mask, colour, marker, name in ((~chain_mask, OKABE_ITO["blue"], "o", "contrast: mean, 95% CI"),
                                           (chain_mask, OKABE_ITO["orange"], "D", "chain sum: mean, 95% CI")):
            if mask.any():
                handles[name] = ax.errorbar(mean[mask], ypos[mask], xerr=[mean[mask] - lo[mask], hi[mask] - mean[mask]],
                                            fmt=marker, color=colour, ms=7, capsize=4, lw=1.8, zorder=3, label=name)
        study = df["study"].to_numpy(float) if "study" in df else np.full(n, np.nan)
        has_study = np.isfinite(study)
        if has_study.any():
            handles["study"] = ax.scatter(study[has_study], ypos[has_study] + 0.22, s=55, marker="o",
                                          facecolors="none", edgecolors=OKABE_ITO["vermillion"], linewidths=1.6,
                                          zorder=4, label="study's reported value")
        ax.set_yticks(ypos, df["label"].tolist())
        ax.set_ylim(-0.7, n - 0.3)
        ax.set_xlabel("delta = log PPL(reference) − log PPL(treated)  (nats; > 0: treated better)")
        ax.grid(axis="y", visible=False)
        for y, r in zip(ypos, df.itertuples()):
            ci = f"{r.mean_delta:+.4f}  [{r.ci_low:+.4f}, {r.ci_high:+.4f}]"
            n_unit = "" if df.attrs.get("unit", "seed") == "seed" else " bases"
            extra = (f"{format_p(getattr(r, 'p', np.nan))},  n = {int(r.n)}{n_unit}" if "n" in df
                     else format_p(getattr(r, "p", np.nan)))
            txt.text(0.0, y, f"{ci}\n{extra}", va="center", ha="left", fontsize=9.5, family="monospace")
        txt.set_axis_off()
        txt.set_xlim(0, 1)
        gap = df.attrs.get("gap", np.nan)
        pairing = "paired by base" if df.attrs.get("unit") == "base" else "paired by seed"
        sub = f"chain sum − system = {gap:+.4f} nats" if np.isfinite(gap) else f"{pairing}; 95% t intervals"
        if df.attrs.get("replication"):
            sub = f"{sub}; {df.attrs['replication']}"
        ax.set_title(title or f"Attribution of the full system's effect\n{sub}", loc="left", fontsize=11.5)
        txt.set_title("mean [95% CI]", loc="left", fontsize=10)
        leg = list(handles.values())
        if leg:
            fig.legend(handles=leg, loc="outside lower center", ncols=len(leg), frameon=False)
    return attach(fig, kind="attribution", rows=df["contrast"].tolist(), kinds=df["kind"].tolist(),
                  y=ypos, points=handles, study_points=handles.get("study"), gap=gap)
