"""Rebuild every figure (and the derived summary tables) of a run folder from its CSVs alone.

`build_report(run_dir)` looks for the known tables, draws each figure whose table is present into
``run_dir/figures/`` (PNG at 160 dpi + SVG, atomic writes) and returns the list of files written,
with the tables to print attached (`Report.summary`, `Report.tables`).

| table | figure(s) |
|---|---|
| summary.csv (+ manifest ``axes``, + results.csv) | ``regime_curve`` (one spanning axis) or ``regime_heatmap`` (two) |
| attribution.csv | ``attribution`` (forest plot) |
| cells.csv | ``cells`` (balanced log-PPL per cell, paired by seed) |
| gates.csv | ``gates`` (``gates_<cell>`` per cell, ``_<arm>`` per arm) |
| lifecycle.csv | ``lineage`` (split the same way; the first seed) |
| curves.csv | ``curves`` (one cell: change since step 0, split by arm; mean over seeds), or, with several cells, ``curves_vs_B3`` (each cell against the reference cell, paired by seed) |

summary.csv and attribution.csv are pure functions of results.csv and cells.csv. When one is
missing (or ``recompute=True``) and `sandbox.stats` provides the function, it is regenerated with
the eps and alpha recorded in the manifest and written back atomically.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sandbox.errors import BadInput
from sandbox.results import atomic_write_csv, save_figure

TABLES: tuple[str, ...] = ("summary.csv", "results.csv", "attribution.csv", "cells.csv", "gates.csv",
                           "lifecycle.csv", "curves.csv", "tuning.csv", "fusion.csv", "fit.csv")
REQUIRED: dict[str, tuple[str, ...]] = {
    "summary.csv": ("mean_delta", "ci_low", "ci_high", "regime"),
    "results.csv": ("point", "seed", "arm", "log_loss"),
    "attribution.csv": ("contrast", "mean_delta", "ci_low", "ci_high"),
    "cells.csv": ("cell", "seed", "balanced_log_ppl"),
    "gates.csv": ("phase", "domain", "slot", "mean_gate"),
    "lifecycle.csv": ("step", "event", "slot", "slot_id"),
    "curves.csv": ("step", "domain", "log_ppl"),
    "tuning.csv": ("point", "arm", "lr", "score", "chosen"),
    "fusion.csv": ("point", "seed", "method", "divergence", "gain", "diverged"),
    "fit.csv": ("method", "level", "slope", "intercept", "r2", "n"),
}
RESULTS_NON_AXIS: tuple[str, ...] = ("point", "seed", "arm", "final_loss", "log_loss", "loss_evals", "grad_steps",
                                     "diverged", "diverged_step", "wall_s", "rel_excess", "rel_half", "rel_oracle",
                                     "initial_excess", "generations", "accepted", "rel_gain", "step_size",
                                     "lifecycle_events", "lr", "adapter_lr", "beta2", "unconfirmed")


class Report(list):
    """The files written (a list of Paths), plus what to print.

    Attributes:
        summary: the main summary table of the folder (summary.csv for a sweep, attribution.csv
            for a factorial, else a per-cell or final-step table), or None.
        tables: title -> DataFrame of every printable summary, in display order.
        notes: one line per thing that was skipped or regenerated, and why.
    """

    def __init__(self, paths: list[Path] | None = None):
        super().__init__(paths or [])
        self.summary: pd.DataFrame | None = None
        self.tables: dict[str, pd.DataFrame] = {}
        self.notes: list[str] = []


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(str(path), "", f"a JSON manifest ({e.__class__.__name__})") from None


def read_table(path: Path) -> pd.DataFrame:
    """Read one known table; a malformed file or missing columns is a user error naming the file."""
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BadInput(str(path), "", f"a CSV table ({e.__class__.__name__})") from None
    missing = [c for c in REQUIRED.get(path.name, ()) if c not in df.columns]
    if missing:
        raise BadInput(str(path), ",".join(missing), "a table with these columns (see ARCHITECTURE.md)")
    return df


def find_setting(obj: Any, key: str) -> Any:
    """First value stored under `key` anywhere in a nested manifest (depth first), else None."""
    if isinstance(obj, dict):
        if key in obj and obj[key] is not None:
            return obj[key]
        for v in obj.values():
            found = find_setting(v, key)
            if found is not None:
                return found
    return None


def _stat_kwargs(manifest: dict) -> dict[str, float]:
    """The statistics settings of a run: its manifest's ``stats`` section (eps, alpha and, for a
    sweep, converged_frac), else (folders from before the section) the first ``eps`` / ``alpha``
    found anywhere in the manifest."""
    section = manifest.get("stats") if isinstance(manifest.get("stats"), dict) else None
    kw = {}
    for key in ("eps", "alpha", "converged_frac"):
        v = section.get(key) if section is not None else (find_setting(manifest, key) if key != "converged_frac" else None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            kw[key] = float(v)
    return kw


def _stem_part(value: Any) -> str:
    return re.sub(r"[^A-Za-z0-9+.=_-]", "_", str(value))


#: Columns that split a gates/lifecycle/curves table into one figure each (when they vary).
FACETS: tuple[str, ...] = ("cell", "arm")
#: Columns those figures aggregate over (or, for the timeline, pick the first value of) on purpose.
_HANDLED: set[str] = {"seed", "phase", "domain", "slot", "mean_gate", "step", "event", "slot_id", "parent_id",
                      "neighbour_id", "parent_slot", "neighbour_slot", "nll", "log_ppl", "floor", "batch",
                      "fitness", "mutation_size", "alpha", "tokens"}


def facets(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """Split a table by the `FACETS` columns that vary: ``[(stem suffix, part), ...]``."""
    cols = [c for c in FACETS if c in df.columns and df[c].nunique(dropna=False) > 1]
    if not cols:
        return [("", df)]
    out = []
    for key, part in df.groupby(cols, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        out.append(("_" + "_".join(_stem_part(k) for k in key), part.drop(columns=cols)))
    return out


def _averaged_note(name: str, df: pd.DataFrame) -> str | None:
    extra = [c for c in df.columns if c not in _HANDLED and c not in FACETS and df[c].nunique(dropna=False) > 1]
    return f"{name}: figure pools rows over {', '.join(extra)}" if extra else None


def build_report(run_dir: str | Path, recompute: bool = False, study: bool = False,
                 out_dir: str | Path | None = None) -> Report:
    """Rebuild every figure of `run_dir` whose table exists; see the module docstring.

    Args:
        recompute: regenerate summary.csv / attribution.csv from results.csv / cells.csv even if present.
        study: draw the study's reported contrast values on the attribution plot.
        out_dir: where figures go (default ``run_dir/figures``).
    Raises:
        BadInput: `run_dir` is not a folder, holds none of the known tables, or a table is malformed.
    """
    from figures import attribution, curves, gates, lineage

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise BadInput("DIR", str(run_dir), "an existing run folder")
    present = {name: run_dir / name for name in TABLES if (run_dir / name).is_file()}
    if not present:
        raise BadInput("DIR", str(run_dir), "a run folder holding at least one of " + ", ".join(TABLES))
    manifest = read_manifest(run_dir)
    if manifest.get("command") == "factorial":   # its tuning.csv is the router-lr table, not the sweep's
        present.pop("tuning.csv", None)
    tables = {name: read_table(path) for name, path in present.items()}
    out = Path(out_dir) if out_dir is not None else run_dir / "figures"
    report = Report()

    def save(fig, stem: str) -> None:
        report.extend(save_figure(fig, out / stem))

    _derive(tables, run_dir, manifest, recompute, report)

    if "summary.csv" in tables:
        _regime_figures(tables, manifest, save, report)
    if "attribution.csv" in tables:
        save(attribution.plot(attribution.collect(tables["attribution.csv"], study=study)), "attribution")
    if "cells.csv" in tables:
        save(curves.plot_cells(curves.collect_cells(tables["cells.csv"])), "cells")
    if "fusion.csv" in tables:   # a `sandbox fusion` folder: the gain-vs-divergence figure with its fitted lines
        from figures import fusion

        save(fusion.plot(fusion.collect(tables["fusion.csv"]), tables.get("fit.csv")), "fusion")
    for name, module, stem in (("gates.csv", gates, "gates"), ("curves.csv", curves, "curves"),
                               ("lifecycle.csv", lineage, "lineage")):
        if name in tables:
            note = _averaged_note(name, tables[name])
            if note:
                report.notes.append(note)
            table = tables[name]
            if name == "curves.csv" and "cell" in table and table["cell"].nunique() > 1:
                # One figure for the comparison (each cell against the reference cell), not a near-copy per cell.
                for suffix, part in facets(table.drop(columns=["cell"])) if "arm" in table else [("", table)]:
                    df = curves.collect_delta(table if suffix == "" else table[table.index.isin(part.index)])
                    save(curves.plot_delta(df), f"curves_vs_{_stem_part(df.attrs['reference'])}{suffix}")
                continue
            for suffix, part in facets(table):
                df = module.collect(part)
                if suffix and hasattr(df, "attrs") and "cell" in table and not df.attrs.get("cell") \
                        and "cell" in table and table["cell"].nunique() > 1:
                    df.attrs["cell"] = str(table.loc[part.index[0], "cell"])   # name the facet in the title
                save(module.plot(df), stem + suffix)
    _printables(tables, manifest, report)
    return report


def _derive(tables: dict, run_dir: Path, manifest: dict, recompute: bool, report: Report) -> None:
    """Regenerate summary.csv / attribution.csv from their source tables where needed and possible."""
    try:
        from sandbox import stats
    except ImportError:  # the statistics module is optional for drawing stored tables
        stats = None
    kw = _stat_kwargs(manifest)
    if "results.csv" in tables and (recompute or "summary.csv" not in tables):
        if stats is None or not hasattr(stats, "summarize"):
            report.notes.append("summary.csv not regenerated: sandbox.stats.summarize is unavailable")
        else:
            res = tables["results.csv"]
            axes = [a for a in (manifest.get("axes") or []) if a in res.columns] or \
                [c for c in res.columns if c not in RESULTS_NON_AXIS]
            if hasattr(stats, "decompose"):   # decomposed where the arms allow
                ceiling = manifest.get("system", "analytic") != "substrate"   # domain oracle: not a bound
                summary = stats.decompose(res, by=["point", *axes], oracle_is_ceiling=ceiling, **kw)
            else:
                summary = stats.summarize(res, by=["point", *axes], **{k: v for k, v in kw.items() if k != "converged_frac"})
            atomic_write_csv(run_dir / "summary.csv", summary)
            tables["summary.csv"] = pd.read_csv(run_dir / "summary.csv")
            if "tuning.csv" in tables and "point" in summary:   # what the sweep wrote beside the statistics
                tun = tables["tuning.csv"]
                chosen = tun[(tun["arm"] == "grad") & tun["chosen"].astype(bool)].set_index("point")
                if "edge" in chosen:
                    summary["tune_edge"] = summary["point"].map(chosen["edge"].astype(object).where(chosen["edge"].notna(), ""))
                summary["tune_score"] = summary["point"].map(chosen["score"])
                atomic_write_csv(run_dir / "summary.csv", summary)
                tables["summary.csv"] = pd.read_csv(run_dir / "summary.csv")
            report.notes.append(f"summary.csv regenerated from results.csv ({', '.join(f'{k}={v:g}' for k, v in kw.items()) or 'default eps, alpha'})")
    if "cells.csv" in tables and (recompute or "attribution.csv" not in tables):
        if stats is None or not hasattr(stats, "attribution"):
            report.notes.append("attribution.csv not regenerated: sandbox.stats.attribution is unavailable")
        elif tables["cells.csv"]["cell"].nunique() >= 2:
            from sandbox import replicates   # the base as the unit when the cells span bases, as the run did

            cells = tables["cells.csv"]
            att = replicates.attribution(cells, **{k: v for k, v in kw.items() if k != "converged_frac"})
            att = replicates.router_lr_columns(att, cells) if len(att) else att
            if len(att):
                atomic_write_csv(run_dir / "attribution.csv", att)
                tables["attribution.csv"] = pd.read_csv(run_dir / "attribution.csv")
                report.notes.append("attribution.csv regenerated from cells.csv")


def _regime_figures(tables: dict, manifest: dict, save, report: Report) -> None:
    from figures import regime

    summary = tables["summary.csv"]
    axes = regime.infer_axes(summary, manifest)
    if not axes:
        report.notes.append("no regime figure: the sweep has a single point (no axis spans values)")
        return
    if len(axes) == 1:
        seeds = None
        if "results.csv" in tables and axes[0] in tables["results.csv"].columns:
            seeds = regime.collect_seed_deltas(tables["results.csv"], axes[0])
        save(regime.plot_curve(regime.collect_curve(summary, axes[0]), seeds=seeds), "regime_curve")
        return
    if "steps" in axes[:2] and "alignment" in axes[:2]:   # the budget as an axis: the anytime view too
        save(regime.plot_anytime(regime.collect_anytime(summary)), "anytime")
    x, y, rest = axes[0], axes[1], axes[2:]
    groups = summary.groupby(rest, sort=True) if rest else [((), summary)]
    for key, part in groups:
        key = key if isinstance(key, tuple) else (key,)
        tag = "_".join(f"{a}={_stem_part(v)}" for a, v in zip(rest, key))
        views = [("", part, None)]
        if "delta_acar" in part and part["delta_acar"].notna().any():   # the --acar arm: its own map
            views.append(("_acar", regime.acar_view(part), "Sigma routing (ACAR) vs gradient\n"
                          + regime._title_bits(part, regime._common_eps(part))))
        for arm, view, head in views:
            fig = regime.plot_heatmap(regime.collect_heatmap(view, x, y), title=head)
            if tag:
                fig.axes[0].set_title(fig.axes[0].get_title() + "\n" + ", ".join(f"{a} = {v}" for a, v in zip(rest, key)),
                                      fontsize=11.5)
            save(fig, "regime_heatmap" + arm + (f"_{tag}" if tag else ""))


def _ci(lo: pd.Series, hi: pd.Series) -> list[str]:
    return ["" if not (np.isfinite(a) and np.isfinite(b)) else f"[{a:+.4f}, {b:+.4f}]" for a, b in zip(lo, hi)]


def _printables(tables: dict, manifest: dict, report: Report) -> None:
    """Compact tables for the terminal (CIs as one text column), the main one first."""
    from figures import regime

    if "summary.csv" in tables:
        s = tables["summary.csv"]
        axes = regime.infer_axes(s, manifest) or [c for c in s.columns if c not in regime.SUMMARY_STAT_COLUMNS]
        t = s[axes].copy()
        for c in ("n", "n_diverged", "mean_delta"):
            if c in s:
                t[c] = s[c]
        t["95% CI"] = _ci(s["ci_low"], s["ci_high"])
        for c in ("p_holm", "p_tost", "regime", "seeds_needed"):
            if c in s:
                t[c] = s[c]
        if "delta_restart" in s and s["delta_restart"].notna().any():
            t["delta_restart"] = s["delta_restart"]
            t["restart CI"] = _ci(s["restart_ci_low"], s["restart_ci_high"])
        if "room" in s and s["room"].notna().any():
            t["room"] = s["room"]
            t["room CI"] = _ci(s["room_ci_low"], s["room_ci_high"])
        if "accepted" in s and s["accepted"].notna().any():
            t["accepted"] = s["accepted"]
        report.tables["regime summary (delta = log loss(grad) - log loss(evo), > 0: evolution better)"] = t
    if "attribution.csv" in tables:
        a = tables["attribution.csv"]
        t = pd.DataFrame({"contrast": a["contrast"]})
        if {"reference", "treated"} <= set(a.columns):
            t["cells"] = [f"{tr} vs {ref}" for ref, tr in zip(a["reference"], a["treated"])]
        for c in ("n", "n_diverged", "mean_delta"):
            if c in a:
                t[c] = a[c]
        t["95% CI"] = _ci(a["ci_low"], a["ci_high"])
        for c in ("p", "d_z"):
            if c in a:
                t[c] = a[c]
        report.tables["attribution (delta = log PPL(reference) - log PPL(treated), > 0: treated better)"] = t
    if "cells.csv" in tables:
        c = tables["cells.csv"]
        div = c["diverged"].astype(bool) if "diverged" in c else pd.Series(False, index=c.index)
        ok = c[~div & np.isfinite(c["balanced_log_ppl"].astype(float))]
        g = ok.groupby("cell")["balanced_log_ppl"]
        t = pd.DataFrame({"n": g.size(), "mean balanced_log_ppl": g.mean(), "sd": g.std()})
        t["n_diverged"] = c.groupby("cell").size().sub(t["n"], fill_value=0).astype(int)
        report.tables["cells (balanced log-PPL, nats per token; diverged runs not averaged)"] = t.reset_index()
    if "fit.csv" in tables:
        f = tables["fit.csv"]
        f = f[f["level"] == "seed"] if "level" in f else f
        t = f[[c for c in ("method", "n", "slope") if c in f]].copy()
        if {"slope_ci_low", "slope_ci_high"} <= set(f.columns):
            t["slope CI"] = _ci(f["slope_ci_low"], f["slope_ci_high"])
        for c in ("intercept", "r2", "resid_sd"):
            if c in f:
                t[c] = f[c]
        report.tables["fusion fit (gain over the best specialist vs divergence, one point per seed)"] = t
    if "curves.csv" in tables:
        cv = tables["curves.csv"]
        keys = [k for k in ("cell", "domain") if k in cv.columns]
        last = cv[cv["step"] == cv["step"].max()]
        t = last.groupby(keys, as_index=False)[[c for c in ("log_ppl", "floor") if c in cv.columns]].mean()
        if "floor" in t:
            t["gap to floor"] = t["log_ppl"] - t["floor"]
        t.insert(0, "step", int(cv["step"].max()))
        report.tables["final held-out log-PPL (mean over seeds)"] = t
    report.summary = next(iter(report.tables.values()), None)
