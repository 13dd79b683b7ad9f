"""Regime maps of a sweep: a heatmap over two regime axes and a curve along one.

Both read `summary.csv` only (one row per sweep point: axis columns, ``mean_delta``, ``ci_low``,
``ci_high``, ``eps``, ``regime`` ...), where ``delta = log loss(grad) - log loss(evo)`` per seed, so
a positive mean delta means evolution did better. The curve can also show the per-seed deltas
from `results.csv` (`collect_seed_deltas`).

Heatmap encoding (`plot_heatmap`):
- colour: mean delta at each grid point, diverging map centred on 0 with limits (-L, L),
  L = max |mean delta|;
- solid black line: the delta = 0 contour, interpolated between grid-point centres, drawn only
  between points whose sign is significant (labels beats, beats<eps, degrades, degrades<eps,
  Holm-corrected): the other points are masked out of the contoured field, so no line is drawn
  through noise (scattered points, as from a boundary search, are coloured and contoured on
  their Delaunay triangulation);
- the axes span the grid, from its first to its last point (the end cells are half cells), so a
  bounded axis such as alignment never runs outside [0, 1];
- dashed lines: the +-eps contours (the equivalence margin fixed before the sweep);
- one marker per point by label (`figures.style.REGIME_STYLE`; inconclusive and no-room hollow,
  inert a grey cross), and inert cells hatched: the search never acted there, so their colour
  (exactly 0) is no finding.

Curve encoding (`plot_curve`): the headline delta (evo vs grad) with its CI band, the restart
control (restart vs grad) dashed with its band, and the room (oracle vs grad, the ceiling of any
routing search) as a shaded area from 0 to its mean, plus a strip of the delta's labels.

The returned figure carries ``fig.encoding`` with the artists (``mesh``, ``zero_contour``,
``eps_contour``, ``markers`` per regime) and the values they encode (``clim``, ``zero_level``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from matplotlib.tri import Triangulation

from figures.style import (DIVERGING_CMAP, OKABE_ITO, REGIME_STYLE, REGIMES, SIGNED, attach, axis_label,
                           delta_label, new_figure, symmetric_limits, theme)

#: Columns of summary.csv that are statistics, not regime axes.
SUMMARY_STAT_COLUMNS: tuple[str, ...] = (
    "point", "n", "n_diverged", "mean_delta", "se", "ci_low", "ci_high", "t", "df", "p", "p_holm",
    "d_z", "boot_low", "boot_high", "p_tost", "eps", "regime", "reason", "seeds_needed",
    "delta_restart", "restart_ci_low", "restart_ci_high", "restart_p_holm", "restart_regime",
    "room", "room_ci_low", "room_ci_high", "room_p_holm", "room_regime", "accepted", "accepted_seeds",
    "lifecycle_events", "delta_beta2", "beta2_ci_low", "beta2_ci_high", "beta2_p_holm", "beta2_regime",
    "room_joint", "room_joint_ci_high", "room_grad", "room_evo", "room_restart", "room_beta2", "grad_drop",
    "converged", "grad_lr", "grad_adapter_lr", "grad_beta2", "accepted_gain", "value", "tune_edge", "tune_score",
    "delta_evo_own", "evo_own_ci_low", "evo_own_ci_high", "evo_own_regime", "delta_restart_own",
    "restart_own_ci_low", "restart_own_ci_high", "restart_own_regime",
    "delta_acar", "acar_ci_low", "acar_ci_high", "acar_p_holm", "acar_regime", "acar_seeds_needed",
    "acar_share1", "acar_share2", "acar_share3", "acar_mean_slots", "acar_saved",
)


def infer_axes(summary: pd.DataFrame, manifest: dict | None = None) -> list[str]:
    """The regime-axis columns: the manifest's ``axes`` if present, else every non-statistic column.

    Axes along which the sweep holds a single value are dropped (they do not span a dimension);
    alignment, when present, comes first.
    """
    axes = list((manifest or {}).get("axes") or [])
    if not axes:
        axes = [c for c in summary.columns if c not in SUMMARY_STAT_COLUMNS]
    axes = [a for a in axes if a in summary.columns]
    spanning = [a for a in axes if summary[a].nunique(dropna=True) > 1]
    if "alignment" in spanning:
        spanning.remove("alignment")
        spanning.insert(0, "alignment")
    return spanning


def _value(summary: pd.DataFrame) -> str | None:
    """What the summary's contrasts are differences of (``rel_excess`` or ``log_loss``)."""
    if "value" in summary and summary["value"].notna().any():
        return str(summary["value"].dropna().iloc[0])
    return None


