"""Gate usage maps from `gates.csv`: each domain's share of its gate mass per slot, before and after.

Each cell of a panel is ``share[m, k] = G[m, k] / sum_j G[m, j]``, the share of domain m's gate
mass that slot k holds, so a row that concentrates on a few slots is a domain with slots of its
own (specialisation), whatever the total gate mass does (a sigmoid router's total can fall while
its routing sharpens; the mean gate itself made that fall the whole picture). Each row is
labelled with its routing entropy ``H_m = -sum_k share[m, k] log share[m, k]`` (nats; log K for
even use, 0 for one slot) and its total gate mass ``sum_k G[m, k]``.

Rows of gates.csv: ``phase, domain, slot, mean_gate`` (+ optional ``seed``, ``cell``), where
``mean_gate`` is the router's mean gate for slot k over the tokens (or sequences) of domain m.

Monopoly index of one panel, the share of all gate mass held by the top-`top` slots:

    mass_k   = sum_m G[m, k]                  (each domain weighs the same)
    monopoly = sum of the `top` largest mass_k / sum_k mass_k

It is top/K for perfectly even usage and 1 when `top` slots take everything, so a softmax router
that collapses onto a few slots shows up as a monopoly index near 1. Each panel's title adds the
matrix diagnostics of `sandbox.gatestats.matrix_stats` (top-4 share, slots above 5% of the pooled
mass and, averaged over domains, of each domain's mass, and the mutual information between domain
and slot: 0 for collapse or even use, log M when every domain has slots of its own), so collapse
(few slots, MI ~ 0) and specialisation (per-domain slots few, MI high) read off at a glance.

A table of several seeds is drawn for ONE seed (the first in the table, or `collect`'s ``seed``):
the slot a domain's specialist starts in differs by seed, so a mean over seeds would blur the very
specialisation the figure is for. ``seed="mean"`` draws the mean over seeds (the earlier figure).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from figures.style import SEQUENTIAL_CMAP, attach, new_figure, theme
from sandbox.gatestats import matrix_stats

PHASE_ORDER = ("before", "after")


def monopoly_index(matrix: np.ndarray, top: int = 2) -> float:
    """Share of the total gate mass of `matrix` (domains M, slots K) held by its `top` heaviest slots."""
    mass = np.nansum(np.asarray(matrix, dtype=float), axis=0)  # (K,)
    total = mass.sum()
    if total <= 0:
        return float("nan")
    return float(np.sort(mass)[::-1][:top].sum() / total)


def collect(gates: pd.DataFrame, cell: str | None = None, seed: int | str | None = None) -> pd.DataFrame:
    """Mean gate per ``phase, domain, slot`` for one `cell` if the table has several, and one `seed`
    (default: the first seed in the table; ``"mean"``: averaged over seeds). Phases are ordered
    before, after, then any others alphabetically. ``attrs``: ``cell``, ``seed`` (the seed shown,
    ``"mean"`` or None without a seed column) and ``n_seeds`` (seeds in the table)."""
    df = gates
    if "cell" in df and cell is not None:
        df = df[df["cell"].astype(str) == str(cell)]
    elif "cell" in df and df["cell"].nunique() > 1:
        raise ValueError("gates table holds several cells; pass cell=...")
    seeds = list(dict.fromkeys(df["seed"].tolist())) if "seed" in df else []
    shown = None
    if seeds and seed != "mean":
        shown = seeds[0] if seed is None else seed
        df = df[df["seed"] == shown]
        if not len(df):
            raise ValueError(f"gates table holds no seed {seed!r} (seeds: {seeds})")
    elif seeds:
        shown = "mean"
    out = df.groupby(["phase", "domain", "slot"], as_index=False, sort=True)["mean_gate"].mean()
    phases = [p for p in PHASE_ORDER if p in set(out["phase"])] + sorted(set(out["phase"]) - set(PHASE_ORDER))
    out["phase"] = pd.Categorical(out["phase"], categories=phases, ordered=True)
    out = out.sort_values(["phase", "domain", "slot"]).reset_index(drop=True)
    if cell is None and "cell" in gates and gates["cell"].nunique() == 1:
        cell = gates["cell"].iloc[0]
    out.attrs.update(cell=cell, seed=shown, n_seeds=len(seeds))
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


def shares(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(share (M, K), entropy (M,), total (M,))`` of a domains x slots mean-gate matrix: each row
    divided by its total, its entropy in nats, and the total (NaN rows where the total is 0)."""
    g = np.asarray(matrix, dtype=float)
    total = np.nansum(g, axis=1)                                             # (M,)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = g / np.where(total > 0, total, np.nan)[:, None]               # (M, K)
        ent = -np.nansum(np.where(share > 0, share * np.log(share), 0.0), axis=1)
    ent = np.where(total > 0, ent, np.nan)
    return share, ent, total


