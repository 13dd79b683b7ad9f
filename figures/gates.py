"""Gate usage maps from `gates.csv`: domains x slots mean gate, before and after adaptation.

Rows of gates.csv: ``phase, domain, slot, mean_gate`` (+ optional ``seed``, ``cell``), where
``mean_gate`` is the router's mean gate for slot k over the tokens (or sequences) of domain m.

Monopoly index of one panel, the share of all gate mass held by the top-`top` slots:

    mass_k   = sum_m G[m, k]                  (each domain weighs the same)
    monopoly = sum of the `top` largest mass_k / sum_k mass_k

It is top/K for perfectly even usage and 1 when `top` slots take everything, so a softmax router
that collapses onto a few slots shows up as a monopoly index near 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from figures.style import SEQUENTIAL_CMAP, attach, new_figure, theme

PHASE_ORDER = ("before", "after")


def monopoly_index(matrix: np.ndarray, top: int = 2) -> float:
    """Share of the total gate mass of `matrix` (domains M, slots K) held by its `top` heaviest slots."""
    mass = np.nansum(np.asarray(matrix, dtype=float), axis=0)  # (K,)
    total = mass.sum()
    if total <= 0:
        return float("nan")
    return float(np.sort(mass)[::-1][:top].sum() / total)


def collect(gates: pd.DataFrame, cell: str | None = None) -> pd.DataFrame:
    """Mean gate per ``phase, domain, slot`` (averaged over seeds), for one `cell` if the table has
    several. Phases are ordered before, after, then any others alphabetically."""
    df = gates
    if "cell" in df and cell is not None:
        df = df[df["cell"].astype(str) == str(cell)]
    elif "cell" in df and df["cell"].nunique() > 1:
        raise ValueError("gates table holds several cells; pass cell=...")
    out = df.groupby(["phase", "domain", "slot"], as_index=False, sort=True)["mean_gate"].mean()
    phases = [p for p in PHASE_ORDER if p in set(out["phase"])] + sorted(set(out["phase"]) - set(PHASE_ORDER))
    out["phase"] = pd.Categorical(out["phase"], categories=phases, ordered=True)
    out = out.sort_values(["phase", "domain", "slot"]).reset_index(drop=True)
    out.attrs["cell"] = cell
    return out


def matrices(df: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Phase -> (domains x slots) DataFrame of mean gates, on the union of domains and slots."""
    domains = sorted(df["domain"].unique(), key=lambda v: (str(type(v)), v))
    slots = sorted(df["slot"].unique())
    out = {}
    for phase in df["phase"].cat.categories if hasattr(df["phase"], "cat") else df["phase"].unique():
        sub = df[df["phase"] == phase]
        if len(sub):
            out[str(phase)] = sub.pivot(index="domain", columns="slot", values="mean_gate").reindex(index=domains, columns=slots)
    return out


def plot(df: pd.DataFrame, top: int = 2, title: str | None = None) -> Figure:
    """Side-by-side heatmaps (one per phase) on one colour scale; each title gives its monopoly index."""
    mats = matrices(df)
    vmax = max(float(np.nanmax(m.to_numpy(float))) for m in mats.values()) if mats else 1.0
    vmax = vmax if vmax > 0 else 1.0
    n_dom = max((m.shape[0] for m in mats.values()), default=1)
    n_slot = max((m.shape[1] for m in mats.values()), default=1)
    width = min(15.0, 1.8 + len(mats) * (1.2 + 0.28 * n_slot))
    height = min(9.0, 2.6 + 0.38 * n_dom)
    index = {}
    with theme():
        fig = new_figure(width, height)
        axes = np.atleast_1d(fig.subplots(1, max(len(mats), 1), sharey=True, squeeze=False)[0])
        mesh = None
        for ax, (phase, m) in zip(axes, mats.items()):
            mi = monopoly_index(m.to_numpy(float), top)
            index[phase] = mi
            mesh = ax.imshow(m.to_numpy(float), cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=vmax, aspect="auto",
                             interpolation="nearest")
            ax.set_xticks(np.arange(m.shape[1]), [str(s) for s in m.columns])
            ax.set_yticks(np.arange(m.shape[0]), [str(d) for d in m.index])
            ax.tick_params(axis="x", labelsize=8.5 if m.shape[1] > 12 else 10)
            ax.grid(False)
            ax.set_xlabel("slot")
            ax.set_title(f"{phase} adaptation\nmonopoly index (top-{top} share) = {mi:.3f}", fontsize=11)
        axes[0].set_ylabel("domain")
        if mesh is not None:
            fig.colorbar(mesh, ax=list(axes), shrink=0.9, pad=0.02, label="mean gate")
        k = n_slot
        cell = df.attrs.get("cell")
        head = title or ("Gate usage" + (f" — cell {cell}" if cell else ""))
        fig.suptitle(f"{head}   (even use of {k} slots: top-{top} share = {top / k:.3f})", fontsize=12)
    return attach(fig, kind="gates", monopoly=index, top=top, panels=list(mats), axes=list(axes))