def _common_eps(df: pd.DataFrame) -> float:
    eps = df["eps"].dropna().unique() if "eps" in df else np.array([])
    return float(np.max(eps)) if eps.size else float("nan")


def acar_view(summary: pd.DataFrame) -> pd.DataFrame:
    """The summary with the acar arm's contrast (acar vs grad) in the main columns (``mean_delta``,
    ``ci_low``, ``ci_high``, ``p_holm``, ``regime``), so the map's figures draw it the same way."""
    out = summary.drop(columns=[c for c in ("mean_delta", "ci_low", "ci_high", "p_holm", "regime", "room",
                                            "accepted") if c in summary.columns])
    ren = {"delta_acar": "mean_delta", "acar_ci_low": "ci_low", "acar_ci_high": "ci_high", "acar_p_holm": "p_holm",
           "acar_regime": "regime"}
    out = out.rename(columns=ren)
    out.attrs["arm"] = "acar"
    return out


def collect_heatmap(summary: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Grid points of a two-axis sweep: ``x, y, mean_delta, ci_low, ci_high, regime, eps, n``.

    Raises ValueError when two rows share one (x, y) (a third axis varies: split the table first).
    """
    cols = [x, y] + [c for c in ("mean_delta", "ci_low", "ci_high", "regime", "eps", "n", "p_holm", "room",
                                 "accepted") if c in summary.columns]
    df = summary[cols].copy()
    if df.duplicated([x, y]).any():
        raise ValueError(f"summary has several rows per ({x}, {y}); split it by its other axes first")
    df = df.sort_values([y, x]).reset_index(drop=True)
    df.attrs.update(x=x, y=y, eps=_common_eps(df), value=_value(summary), arm=summary.attrs.get("arm", "evo"))
    return df


def _edges(centres: np.ndarray, within: bool = False) -> np.ndarray:
    """Cell edges around sorted centres: midpoints inside, half a spacing beyond the ends, or, with
    `within`, the first and last centre themselves (the axis spans the grid, never beyond it)."""
    c = np.asarray(centres, dtype=float)
    if c.size == 1:
        half = 0.5 * (abs(c[0]) if c[0] != 0 else 1.0)
        return np.array([c[0] - half, c[0] + half])
    mid = (c[:-1] + c[1:]) / 2
    if within:
        return np.concatenate([[c[0]], mid, [c[-1]]])
    return np.concatenate([[c[0] - (mid[0] - c[0])], mid, [c[-1] + (c[-1] - mid[-1])]])


def _signs(df: pd.DataFrame) -> np.ndarray:
    """Per row: +1 / -1 where the label says the sign is significant (`SIGNED`), else 0."""
    if "regime" not in df:
        return np.zeros(len(df))
    lab = df["regime"].astype(str).map(SIGNED).fillna(0).to_numpy(float)
    return lab * (np.sign(df["mean_delta"].to_numpy(float)) != -lab)   # a label and its delta agree


def signed_field(df: pd.DataFrame, x: str, y: str, value: str = "mean_delta", reach: int = 2) -> np.ndarray:
    """``Z (ny, nx)`` of `grid`, masked (NaN) at every point that has not both a significantly
    positive and a significantly negative point (`SIGNED`) within `reach` grid steps (Chebyshev):
    the field the zero contour is drawn on, so the contour shows a sign change that the labels
    establish on both sides, and never one drawn through a region of noise."""
    xs, ys, z = grid(df, x, y, value)
    sg = grid(df.assign(_sign=_signs(df)), x, y, "_sign")[2]               # (ny, nx), NaN where missing
    pos, neg = np.nan_to_num(sg) > 0, np.nan_to_num(sg) < 0
    near_pos, near_neg = np.zeros_like(pos), np.zeros_like(neg)
    ny, nx = z.shape
    for dj in range(-reach, reach + 1):
        for di in range(-reach, reach + 1):
            src = (slice(max(0, -dj), ny - max(0, dj)), slice(max(0, -di), nx - max(0, di)))
            dst = (slice(max(0, dj), ny - max(0, -dj)), slice(max(0, di), nx - max(0, -di)))
            near_pos[dst] |= pos[src]
            near_neg[dst] |= neg[src]
    return np.where(near_pos & near_neg, z, np.nan)


def grid(df: pd.DataFrame, x: str, y: str, value: str = "mean_delta") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(xs (nx,), ys (ny,), Z (ny, nx))`` with Z[j, i] = value at (xs[i], ys[j]); NaN where missing."""
    xs = np.sort(df[x].unique()).astype(float)
    ys = np.sort(df[y].unique()).astype(float)
    z = np.full((ys.size, xs.size), np.nan)
    xi = np.searchsorted(xs, df[x].to_numpy(float))
    yi = np.searchsorted(ys, df[y].to_numpy(float))
    z[yi, xi] = df[value].to_numpy(float)
    return xs, ys, z


def _regime_markers(ax, df: pd.DataFrame, x: str, y: str, size: float = 70, arm: str = "evo") -> dict:
    handles = {}
    for regime in REGIMES:
        sub = df[df["regime"] == regime]
        st = REGIME_STYLE[regime]
        hollow = st["facecolor"] == "none"
        handles[regime] = ax.scatter(
            sub[x].to_numpy(float), sub[y].to_numpy(float), s=size, marker=st["marker"],
            facecolors=st["facecolor"], edgecolors=st["edgecolor"], linewidths=1.6 if hollow else 0.9,
            zorder=4, clip_on=False, label=f"{st['label'].replace('evo', arm)} ({len(sub)})")
    return handles


def _title_bits(df: pd.DataFrame, eps: float) -> str:
    bits = []
    if "n" in df and df["n"].notna().any():
        lo, hi = int(df["n"].min()), int(df["n"].max())
        bits.append(f"n = {lo} seeds per point" if lo == hi else f"n = {lo}–{hi} seeds per point")
    if np.isfinite(eps):
        bits.append(f"eps = {eps:g}")
    bits.append("Holm-corrected across points")
    return ",  ".join(bits)


def plot_heatmap(df: pd.DataFrame, x: str | None = None, y: str | None = None,
                 eps: float | None = None, title: str | None = None) -> Figure:
    """Regime-boundary heatmap of `collect_heatmap` output (see the module docstring)."""
    x = x or df.attrs["x"]
    y = y or df.attrs["y"]
    eps = float(df.attrs.get("eps", np.nan) if eps is None else eps)
    xs, ys, z = grid(df, x, y)
    vmin, vmax = symmetric_limits(z)
    with theme():
        fig = new_figure(7.6, 6.4)
        ax = fig.add_subplot()
        zero = eps_cs = None
        filled = np.isfinite(z).mean()
        pts = df[np.isfinite(df["mean_delta"].to_numpy(float))]
        if filled >= 0.5 or len(pts) < 3:  # a (mostly) full grid: one cell per point
            ex, ey = _edges(xs, within=True), _edges(ys, within=True)
            mesh = ax.pcolormesh(ex, ey, np.ma.masked_invalid(z), cmap=DIVERGING_CMAP,
                                 vmin=vmin, vmax=vmax, shading="flat", zorder=1)
            ax.set_xlim(ex[0], ex[-1])
            ax.set_ylim(ey[0], ey[-1])
            zs = signed_field(df, x, y)
            if xs.size >= 2 and ys.size >= 2:
                gx, gy = np.meshgrid(xs, ys)  # (ny, nx) each: cell centres
                zm = np.ma.masked_invalid(z)
                zero = ax.contour(gx, gy, np.ma.masked_invalid(zs), levels=[0.0], colors=OKABE_ITO["black"],
                                  linewidths=2.2, zorder=3)
                if np.isfinite(eps) and eps > 0:
                    eps_cs = ax.contour(gx, gy, zm, levels=[-eps, eps], colors="0.2", linewidths=1.3,
                                        linestyles="--", zorder=3)
        else:  # scattered points (e.g. a boundary search): colour and contour a Delaunay triangulation
            tri = Triangulation(pts[x].to_numpy(float), pts[y].to_numpy(float))
            zt = pts["mean_delta"].to_numpy(float)
            mesh = ax.tripcolor(tri, zt, cmap=DIVERGING_CMAP, vmin=vmin, vmax=vmax, shading="gouraud", zorder=1)
            # A triangle is contoured only with significantly positive and negative points near it
            # (within 2.5 typical spacings, on axes scaled to [0, 1]), as on a grid (`signed_field`).
            sg = _signs(pts)
            xy = np.column_stack([(v - v.min()) / (np.ptp(v) or 1.0) for v in (tri.x, tri.y)])
            cen = xy[tri.triangles].mean(axis=1)                                   # (n_tri, 2)
            dist = np.linalg.norm(cen[:, None, :] - xy[None, :, :], axis=-1)       # (n_tri, n_pts)
            near = dist <= 2.5 / np.sqrt(len(xy))
            tri.set_mask(~((near & (sg > 0)).any(axis=1) & (near & (sg < 0)).any(axis=1)))
            zero = ax.tricontour(tri, zt, levels=[0.0], colors=OKABE_ITO["black"], linewidths=2.2, zorder=3)
            tri.set_mask(None)
            if np.isfinite(eps) and eps > 0:
                eps_cs = ax.tricontour(tri, zt, levels=[-eps, eps], colors="0.2", linewidths=1.3,
                                       linestyles="--", zorder=3)
            for lim, v in ((ax.set_xlim, tri.x), (ax.set_ylim, tri.y)):  # keep edge markers whole
                pad = 0.04 * (v.max() - v.min() or 1.0)
                lim(v.min() - pad, v.max() + pad)
        sig = _signs(df)
        crosses = bool((sig > 0).any() and (sig < 0).any())   # significant points of both signs
        if zero is not None and (not crosses or not any(len(p.vertices) for p in zero.get_paths())):
            # No significant sign change (or none between neighbours): no boundary to show.
            zero.set_visible(False)
            crosses = False
        inert = df[df["regime"] == "inert"]
        if len(inert) and filled >= 0.5:
            for xv, yv in zip(inert[x].to_numpy(float), inert[y].to_numpy(float)):
                i, j = int(np.searchsorted(xs, xv)), int(np.searchsorted(ys, yv))
                ax.add_patch(Rectangle((ex[i], ey[j]), ex[i + 1] - ex[i], ey[j + 1] - ey[j], facecolor="0.92",
                                       edgecolor="0.6", hatch="///", lw=0, zorder=2))
        arm = df.attrs.get("arm", "evo")   # the arm against grad (acar_view: "acar")
        markers = _regime_markers(ax, df, x, y, arm=arm)
        cbar = fig.colorbar(mesh, ax=ax, shrink=0.9, pad=0.02)
        label = delta_label(df.attrs.get("value"))
        cbar.set_label(label if arm == "evo" else label.replace("(evo)", f"({arm})").replace("evo better", f"{arm} better")
                       .replace("evolution better", f"{arm} better"))
        if np.isfinite(eps) and eps > 0 and eps < vmax:
            for v in (-eps, eps):
                cbar.ax.axhline(v, color="0.2", linestyle="--", linewidth=1.2)
        cbar.ax.axhline(0.0, color=OKABE_ITO["black"], linewidth=2.0)
        ax.set_xlabel(axis_label(x))
        ax.set_ylabel(axis_label(y))
        ax.grid(False)
        ax.set_title(title or "Where evolutionary routing search beats, ties with or degrades gradient\n"
                     + _title_bits(df, eps), fontsize=11.5)
        lines = ([Line2D([], [], color=OKABE_ITO["black"], lw=2.2, label="delta = 0 (between significant points)")]
                 if crosses and zero else [])
        if eps_cs is not None:
            lines.append(Line2D([], [], color="0.2", lw=1.3, ls="--", label=f"delta = ±eps (±{eps:g})"))
        shown = [h for r, h in markers.items() if len(df[df["regime"] == r])]
        fig.legend(handles=shown + lines, loc="outside lower center", ncols=3,
                   frameon=False, handletextpad=0.4, columnspacing=1.2)
    return attach(fig, kind="regime_heatmap", mesh=mesh, zero_contour=zero, eps_contour=eps_cs, sign_change=crosses,
                  markers=markers, colorbar=cbar, clim=(vmin, vmax), zero_level=0.0, eps=eps, x=x, y=y)


def collect_curve(summary: pd.DataFrame, x: str = "alignment") -> pd.DataFrame:
    """Points of a one-axis sweep sorted by `x`: ``x, mean_delta, ci_low, ci_high, regime, eps, n``."""
    cols = [x] + [c for c in ("point", "mean_delta", "ci_low", "ci_high", "regime", "eps", "n",
                              "n_diverged", "p_holm", "seeds_needed", "delta_restart", "restart_ci_low",
                              "restart_ci_high", "delta_beta2", "beta2_ci_low", "beta2_ci_high", "room",
                              "room_ci_low", "room_ci_high", "room_joint", "room_joint_ci_high", "accepted",
                              "delta_acar", "acar_ci_low", "acar_ci_high", "acar_regime")
                  if c in summary.columns]
    df = summary[cols].sort_values(x).reset_index(drop=True)
    if df[x].duplicated().any():
        raise ValueError(f"summary has several rows per {x}; split it by its other axes first")
    df.attrs.update(x=x, eps=_common_eps(df), value=_value(summary))
    return df


def collect_seed_deltas(results: pd.DataFrame, x: str = "alignment", reference: str = "grad",
                        test: str = "evo", value: str | None = None) -> pd.DataFrame:
    """Per-seed deltas from results.csv: ``point, seed, x, delta`` with delta = reference - test, of
    `value` (default ``rel_excess`` where the table has it, as the summary does, else ``log_loss``).

    Pairs whose either arm diverged (or is non-finite) are left out, as in the summary statistics.
    """
    if value is None:
        value = "rel_excess" if "rel_excess" in results and results["rel_excess"].notna().any() else "log_loss"
    keep = results
    if "diverged" in results:
        keep = results[~results["diverged"].astype(bool)]
    wide = keep.pivot_table(index=["point", "seed", x], columns="arm", values=value, aggfunc="first")
    wide = wide.dropna(subset=[reference, test]) if {reference, test} <= set(wide.columns) else wide.iloc[0:0]
    if wide.empty:
        return pd.DataFrame(columns=["point", "seed", x, "delta"])
    out = (wide[reference] - wide[test]).rename("delta").reset_index()
    return out[np.isfinite(out["delta"])].reset_index(drop=True)


def plot_curve(df: pd.DataFrame, x: str | None = None, eps: float | None = None,
               seeds: pd.DataFrame | None = None, title: str | None = None) -> Figure:
    """Mean delta with its 95% CI band against `x`, the +-eps band shaded, regimes in a strip below.

    `seeds` (from `collect_seed_deltas`) adds the per-seed deltas as small grey dots.
    """
    x = x or df.attrs["x"]
    eps = float(df.attrs.get("eps", np.nan) if eps is None else eps)
    xv = df[x].to_numpy(float)
    with theme():
        fig = new_figure(10.8, 5.6)
        top, strip = fig.subplots(2, 1, sharex=True, height_ratios=[5, 1])
        band = None
        if np.isfinite(eps) and eps > 0:
            band = top.axhspan(-eps, eps, color="0.85", zorder=0, label=f"equivalence band ±eps (±{eps:g})")
        top.axhline(0.0, color=OKABE_ITO["black"], lw=1.0, zorder=1)
        ci = top.fill_between(xv, df["ci_low"].to_numpy(float), df["ci_high"].to_numpy(float),
                              color=OKABE_ITO["blue"], alpha=0.22, lw=0, zorder=2, label="95% CI (t)")
        if seeds is not None and len(seeds):
            top.scatter(seeds[x].to_numpy(float), seeds["delta"].to_numpy(float), s=10, color="0.45",
                        alpha=0.6, zorder=2, label="per-seed delta")
        room = restart = None
        joint = "room_joint" in df and df["room_joint"].notna().any()
        rcol = "room_joint" if joint else "room"
        if rcol in df and df[rcol].notna().any():
            rv = df[rcol].to_numpy(float)
            room = top.fill_between(xv, 0, rv, color=OKABE_ITO["purple"], alpha=0.22, lw=0, zorder=1,
                                    label="room: ceiling (grad vs the joint optimum), mean" if joint
                                    else "room: oracle ceiling vs grad (mean)")
            top.plot(xv, rv, color=OKABE_ITO["purple"], lw=1.4, ls=":", zorder=2)
        if "delta_beta2" in df and df["delta_beta2"].notna().any():
            top.plot(xv, df["delta_beta2"].to_numpy(float), color=OKABE_ITO["green"], lw=1.5, ls="-.", marker="d",
                     ms=3.5, zorder=3, label="delta_beta2: grad with Adam beta2 0.9 (optimiser control)")
        if "delta_restart" in df and df["delta_restart"].notna().any():
            top.fill_between(xv, df["restart_ci_low"].to_numpy(float), df["restart_ci_high"].to_numpy(float),
                             color=OKABE_ITO["orange"], alpha=0.18, lw=0, zorder=2)
            (restart,) = top.plot(xv, df["delta_restart"].to_numpy(float), color=OKABE_ITO["orange"], lw=1.8,
                                  ls="--", marker="s", ms=3.5, zorder=3,
                                  label="delta_restart: optimiser restart only (control), 95% CI")
        acar = None
        if "delta_acar" in df and df["delta_acar"].notna().any():   # the --acar arm, vs the same grad
            top.fill_between(xv, df["acar_ci_low"].to_numpy(float), df["acar_ci_high"].to_numpy(float),
                             color=OKABE_ITO["vermillion"], alpha=0.15, lw=0, zorder=2)
            (acar,) = top.plot(xv, df["delta_acar"].to_numpy(float), color=OKABE_ITO["vermillion"], lw=1.8,
                               ls=(0, (5, 1.5, 1, 1.5)), marker="^", ms=4, zorder=3,
                               label="delta_acar: sigma routing (ACAR) vs grad, 95% CI")
        (line,) = top.plot(xv, df["mean_delta"].to_numpy(float), color=OKABE_ITO["blue"], lw=2.0,
                           marker="o", ms=4, zorder=3, label="delta: evo search vs grad")
        top.set_ylabel(delta_label(df.attrs.get("value")))
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=8.5)
        top.set_title(title or "Evolution vs gradient along " + x.replace("_", " ") + "\n"
                      + _title_bits(df, eps), fontsize=11.5)
        # Regime strip: one coloured marker per point, on one row beneath the curve.
        strip_df = df.assign(_row=0.0)
        edges = _edges(xv, within=True) if xv.size else np.array([])   # the axis spans the grid, no further
        for i, regime in enumerate(df["regime"]):
            fill = REGIME_STYLE.get(regime, REGIME_STYLE["inconclusive"])["facecolor"]
            strip.axvspan(edges[i], edges[i + 1], color="0.9" if fill == "none" else fill, alpha=0.25, lw=0, zorder=0)
        markers = _regime_markers(strip, strip_df, x, "_row", size=80)
        if xv.size >= 2:
            strip.set_xlim(edges[0], edges[-1])   # shared with the curve
        strip.set_yticks([])
        strip.set_ylim(-1, 1)
        strip.set_ylabel("regime", rotation=0, ha="right", va="center", labelpad=12)
        strip.grid(False)
        strip.set_xlabel(axis_label(x))
        present = [h for r, h in markers.items() if len(df[df["regime"] == r])]
        strip.legend(handles=present, loc="upper center", bbox_to_anchor=(0.5, -0.9), ncols=4,
                     frameon=False, handletextpad=0.3, columnspacing=1.0)
    return attach(fig, kind="regime_curve", line=line, ci_band=ci, eps_band=band, markers=markers, eps=eps, x=x,
                  room=room, restart=restart, acar=acar)


