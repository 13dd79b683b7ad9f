"""The divergence-gain map of specialist fusion (`sandbox fusion`), from fusion.csv and fit.csv only.

`collect(table)` keeps the rows of the fused methods (one per point x seed x method) with their
divergence and gain; `plot(df, fit)` draws gain over the best specialist against divergence: every
(point, seed) as a marker per method, our OLS line per router with its 95% confidence band
(computed from fit.csv's ``n, x_mean, sxx, resid_sd, t_crit``), and the published lines dashed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from figures.style import OKABE_ITO, attach, new_figure, theme

PUBLISHED = ((0.82, -2.72, "published: 0.82 div - 2.72 (R² 0.856, n 6)"),
             (0.83, -2.80, "published: 0.83 div - 2.80 (R² 0.872, n 8)"))
STYLE = {"R": (OKABE_ITO["blue"], "o", "R (sigmoid router)"), "B3": (OKABE_ITO["vermillion"], "s", "B3 (softmax router)"),
         "uniform": (OKABE_ITO["green"], "D", "uniform average"), "oracle": ("0.45", "^", "domain oracle"),
         "base": (OKABE_ITO["black"], "x", "plain base (no adapter)")}


def collect(table: pd.DataFrame) -> pd.DataFrame:
    """Rows of fusion.csv for the methods drawn (not the best specialist, whose gain is 0 by definition)."""
    d = table[table["method"].isin(list(STYLE)) & ~table["diverged"].astype(bool)]
    return d[["point", "specialist_steps", "seed", "method", "divergence", "gain"]].reset_index(drop=True)


def band(fit_row: dict, x: np.ndarray, prediction: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Line and (1 - alpha) confidence (or prediction) band of one fit.csv row at `x`."""
    y = fit_row["intercept"] + fit_row["slope"] * x
    h = 1.0 / fit_row["n"] + (x - fit_row["x_mean"]) ** 2 / fit_row["sxx"]
    half = fit_row["t_crit"] * fit_row["resid_sd"] * np.sqrt(h + (1.0 if prediction else 0.0))
    return y, y - half, y + half


def plot(df: pd.DataFrame, fit: pd.DataFrame | None = None, level: str = "seed", lines=("B3", "R")) -> Figure:
    """Gain over the best specialist (%) against divergence (%), with our fits and the published lines."""
    with theme():
        fig = new_figure(10.5, 6.0)
        ax = fig.subplots()
        ax.axhline(0.0, color=OKABE_ITO["black"], lw=1.0)
        xs = df["divergence"].to_numpy(float)
        lo, hi = (min(0.0, float(np.nanmin(xs))), float(np.nanmax(xs))) if len(xs) else (0.0, 1.0)
        pad = 0.05 * (hi - lo or 1.0)
        grid = np.linspace(lo - pad, hi + pad, 200)
        points, fitted = {}, {}
        for method, (colour, marker, label) in STYLE.items():
            d = df[df["method"] == method]
            if d.empty:
                continue
            if marker == "x":
                points[method] = ax.scatter(d["divergence"], d["gain"], marker=marker, s=30, zorder=3, color=colour,
                                            lw=1.2, label=label)
                continue
            hollow = method in ("uniform", "oracle")
            points[method] = ax.scatter(d["divergence"], d["gain"], marker=marker, s=34, zorder=3,
                                        facecolor="none" if hollow else colour, edgecolor=colour, lw=1.2, label=label)
        if fit is not None and not fit.empty:
            for method in lines:
                r = fit[(fit["method"] == method) & (fit["level"] == level)]
                if r.empty or not np.isfinite(r["slope"].iloc[0]):
                    continue
                r = r.iloc[0].to_dict()
                colour = STYLE[method][0]
                y, l, u = band(r, grid)
                ax.fill_between(grid, l, u, color=colour, alpha=0.16, lw=0)
                (fitted[method],) = ax.plot(grid, y, color=colour, lw=2.0,
                                            label=f"{method} fit: {r['slope']:.2f} div {r['intercept']:+.2f} "
                                                  f"[slope {r['slope_ci_low']:.2f}..{r['slope_ci_high']:.2f}], "
                                                  f"R² {r['r2']:.2f}, n {int(r['n'])}, 95% band")
        pub = []
        for (a, b, label), ls in zip(PUBLISHED, ("--", ":")):
            (line,) = ax.plot(grid, a * grid + b, color=OKABE_ITO["black"], lw=1.4, ls=ls, label=label)
            pub.append(line)
        ax.set_xlim(grid[0], grid[-1])
        ax.set_xlabel("divergence: mean relative loss improvement of a specialist on its own domain (%)")
        ax.set_ylabel("gain over the best specialist (%, balanced held-out loss)")
        ax.set_title("When does specialist fusion pay? gain vs divergence, one marker per (point, seed)", fontsize=11.5)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
    return attach(fig, kind="fusion", points=points, fits=fitted, published=pub)


def draw(run_dir) -> list:
    """Draw ``figures/fusion.{png,svg}`` of a fusion run folder from its tables; returns the paths."""
    from pathlib import Path

    from sandbox.results import read_csv, save_figure

    run_dir = Path(run_dir)
    table = read_csv(run_dir / "fusion.csv")
    fit = read_csv(run_dir / "fit.csv") if (run_dir / "fit.csv").exists() else None
    return save_figure(plot(collect(table), fit), run_dir / "figures" / "fusion")
