"""Lifecycle timeline from `lifecycle.csv`: deaths, births (linked to their parents) and inheritance.

Rows of lifecycle.csv: ``step, event, slot, slot_id, parent_id, neighbour_id`` (+ optional
``seed``, ``cell``, ``parent_slot``, ``neighbour_slot``, and the extra columns `sandbox.lifecycle`
writes). ``slot`` is the position 0..K-1 and ``slot_id`` the adapter's identity (ids are never
reused). Events, as `sandbox.lifecycle.lifecycle_step` records them:

- ``death``: adapter ``slot_id`` leaves ``slot``;
- ``birth``: adapter ``slot_id`` is created in ``slot`` as a mutated clone of ``parent_id``;
- ``inherit`` with ``parent_id >= 0``: the dying adapter ``parent_id`` is blended into adapter
  ``slot_id`` in ``slot`` (the receiving neighbour; with the ``child`` reading it is the newborn in
  the dying slot itself);
- ``inherit`` with ``parent_id = -1``: the dying ``slot_id`` in ``slot`` is blended into
  ``neighbour_id`` (the other way of writing the same event).

Slots on y, steps on x. A birth is joined to its parent's slot by an arrow; an inheritance by a
dotted arrow from the dying adapter's slot to the receiving one. Where the table has no
``parent_slot`` / ``neighbour_slot`` columns, the slot of an id is traced through the events (every
row places ``slot_id`` in ``slot``); ids never seen are founders, which `Population.founders`
numbers 0..K-1 in slots 0..K-1.
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
    birth, with ``link_from`` / ``link_to``: the slots a birth's arrow (parent -> child) or an
    inheritance's arrow (dying -> receiver) joins (from the table's slot columns, else traced)."""
    df, seed = _select(lifecycle, "seed", seed)
    df, cell = _select(df, "cell", cell)
    df = df.assign(_o=df["event"].map(EVENT_ORDER).fillna(3)).sort_values(["step", "_o"], kind="stable")
    df = df.drop(columns="_o").reset_index(drop=True)
    last: dict[int, int] = {}  # id -> the slot it was last seen in (deaths keep their slot)

    def slot_of(i) -> float:
        i = _num(i)
        if not np.isfinite(i) or i < 0:
            return np.nan
        return float(last.get(int(i), int(i)))  # founders: id k in slot k

    def stored(r, col) -> float:
        return _num(getattr(r, col)) if col in df else np.nan

    link_from, link_to = [], []
    for r in df.itertuples():
        src = dst = np.nan
        if r.event == "birth":
            src = stored(r, "parent_slot")
            src = src if np.isfinite(src) else slot_of(r.parent_id)
            dst = float(r.slot)
        elif r.event == "inherit" and _num(r.parent_id) >= 0:  # dying parent_id -> slot_id in slot
            src = stored(r, "parent_slot")
            src = src if np.isfinite(src) else slot_of(r.parent_id)
            dst = float(r.slot)
        elif r.event == "inherit":  # dying slot_id in slot -> neighbour_id
            src = float(r.slot)
            dst = stored(r, "neighbour_slot")
            dst = dst if np.isfinite(dst) else slot_of(r.neighbour_id)
        link_from.append(src)
        link_to.append(dst)
        last[int(r.slot_id)] = int(r.slot)
    df["link_from"] = link_from
    df["link_to"] = link_to
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
            if not (np.isfinite(r.link_from) and np.isfinite(r.link_to)) or r.link_from == r.link_to:
                continue  # an in-place event (child inheritance, parent in the same slot) has no arrow
            if r.event == "birth":
                births.append(ax.annotate("", xy=(r.step + dx, r.link_to), xytext=(r.step + dx, r.link_from),
                                          arrowprops=dict(arrowstyle="-|>", color=OKABE_ITO["blue"], lw=1.0,
                                                          alpha=0.7, connectionstyle="arc3,rad=0.25",
                                                          shrinkA=3, shrinkB=4), zorder=3))
            elif r.event == "inherit":
                inherits.append(ax.annotate("", xy=(r.step, r.link_to), xytext=(r.step, r.link_from),
                                            arrowprops=dict(arrowstyle="-|>", color=OKABE_ITO["orange"], lw=1.0,
                                                            ls=":", connectionstyle="arc3,rad=-0.25",
                                                            shrinkA=3, shrinkB=4), zorder=3))
        births_df = df[(df["event"] == "birth") & np.isfinite(df["link_from"])]
        parents = ax.scatter(births_df["step"].to_numpy(float) + dx, births_df["link_from"].to_numpy(float), s=22,
                             marker="o", facecolors="white", edgecolors=OKABE_ITO["blue"], linewidths=1.0,
                             zorder=4, label="parent")
        inh = df[(df["event"] == "inherit") & np.isfinite(df["link_to"]) & (df["link_to"] != df["slot"])]
        receivers = ax.scatter(inh["step"].to_numpy(float), inh["link_to"].to_numpy(float), s=22,
                               marker="s", facecolors="white", edgecolors=OKABE_ITO["orange"], linewidths=1.0,
                               zorder=4, label="receiving adapter")
        ax.set_ylim(-0.7, k - 0.3)
        ax.set_yticks(np.arange(k) if k <= 32 else np.linspace(0, k - 1, 9).round())
        ax.set_xlabel("adaptation step")
        ax.set_ylabel("slot")
        ax.grid(axis="x", visible=False)
        bits = [f"seed {df.attrs['seed']}" if df.attrs.get("seed") is not None else "",
                f"cell {df.attrs['cell']}" if df.attrs.get("cell") is not None else ""]
        where = ", ".join(b for b in bits if b)
        ax.set_title(title or f"Lifecycle timeline{(' — ' + where) if where else ''}", fontsize=12)
        legend = list(markers.values()) + [parents] + ([receivers] if len(inh) else []) + [Line2D([], [], color=OKABE_ITO["blue"], lw=1.0, label="parent → child"),
                                           Line2D([], [], color=OKABE_ITO["orange"], lw=1.0, ls=":",
                                                  label="dying → neighbour")]
        fig.legend(handles=legend, loc="outside lower center", ncols=4, frameon=False)
    counts = {ev: int((df["event"] == ev).sum()) for ev in EVENT_STYLE}
    return attach(fig, kind="lineage", markers=markers, birth_links=births, inherit_links=inherits,
                  counts=counts, n_slots=k)
