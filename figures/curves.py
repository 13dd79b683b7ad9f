"""Learning curves of full-system runs (`curves.csv`) and per-cell results of a factorial (`cells.csv`).

curves.csv rows: ``step, domain, nll, log_ppl, floor`` (+ optional ``seed``, ``cell``); the
domain ``balanced`` holds the balanced metric (mean over domains of per-domain mean token NLL).
``floor`` is the domain's true entropy rate in nats per token where the corpus knows it: no model
can go below it, so the gap to the dashed floor is what is left to learn.

cells.csv rows: ``cell, seed, balanced_log_ppl, diverged, ...``. The cells figure shows each seed's
balanced log-PPL per cell, joined across cells by seed, because every contrast is paired by seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from figures.style import OKABE_ITO, attach, category_colours, new_figure, theme

BALANCED = "balanced"


def collect(curves: pd.DataFrame, cell: str | None = None) -> pd.DataFrame:
    """Mean over seeds of ``log_ppl`` and ``floor`` per ``step, domain`` (one `cell` if several).

    Averaging log-PPL (a log quantity) over seeds is the right aggregate; PPL itself is never
    averaged."""
    df = curves
    if "cell" in df and cell is not None:
        df = df[df["cell"].astype(str) == str(cell)]
    elif "cell" in df and df["cell"].nunique() > 1:
        raise ValueError("curves table holds several cells; pass cell=...")
    cols = ["log_ppl"] + (["floor"] if "floor" in df else [])
    out = df.groupby(["domain", "step"], as_index=False, sort=True)[cols].mean()
    if "floor" not in out:
        out["floor"] = np.nan
    if "seed" in df:
        out.attrs["n_seeds"] = int(df["seed"].nunique())
    out.attrs["cell"] = cell
    return out


def plot(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Per-domain log-PPL against step (thin), the balanced curve (thick black), floors dashed."""
    domains = [d for d in pd.unique(df["domain"]) if str(d) != BALANCED]
    colours = category_colours(sorted(domains, key=str))
    lines, floors = {}, {}
    with theme():
        fig = new_figure(9.0, 5.4)
        ax = fig.add_subplot()
        for d in sorted(domains, key=str):
            sub = df[df["domain"] == d].sort_values("step")
            (lines[d],) = ax.plot(sub["step"], sub["log_ppl"], color=colours[d], lw=1.4, label=str(d))
            f = sub["floor"].dropna()
            if len(f):
                floors[d] = ax.axhline(float(f.iloc[-1]), color=colours[d], lw=1.0, ls="--", alpha=0.9)
        bal = df[df["domain"].astype(str) == BALANCED].sort_values("step")
        if len(bal):
            (lines[BALANCED],) = ax.plot(bal["step"], bal["log_ppl"], color=OKABE_ITO["black"], lw=2.6,
                                         label="balanced (mean over domains)")
            f = bal["floor"].dropna()
            if len(f):
                floors[BALANCED] = ax.axhline(float(f.iloc[-1]), color=OKABE_ITO["black"], lw=1.4, ls="--")
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("held-out log-PPL  (nats per token)")
        n = df.attrs.get("n_seeds")
        cell = df.attrs.get("cell")
        bits = [f"cell {cell}" if cell else "", f"mean of {n} seeds" if n else ""]
        sub = ", ".join(b for b in bits if b)
        ax.set_title(title or "Learning curves per domain" + (f" — {sub}" if sub else ""), fontsize=12)
        handles = list(lines.values())
        if floors:
            handles.append(Line2D([], [], color="0.3", ls="--", lw=1.0, label="entropy floor (same colour)"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="domain")
    return attach(fig, kind="curves", lines=lines, floors=floors, domains=domains)


def collect_cells(cells: pd.DataFrame, value: str = "balanced_log_ppl") -> pd.DataFrame:
    """``cell, seed, value, diverged`` in design order (B3 first, then by number of factors)."""
    from sandbox.factors import parse_cell

    df = cells.copy()
    if "diverged" not in df:
        df["diverged"] = False
    df["diverged"] = df["diverged"].astype(bool) | ~np.isfinite(df[value].astype(float))
    order = sorted({str(c) for c in df["cell"]}, key=lambda c: parse_cell(c))
    df["cell"] = pd.Categorical(df["cell"].astype(str), categories=order, ordered=True)
    df = df.sort_values(["cell", "seed"]).reset_index(drop=True)
    df.attrs["value"] = value
    return df[["cell", "seed", value, "diverged"]]


def plot_cells(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Each seed's balanced log-PPL per cell, joined by seed; diverged runs marked, never plotted
    as values."""
    value = df.attrs.get("value", "balanced_log_ppl")
    order = list(df["cell"].cat.categories)
    xpos = {c: i for i, c in enumerate(order)}
    seeds = sorted(df["seed"].unique())
    colours = category_colours(seeds)
    with theme():
        fig = new_figure(max(5.5, 1.2 + 1.1 * len(order)), 4.8)
        ax = fig.add_subplot()
        ok = df[~df["diverged"]]
        for s in seeds:  # a diverged cell is a gap in its seed's line, not a value
            sub = df[df["seed"] == s]
            y = sub[value].astype(float).where(~sub["diverged"])
            ax.plot([xpos[c] for c in sub["cell"]], y, color=colours[s], marker="o", lw=1.2,
                    ms=6, label=f"seed {s}")
        means = ok.groupby("cell", observed=False)[value].mean()
        ax.scatter([xpos[c] for c in means.index], means.to_numpy(float), marker="_", s=900, color="0.2",
                   zorder=4, label="mean over seeds")
        bad = df[df["diverged"]]
        if len(bad):
            ax.scatter([xpos[c] for c in bad["cell"]], np.full(len(bad), ax.get_ylim()[1]), marker="x",
                       color=OKABE_ITO["vermillion"], s=60, clip_on=False, label=f"diverged ({len(bad)})")
        ax.set_xticks(range(len(order)), order)
        ax.set_xlim(-0.6, len(order) - 0.4)
        ax.set_xlabel("cell")
        ax.set_ylabel("balanced log-PPL  (nats per token)")
        ax.set_title(title or "Balanced log-PPL per cell (lines join a seed)", fontsize=12)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return attach(fig, kind="cells", cells=order, n_points=int(len(ok)), n_diverged=int(len(bad)))


def collect_runs(curves: dict[str, pd.DataFrame], cells: tuple[str, ...] = ("B3", "R")) -> pd.DataFrame:
    """Balanced held-out log-PPL per ``run, cell, step``, mean over seeds, from several factorial
    runs' curves.csv (``{label: table}``, e.g. ``{"fair start": ..., "zero start": ...}``), for the
    named cells. Compares runs that differ in one setting (e.g. ``--router-init``) on the same base."""
    parts = []
    for label, df in curves.items():
        sub = df[(df["domain"].astype(str) == BALANCED) & df["cell"].astype(str).isin(cells)]
        g = sub.groupby(["cell", "step"], as_index=False)["log_ppl"].mean()
        g["n_seeds"] = sub.groupby(["cell", "step"])["seed"].nunique().to_numpy() if "seed" in sub else 1
        parts.append(g.assign(run=label))
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["run", "cell", "step", "log_ppl"])
    return out[["run", "cell", "step", "log_ppl", "n_seeds"]]


def plot_runs(df: pd.DataFrame, base: float | None = None, title: str | None = None) -> Figure:
    """One line per (run, cell): colour = cell, line style = run; the plain base as a grey line."""
    cells = sorted(pd.unique(df["cell"].astype(str)), key=str)
    runs = list(pd.unique(df["run"].astype(str)))
    colours = category_colours(cells)
    styles = ["-", "--", ":", "-."]
    lines = {}
    with theme():
        fig = new_figure(9.0, 5.0)
        ax = fig.add_subplot()
        for i, r in enumerate(runs):
            for c in cells:
                sub = df[(df["run"].astype(str) == r) & (df["cell"].astype(str) == c)].sort_values("step")
                if len(sub):
                    (lines[(r, c)],) = ax.plot(sub["step"], sub["log_ppl"], color=colours[c], ls=styles[i % 4],
                                               lw=2.0, marker="o", ms=4, label=f"{c}, {r}")
        if base is not None:
            ax.axhline(base, color="0.5", lw=1.0, label="plain frozen base")
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("balanced held-out log-PPL  (nats per token)")
        ax.set_title(title or "Learning curves by cell and run (mean over seeds)", fontsize=12)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return attach(fig, kind="curves_runs", lines=lines, runs=runs, cells=cells)