def plot(df: pd.DataFrame, top: int = 2, title: str | None = None) -> Figure:
    """Side-by-side heatmaps (one per phase) of each domain's gate share per slot, on one colour
    scale; rows labelled with their entropy and total gate mass; each title gives the panel's
    monopoly index and matrix diagnostics."""
    mats = matrices(df)
    split = {p: shares(m.to_numpy(float)) for p, m in mats.items()}
    vmax = max(float(np.nanmax(sh)) for sh, _, _ in split.values()) if split else 1.0
    vmax = vmax if np.isfinite(vmax) and vmax > 0 else 1.0
    n_dom = max((m.shape[0] for m in mats.values()), default=1)
    n_slot = max((m.shape[1] for m in mats.values()), default=1)
    width = min(16.0, 2.4 + len(mats) * (2.2 + 0.28 * n_slot))
    height = min(10.0, 3.6 + 0.38 * n_dom)
    index, diag = {}, {}
    with theme():
        fig = new_figure(width, height)
        axes = np.atleast_1d(fig.subplots(1, max(len(mats), 1), sharey=False, squeeze=False)[0])
        mesh = None
        for ax, (phase, m) in zip(axes, mats.items()):
            mi = monopoly_index(m.to_numpy(float), top)
            index[phase] = mi
            diag[phase] = d = matrix_stats(m.to_numpy(float))
            share, ent, total = split[phase]
            mesh = ax.imshow(share, cmap=SEQUENTIAL_CMAP, vmin=0.0, vmax=vmax, aspect="auto",
                             interpolation="nearest")
            ax.set_xticks(np.arange(m.shape[1]), [str(s) for s in m.columns])
            ax.set_yticks(np.arange(m.shape[0]), [f"{d}\nH {h:.2f}, mass {t:.2f}" for d, h, t in zip(m.index, ent, total)],
                          fontsize=8.5)
            ax.tick_params(axis="x", labelsize=8.5 if m.shape[1] > 12 else 10)
            ax.grid(False)
            ax.set_xlabel("slot")
            per = np.mean(d["slots5_domain"]) if d["slots5_domain"] else float("nan")
            ax.set_title(f"{phase} adaptation: mean entropy per domain {np.nanmean(ent):.2f} nats\n"
                         f"monopoly index (top-{top} share) = {mi:.3f}, top-4 = {d['top4']:.3f}\n"
                         f"slots > 5%: {d['slots5']} pooled, {per:.1f} per domain; MI(domain; slot) = {d['mi']:.3f} nats",
                         fontsize=10)
        axes[0].set_ylabel("domain")
        if mesh is not None:
            fig.colorbar(mesh, ax=list(axes), shrink=0.9, pad=0.02, label="share of the domain's gate mass")
        k = n_slot
        cell, seed, n_seeds = df.attrs.get("cell"), df.attrs.get("seed"), df.attrs.get("n_seeds", 0)
        which = ""
        if seed == "mean":
            which = f", mean of {n_seeds} seeds"
        elif seed is not None:
            which = f", seed {seed}" + (f" (1 of {n_seeds} seeds)" if n_seeds > 1 else "")
        head = title or ("Gate share per domain" + (f" — cell {cell}" if cell else "") + which)
        n_dom_ = max(n_dom, 1)
        fig.suptitle(f"{head}\n(even use of {k} slots: share {1 / k:.3f}, entropy log {k} = {np.log(k):.2f}; "
                     f"top-{top} share {top / k:.3f}; one slot set per domain: MI up to log {n_dom_} = "
                     f"{np.log(n_dom_):.3f})", fontsize=11.5)
    return attach(fig, kind="gates", monopoly=index, diagnostics=diag, top=top, panels=list(mats), axes=list(axes),
                  entropy={p: v[1] for p, v in split.items()}, shares={p: v[0] for p, v in split.items()})