def collect_anytime(summary: pd.DataFrame, budget: str = "steps", x: str = "alignment", n_lines: int = 4) -> pd.DataFrame:
    """The anytime view of a budget x alignment sweep: ``x, budget, mean_delta, ci_low, ci_high,
    regime`` (and the controls where present) at up to `n_lines` alignments spread over the grid
    (both ends included), sorted by alignment then budget."""
    xs = np.sort(summary[x].unique())
    pick = xs[np.unique(np.round(np.linspace(0, xs.size - 1, min(n_lines, xs.size))).astype(int))]
    cols = [x, budget] + [c for c in ("mean_delta", "ci_low", "ci_high", "regime", "eps", "n", "delta_restart",
                                      "delta_beta2", "room_joint") if c in summary.columns]
    df = summary[summary[x].isin(pick)][cols].sort_values([x, budget]).reset_index(drop=True)
    df.attrs.update(x=x, budget=budget, eps=_common_eps(df), value=_value(summary))
    return df


def plot_anytime(df: pd.DataFrame, title: str | None = None) -> Figure:
    """Delta (evo vs grad) against the step budget, one line per alignment, each with its 95% CI
    band and the label of each point as its marker; the +-eps band shaded; a log budget axis when
    the budgets span more than a factor of 10."""
    x, budget = df.attrs["x"], df.attrs["budget"]
    eps = float(df.attrs.get("eps", np.nan))
    colours = [OKABE_ITO[c] for c in ("blue", "orange", "green", "vermillion", "purple", "sky")]
    with theme():
        fig = new_figure(9.6, 5.6)
        ax = fig.add_subplot()
        if np.isfinite(eps) and eps > 0:
            ax.axhspan(-eps, eps, color="0.88", zorder=0, label=f"±eps (±{eps:g})")
        ax.axhline(0.0, color=OKABE_ITO["black"], lw=1.0, zorder=1)
        lines = {}
        for i, (a, part) in enumerate(df.groupby(x, sort=True)):
            col = colours[i % len(colours)]
            b = part[budget].to_numpy(float)
            ax.fill_between(b, part["ci_low"].to_numpy(float), part["ci_high"].to_numpy(float), color=col,
                            alpha=0.18, lw=0, zorder=2)
            (lines[a],) = ax.plot(b, part["mean_delta"].to_numpy(float), color=col, lw=1.8, zorder=3,
                                  label=f"{x} = {a:g}")
            for regime, sub in part.groupby("regime"):
                st = REGIME_STYLE.get(regime, REGIME_STYLE["inconclusive"])
                ax.scatter(sub[budget].to_numpy(float), sub["mean_delta"].to_numpy(float), marker=st["marker"], s=46,
                           facecolors=col if st["facecolor"] != "none" else "white", edgecolors=col, linewidths=1.3,
                           zorder=4)
        bmin, bmax = float(df[budget].min()), float(df[budget].max())
        if bmin > 0 and bmax / bmin > 10:
            ax.set_xscale("log")
        ticks = np.sort(df[budget].unique()).astype(float)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(axis_label(budget))
        ax.set_ylabel(delta_label(df.attrs.get("value")))
        shown = sorted(df["regime"].unique(), key=lambda r: REGIMES.index(r) if r in REGIMES else 99)
        marks = [Line2D([], [], ls="", marker=REGIME_STYLE[r]["marker"], color="0.3", markerfacecolor="0.3"
                        if REGIME_STYLE[r]["facecolor"] != "none" else "white", label=r) for r in shown if r in REGIME_STYLE]
        ax.legend(handles=list(lines.values()) + marks, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  fontsize=9)
        ax.set_title(title or "Anytime view: evolution vs gradient as the step budget grows\n" + _title_bits(df, eps),
                     fontsize=11.5)
    return attach(fig, kind="anytime", lines=lines, eps=eps, x=x, budget=budget)
