"""Does a regime map transfer between systems? Two maps (e.g. the analytic sandbox and the
transformer) on one alignment axis, and the table that says where they agree.

`collect(first, second)` joins two summary.csv tables on alignment (one row per alignment present
in either; a point missing from one map has NaNs there) with, per system, the label, mean delta
and 95% CI, and ``agree``: both labels point the same way. Labels are compared by direction:
``beats`` / ``beats<eps`` are +, ``degrades`` / ``degrades<eps`` are -, ``ties`` / ``no-room`` /
``inert`` are 0 (no usable effect), ``inconclusive`` is unknown (``agree`` empty). `plot(df)` draws
both delta curves with their CI bands and a strip marking agreement.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from figures.style import DELTA_LABEL, OKABE_ITO, attach, axis_label, new_figure, theme

DIRECTION = {"beats": "+", "beats<eps": "+", "degrades": "-", "degrades<eps": "-", "ties": "0", "no-room": "0",
             "inert": "0", "inconclusive": "?"}
COLUMNS = ("alignment", "label_{a}", "delta_{a}", "ci_low_{a}", "ci_high_{a}", "label_{b}", "delta_{b}", "ci_low_{b}",
           "ci_high_{b}", "agree")


def _one_axis(summary: pd.DataFrame, name: str) -> pd.DataFrame:
    if "alignment" not in summary:
        raise ValueError(f"{name}: summary.csv has no alignment column")
    if summary["alignment"].round(9).duplicated().any():
        raise ValueError(f"{name}: several points per alignment (a heatmap); transfer compares one-axis maps")
    return summary.assign(alignment=summary["alignment"].round(9))


def collect(first: pd.DataFrame, second: pd.DataFrame, names: tuple[str, str] = ("analytic", "substrate")) -> pd.DataFrame:
    """The transfer table of two one-axis maps (see the module docstring)."""
    a, b = names
    parts = []
    for df, n in ((first, a), (second, b)):
        d = _one_axis(df, n)[["alignment", "regime", "mean_delta", "ci_low", "ci_high"]]
        parts.append(d.rename(columns={"regime": f"label_{n}", "mean_delta": f"delta_{n}", "ci_low": f"ci_low_{n}",
                                       "ci_high": f"ci_high_{n}"}))
    out = parts[0].merge(parts[1], on="alignment", how="outer").sort_values("alignment").reset_index(drop=True)

    def agree(row) -> object:
        da, db = DIRECTION.get(row[f"label_{a}"]), DIRECTION.get(row[f"label_{b}"])
        if da is None or db is None or "?" in (da, db):
            return None
        return da == db

    out["agree"] = [agree(r) for r in out.to_dict("records")]
    out.attrs["names"] = names
    return out[[c.format(a=a, b=b) for c in COLUMNS]]


def plot(df: pd.DataFrame, names: tuple[str, str] | None = None) -> Figure:
    """Both systems' mean delta with 95% CI bands against alignment, agreement in a strip below."""
    a, b = names or df.attrs.get("names", ("analytic", "substrate"))
    x = df["alignment"].to_numpy(float)
    with theme():
        fig = new_figure(10.8, 5.4)
        top, strip = fig.subplots(2, 1, sharex=True, height_ratios=[5, 1])
        top.axhline(0.0, color=OKABE_ITO["black"], lw=1.0)
        lines = {}
        for n, colour, marker in ((a, OKABE_ITO["blue"], "o"), (b, OKABE_ITO["vermillion"], "s")):
            y = df[f"delta_{n}"].to_numpy(float)
            ok = np.isfinite(y)
            top.fill_between(x[ok], df[f"ci_low_{n}"].to_numpy(float)[ok], df[f"ci_high_{n}"].to_numpy(float)[ok],
                             color=colour, alpha=0.18, lw=0)
            (lines[n],) = top.plot(x[ok], y[ok], color=colour, marker=marker, ms=4, lw=2.0, label=f"{n}: delta, 95% CI")
        top.set_ylabel(DELTA_LABEL)
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9)
        top.set_title(f"Does the regime map transfer? {a} vs {b} along alignment", fontsize=11.5)
        colours = {True: OKABE_ITO["green"], False: OKABE_ITO["vermillion"], None: "0.8"}
        for xi, ag in zip(x, df["agree"]):
            strip.scatter([xi], [0], s=90, marker="o", color=colours[ag if ag in (True, False) else None], zorder=3)
        strip.set_yticks([])
        strip.set_ylim(-1, 1)
        strip.set_ylabel("agree", rotation=0, ha="right", va="center")
        strip.set_xlabel(axis_label("alignment"))
        strip.grid(False)
        n_agree = int((df["agree"] == True).sum())   # noqa: E712 (None is neither)
        n_known = int(df["agree"].isin([True, False]).sum())
        strip.set_title(f"labels agree at {n_agree} of {n_known} shared, decided points (green yes, red no, grey "
                        "undecided or missing)", fontsize=9.5)
    return attach(fig, kind="transfer", lines=lines, agree=list(df["agree"]))
