"""Learning curves of full-system runs (`curves.csv`) and per-cell results of a factorial (`cells.csv`).

curves.csv rows: ``step, domain, nll, log_ppl, floor`` (+ optional ``seed``, ``cell``); the
domain ``balanced`` holds the balanced metric (mean over domains of per-domain mean token NLL).
``floor`` is the domain's true entropy rate in nats per token where the corpus knows it: no model
can go below it. Adaptation moves log-PPL by hundredths of a nat while the floor is often more
than a nat below, so a curve drawn on the log-PPL axis with the floors in view is a flat line.
The figures therefore plot effects on axes scaled to them:

- one run (`plot`): each domain's change since step 0, ``log_ppl(t) - log_ppl(0)`` (negative =
  better), the gap left to each floor at the end written in the legend;
- several cells (`collect_delta` / `plot_delta`, one figure for the whole factorial instead of one
  near-copy per cell): each cell's balanced log-PPL against the reference cell's (B3) at every
  evaluation step, ``delta = log PPL_ref - log PPL_cell`` per seed (positive = the cell is better),
  mean over seeds with a 95% t interval.

cells.csv rows: ``cell, seed, balanced_log_ppl, diverged, ...``. The cells figure shows each seed's
balanced log-PPL per cell, joined across cells by seed, because every contrast is paired by seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

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
        out.attrs["seed"] = df["seed"].iloc[0] if df["seed"].nunique() == 1 else None
    if cell is None and "cell" in df and df["cell"].nunique() == 1:
        cell = df["cell"].iloc[0]
    out.attrs["cell"] = cell
    return out


def _change(sub: pd.DataFrame) -> tuple[np.ndarray, float, float]:
    """``(log_ppl - log_ppl at the first step, end value, end gap to the floor)`` of one domain's rows."""
    y = sub["log_ppl"].to_numpy(float)
    f = sub["floor"].dropna()
    gap = float(y[-1] - f.iloc[-1]) if len(f) and len(y) else float("nan")
    return y - y[0], float(y[-1]) if len(y) else float("nan"), gap


