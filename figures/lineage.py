"""Lifecycle timeline from `lifecycle.csv`: deaths, births (linked to their parents) and inheritance.

Rows of lifecycle.csv: ``step, event, slot, slot_id, parent_id, neighbour_id`` (+ optional
``seed``, ``cell``, ``parent_slot``, ``neighbour_slot``). ``slot`` is the position 0..K-1 and
``slot_id`` the adapter's identity (ids are never reused). Events:

- ``death``: adapter ``slot_id`` leaves ``slot``;
- ``birth``: adapter ``slot_id`` is created in ``slot`` as a mutated clone of ``parent_id``;
- ``inherit``: the dying adapter ``slot_id`` (in ``slot``) is blended into ``neighbour_id``.

Slots on y, steps on x. A birth is joined to its parent's slot by an arrow; an inheritance to the
receiving neighbour's slot by a dotted arrow. Where the table has no ``parent_slot`` /
``neighbour_slot`` column the slot of an id is traced through the events (a birth puts an id in a
slot, a death removes it); ids never seen in an event are founders and are assumed to sit in the
slot of the same number (founder ids 0..K-1 in slots 0..K-1, as `sandbox.lifecycle` numbers them).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from figures.style import OKABE_ITO, attach, new_figure, theme

EVENT_ORDER = {"death": 0, "inherit": 1, "birth": 2}
EVENT_STYLE = {
    "death": dict(marker="X", color=OKABE_ITO["vermillion"], label="death"),
    "inherit": dict(marker="s", color=OKABE_ITO["orange"], label="inheritance"),
    "birth": dict(marker="o", color=OKABE_ITO["blue"], label="birth"),
}


def _select(df: pd.DataFrame, col: str, value) -> tuple[pd.DataFrame, object]:
    if col not in df or df[col].nunique() <= 1:
        return df, (df[col].iloc[0] if col in df and len(df) else None)
    if value is None:
        value = sorted(df[col].unique(), key=str)[0]
    return df[df[col].astype(str) == str(value)], value


def collect(lifecycle: pd.DataFrame, seed=None, cell=None) -> pd.DataFrame:
    """Events of one run (the first seed/cell unless chosen) ordered by step then death, inherit,
    birth, with ``parent_slot`` and ``neighbour_slot`` filled (taken from the table or traced)."""
    df, seed = _select(lifecycle, "seed", seed)
    df, cell = _select(df, "cell", cell)
    df = df.assign(_o=df["event"].map(EVENT_ORDER).fillna(3)).sort_values(["step", "_o"], kind="stable")
    df = df.drop(columns="_o").reset_index(drop=True)
    where: dict[int, int] = {}

    def slot_of(i) -> float:
        if i is None or not np.isfinite(i) or i < 0:
            return np.nan
        return float(where.get(int(i), int(i)))  # founders: id k in slot k

    parent_slot, neighbour_slot = [], []
    for r in df.itertuples():
        ps = getattr(r, "parent_slot", np.nan) if "parent_slot" in df else np.nan
        ns = getattr(r, "neighbour_slot", np.nan) if "neighbour_slot" in df else np.nan
        if r.event == "birth":
            parent_slot.append(ps if np.isfinite(ps) else slot_of(_num(r.parent_id)))
            neighbour_slot.append(np.nan)
            where[int(r.slot_id)] = int(r.slot)
        elif r.event == "inherit":
            parent_slot.append(np.nan)
            neighbour_slot.append(ns if np.isfinite(ns) else slot_of(_num(r.neighbour_id)))
        else:
            parent_slot.append(np.nan)
            neighbour_slot.append(np.nan)
            if r.event == "death":
                where.pop(int(r.slot_id), None)
    df["parent_slot"] = parent_slot
    df["neighbour_slot"] = neighbour_slot
    df.attrs.update(seed=seed, cell=cell)
    return df


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return np.nan


def plot(df: pd.DataFrame, n_slots: int | None = None, title: str | None = None) -> Figure:
    """Timeline of `collect` output; ``fig.encoding`` holds the marker collections per event, the
    parent and inheritance arrows and the counts drawn."""
    steps = df["step"].to_numpy(float)
    span = float(steps.max() - steps.min()) if len(df) else 1.0
    dx = 0.01 * (span if span > 0 else 1.0)  # nudge events of one step apart: death | inherit | birth
    shift = {"death": -dx, "inherit": 0.0, "birth": dx}
    k = int(n_slots if n_slots is not None else (df["slot"].max() + 1 if len(df) else 1))
    markers, births, inherits = {}, [], []
    with theme():
        fig = new_figure(10.0, 2.4 + 0.26 * k)
        ax = fig.add_subplot()
        for ev, st in EVENT_STYLE.items():
            sub = df[df["event"] == ev]
            markers[ev] = ax.scatter(sub["step"].to_numpy(float) + shift[ev], sub["slot"].to_numpy(float),
                                     marker=st["marker"], color=st["color"], s=60, zorder=4,
                                     edgecolors="white", linewidths=0.5, label=f"{st['label']} ({len(sub)})")
        for r in df.itertuples():
            if r.event == "birth" and np.isfinite(r.parent_slot) and r.parent_slot != r.slot:
                births.append(ax.annotate("", xy=(r.step + dx, r.slot), xytext=(r.step + dx, r.parent_slot),
                                          arrowprops=dict(arrowstyle="-|>", color=OKABE_ITO["blue"], lw=1.0,
                                                          alpha=0.7, connectionstyle="arc3,rad=0.25",
                                                          shrinkA=3, shrinkB=4), zorder=3))
            elif r.event == "inherit" and np.isfinite(r.neighbour_slot) and r.neighbour_slot != r.slot:
                inherits.append(ax.annotate("", xy=(r.step, r.neighbour_slot), xytext=(r.step, r.slot),
                                            arrowprops=dict(arrowstyle="-|>", color=OKABE_ITO["orange"], lw=1.0,
                                                            ls=":", connectionstyle="arc3,rad=-0.25",
                                                            shrinkA=3, shrinkB=4), zorder=3))
        tails = df[(df["event"] == "birth") & np.isfinite(df["parent_slot"])]
        parents = ax.scatter(tails["step"].to_numpy(float) + dx, tails["parent_slot"].to_numpy(float), s=22,
                             marker="o", facecolors="white", edgecolors=OKABE_ITO["blue"], linewidths=1.0,
                             zorder=4, label="parent")
        gets = df[(df["event"] == "inherit") & np.isfinite(df["neighbour_slot"])]
        receivers = ax.scatter(gets["step"].to_numpy(float), gets["neighbour_slot"].to_numpy(float), s=22,
                               marker="s", facecolors="white", edgecolors=OKABE_ITO["orange"], linewidths=1.0,
                               zorder=4, label="receiving neighbour")
        ax.set_ylim(-0.7, k - 0.3)
        ax.set_yticks(np.arange(k) if k <= 32 else np.linspace(0, k - 1, 9).round())
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("slot")
        ax.grid(axis="x", visible=False)
        bits = [f"seed {df.attrs['seed']}" if df.attrs.get("seed") is not None else "",
                f"cell {df.attrs['cell']}" if df.attrs.get("cell") is not None else ""]
        where = ", ".join(b for b in bits if b)
        ax.set_title(title or f"Lifecycle timeline{(' — ' + where) if where else ''}", fontsize=12)
        legend = list(markers.values()) + [parents, receivers, Line2D([], [], color=OKABE_ITO["blue"], lw=1.0, label="parent → child"),
                                           Line2D([], [], color=OKABE_ITO["orange"], lw=1.0, ls=":",
                                                  label="dying → neighbour")]
        fig.legend(handles=legend, loc="outside lower center", ncols=4, frameon=False)
    counts = {ev: int((df["event"] == ev).sum()) for ev in EVENT_STYLE}
    return attach(fig, kind="lineage", markers=markers, birth_links=births, inherit_links=inherits,
                  counts=counts, n_slots=k)
