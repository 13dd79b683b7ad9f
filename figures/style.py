"""House style for every figure: one theme, colour-blind-safe palettes, regime markers, labels.

Figures are built as bare `matplotlib.figure.Figure` objects (no pyplot, no display, no global
figure registry), drawn inside `theme()` so the rc settings never leak into the caller. PNG output
goes through the Agg renderer; SVG through the SVG renderer.

Colour choices:
- Values with a sign (a delta) use the diverging map ``RdBu`` centred on 0 with symmetric limits:
  blue = positive delta = the test arm (evolution) better, red = negative = it is worse.
- Classes (regimes, events, domains) use the Okabe-Ito palette, which stays distinct under the
  common colour-vision deficiencies; regimes also differ by marker shape, so the figure reads
  in greyscale too. Inconclusive points are hollow.
- Magnitudes without a sign (gate mass) use ``viridis`` (sequential, perceptually uniform).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Iterator

import matplotlib

if "matplotlib.pyplot" not in sys.modules:  # never touch a backend someone else already chose
    matplotlib.use("Agg")

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

#: Okabe & Ito (2008) colour-blind-safe qualitative palette.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
#: Order for an arbitrary number of categories (domains): black last, yellow late (low contrast on white).
CATEGORY_CYCLE: tuple[str, ...] = tuple(OKABE_ITO[k] for k in ("blue", "vermillion", "green", "purple",
                                                                "orange", "sky", "yellow", "black"))

DIVERGING_CMAP = "RdBu"
SEQUENTIAL_CMAP = "viridis"

#: Regime labels in display order (the four regimes, then the labels that say what happened).
REGIMES: tuple[str, ...] = ("beats", "beats<eps", "ties", "degrades<eps", "degrades", "inconclusive",
                            "no-room", "unconverged", "inert")

#: Marker, fill colour, edge colour and legend text per label: a shape of its own per label (so
#: labels differ without colour), filled markers edged in black (a white edge on a pale map cell
#: made a filled marker read as hollow), and hollow only where there is no finding (inconclusive,
#: no-room, unconverged).
REGIME_STYLE: dict[str, dict[str, Any]] = {
    "beats": dict(marker="^", facecolor=OKABE_ITO["blue"], edgecolor=OKABE_ITO["black"], label="beats (evo better)"),
    "beats<eps": dict(marker="p", facecolor=OKABE_ITO["sky"], edgecolor=OKABE_ITO["black"],
                      label="beats<eps (real, < eps)"),
    "ties": dict(marker="D", facecolor=OKABE_ITO["green"], edgecolor=OKABE_ITO["black"], label="ties (within ±eps)"),
    "degrades<eps": dict(marker="h", facecolor=OKABE_ITO["orange"], edgecolor=OKABE_ITO["black"],
                         label="degrades<eps (real, < eps)"),
    "degrades": dict(marker="v", facecolor=OKABE_ITO["vermillion"], edgecolor=OKABE_ITO["black"],
                     label="degrades (evo worse)"),
    "inconclusive": dict(marker="o", facecolor="none", edgecolor=OKABE_ITO["black"], label="inconclusive"),
    "no-room": dict(marker="s", facecolor="none", edgecolor=OKABE_ITO["purple"], label="no-room (ceiling < eps)"),
    "unconverged": dict(marker="P", facecolor="none", edgecolor="0.35", label="unconverged (grad still falling)"),
    "inert": dict(marker="X", facecolor="0.55", edgecolor=OKABE_ITO["black"], label="inert (search never acted)"),
}

#: Labels whose sign is significant (Holm-corrected): the zero contour is drawn only between them.
SIGNED: dict[str, int] = {"beats": 1, "beats<eps": 1, "degrades": -1, "degrades<eps": -1}

#: Axis labels (with units where the axis has one) for the sweep's regime axes.
AXIS_LABELS: dict[str, str] = {
    "alignment": "alignment a  (0 = random adapters, 1 = aligned)",
    "context_noise": "context noise  (std of routing-feature noise)",
    "plasticity": "adapter plasticity  (adapter lr = plasticity × router lr)",
    "overlap": "domain overlap  (shared share of each update)",
    "lr": "router learning rate  (Adam)",
    "mutation_scale": "mutation step  (initial ES step, logit units)",
    "loss_floor": "loss floor  (irreducible loss added)",
    "population": "evolution population P",
    "interval": "generation interval  (gradient steps)",
    "steps": "gradient steps per arm  (the budget)",
    "batch": "inputs per domain per step  (0 = exact expected loss)",
    "beta2": "Adam beta2",
    "domains": "domains M",
    "slots": "adapter slots K",
    "dim": "model dimension d",
    "rank": "adapter rank r",
    "true_rank": "true update rank r*",
    "context_dim": "routing-feature dimension F",
}

DELTA_LABEL = "mean delta = log loss(grad) − log loss(evo)\n(> 0: evolution better)"
#: The analytic sandbox's delta: a difference of final excess losses, each over the start's.
REL_DELTA_LABEL = "mean delta = rel. excess(grad) − rel. excess(evo)\n(share of the start's excess loss; > 0: evo better)"


def delta_label(value: str | None) -> str:
    """The colour-bar / y label of a summary whose contrasts are differences of `value`."""
    return REL_DELTA_LABEL if value == "rel_excess" else DELTA_LABEL

_RC: dict[str, Any] = {
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 9.5,
    "legend.title_fontsize": 10,
    "figure.titlesize": 13,
    "axes.titleweight": "regular",
    "svg.fonttype": "none",  # keep SVG text as text (searchable, editable)
    "savefig.dpi": 160,
    "axes.prop_cycle": matplotlib.cycler(color=list(CATEGORY_CYCLE)),
}


@contextmanager
def theme() -> Iterator[None]:
    """Apply the house theme (seaborn 'whitegrid' + readable sizes) for the duration of a block."""
    rc = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook"), **_RC}
    with matplotlib.rc_context(rc):
        yield


def new_figure(width: float, height: float, **kw: Any) -> Figure:
    """A pyplot-free figure with constrained layout (so titles and labels are never clipped)."""
    return Figure(figsize=(width, height), layout="constrained", **kw)


def axis_label(name: str) -> str:
    """Human label for a regime axis column: known axes carry their meaning and unit."""
    return AXIS_LABELS.get(name, name.replace("_", " "))


def symmetric_limits(values: Any, floor: float = 0.0) -> tuple[float, float]:
    """Colour limits (-L, L) with L = max |finite value| (at least `floor`; 1 if all are 0 or NaN)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    lim = max(float(np.abs(v).max()) if v.size else 0.0, float(floor))
    if lim == 0.0:
        lim = 1.0
    return -lim, lim


def category_colours(names: list[Any]) -> dict[Any, str]:
    """A stable Okabe-Ito colour per category name (cycling past eight)."""
    return {n: CATEGORY_CYCLE[i % len(CATEGORY_CYCLE)] for i, n in enumerate(names)}


def format_p(p: float) -> str:
    """``p = 0.006``; ``p < 0.001`` below that; ``p = n/a`` when missing."""
    if p is None or not np.isfinite(p):
        return "p = n/a"
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def attach(fig: Figure, **handles: Any) -> Figure:
    """Record the artists and values a figure encodes on ``fig.encoding`` (a dict), for tests and
    for callers that want to restyle or inspect them."""
    enc = getattr(fig, "encoding", None) or {}
    enc.update(handles)
    fig.encoding = enc
    return fig