def plot(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Per-domain change in log-PPL since step 0 (thin), the balanced change (thick black); the gap
    left to each entropy floor at the end in the legend (the floors are off this axis's scale)."""
    domains = [d for d in pd.unique(df["domain"]) if str(d) != BALANCED]
    colours = category_colours(sorted(domains, key=str))
    lines, gaps = {}, {}
    with theme():
        fig = new_figure(9.4, 5.4)
        ax = fig.add_subplot()
        ax.axhline(0.0, color="0.5", lw=1.0, zorder=1)
        for d in sorted(domains, key=str):
            sub = df[df["domain"] == d].sort_values("step")
            y, end, gaps[d] = _change(sub)
            gap = f", {gaps[d]:.3f} above floor" if np.isfinite(gaps[d]) else ""
            (lines[d],) = ax.plot(sub["step"], y, color=colours[d], lw=1.4, marker="o", ms=3,
                                  label=f"{d} (end {end:.3f}{gap})")
        bal = df[df["domain"].astype(str) == BALANCED].sort_values("step")
        if len(bal):
            y, end, gaps[BALANCED] = _change(bal)
            gap = f", {gaps[BALANCED]:.3f} above floor" if np.isfinite(gaps[BALANCED]) else ""
            (lines[BALANCED],) = ax.plot(bal["step"], y, color=OKABE_ITO["black"], lw=2.6, marker="o", ms=4,
                                         label=f"balanced (end {end:.3f}{gap})")
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("held-out log-PPL change since step 0\n(nats per token; < 0: better)")
        n = df.attrs.get("n_seeds")
        cell = df.attrs.get("cell")
        one = df.attrs.get("seed")
        bits = [f"cell {cell}" if cell else "", f"seed {one}" if n == 1 and one is not None else
                (f"mean of {n} seeds" if n else "")]
        sub = ", ".join(b for b in bits if b)
        ax.set_title(title or "Learning curves per domain" + (f" — {sub}" if sub else ""), fontsize=12)
        ax.legend(handles=list(lines.values()), loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="domain (log-PPL at the end, gap to its entropy floor)", title_fontsize=9, fontsize=9)
    return attach(fig, kind="curves", lines=lines, gaps=gaps, domains=domains)


def reference_cell(cells) -> str:
    """The reference of a set of cells: B3 when present, else the first in design order."""
    from sandbox.factors import parse_cell

    names = sorted({str(c) for c in cells}, key=lambda c: parse_cell(c))
    return "B3" if "B3" in names else names[0]


def collect_delta(curves: pd.DataFrame, reference: str | None = None) -> pd.DataFrame:
    """Balanced held-out log-PPL of every cell against `reference` (default `reference_cell`) per
    evaluation step, paired by seed: ``cell, step, mean_delta, ci_low, ci_high, n`` with
    ``delta = log PPL_ref - log PPL_cell`` (> 0: the cell is better) and a 95% t interval over seeds."""
    from scipy import stats as st

    bal = curves[curves["domain"].astype(str) == BALANCED]
    ref = reference or reference_cell(bal["cell"])
    key = ["step", "seed"] if "seed" in bal else ["step"]
    wide = bal.pivot_table(index=key, columns="cell", values="log_ppl", aggfunc="mean")
    if ref not in wide:
        raise ValueError(f"curves table holds no reference cell {ref!r}")
    rows = []
    for cell in [c for c in sorted(wide.columns, key=str) if c != ref]:
        d = (wide[ref] - wide[cell]).dropna().rename("delta").reset_index()
        for step, part in d.groupby("step", sort=True):
            v = part["delta"].to_numpy(float)
            m, n = float(v.mean()), len(v)
            h = float(st.t.ppf(0.975, n - 1) * v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
            rows.append(dict(cell=str(cell), step=step, mean_delta=m, ci_low=m - h, ci_high=m + h, n=n))
    out = pd.DataFrame(rows, columns=["cell", "step", "mean_delta", "ci_low", "ci_high", "n"])
    out.attrs["reference"] = ref
    return out


def plot_delta(df: pd.DataFrame, title: str | None = None) -> Figure:
    """One line per cell: its balanced log-PPL gain over the reference cell against step, with the
    95% band over seeds; zero is the reference."""
    from sandbox.factors import parse_cell

    ref = df.attrs.get("reference", "B3")
    cells = sorted(pd.unique(df["cell"].astype(str)), key=lambda c: parse_cell(c))
    colours = category_colours(cells)
    lines = {}
    with theme():
        fig = new_figure(9.4, 5.2)
        ax = fig.add_subplot()
        ax.axhline(0.0, color=OKABE_ITO["black"], lw=1.2, zorder=1, label=f"{ref} (reference)")
        drawn: dict[str, np.ndarray] = {}
        for i, c in enumerate(cells):
            sub = df[df["cell"].astype(str) == c].sort_values("step")
            y = sub["mean_delta"].to_numpy(float)
            # E without L trains exactly like its cell without E: say so, or the later line hides the earlier.
            same = [o for o, v in drawn.items() if v.shape == y.shape and np.allclose(v, y, rtol=0, atol=1e-12)]
            drawn[c] = y
            if not same:
                ax.fill_between(sub["step"], sub["ci_low"], sub["ci_high"], color=colours[c], alpha=0.12, lw=0, zorder=2)
            (lines[c],) = ax.plot(sub["step"], y, color=colours[c], lw=2.0, ls=("-", "--", ":", "-.")[i % 4],
                                  marker="osD^v"[i % 5], ms=5 if not same else 8, mfc="none" if same else colours[c],
                                  zorder=3, label=f"{c} (same as {same[0]})" if same else c)
        n = int(df["n"].max()) if len(df) else 0
        ax.set_xlabel("adaptation step")
        ax.set_ylabel(f"delta = log PPL({ref}) − log PPL(cell)\n(balanced, nats per token; > 0: cell better)")
        ax.set_title(title or f"Each cell against {ref} during adaptation — mean of {n} seeds, 95% t band",
                     fontsize=12)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, title="cell")
    return attach(fig, kind="curves_delta", lines=lines, reference=ref, cells=cells)


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
