"""The divergence-gain map of specialist fusion: `sandbox fusion`.

Points are specialist step counts (how far the specialists move from the shared base); each
(point, seed) is one trial of `substrate.fusion.run_fusion` on one shared frozen base
(`substrate.cell.prepare_substrate`, cached), recorded in the same Optuna trial ledger as the sweeps
(`sweeps.ledger`: a journal file in the run folder or any ``--storage`` URL; a trial is added when
it finishes, so a kill loses at most the trial in flight and a rerun computes only what is missing).

Tables:

- ``fusion.csv``: one row per point x seed x method (``best_specialist, base, uniform, oracle, B3, R``):
  ``point, specialist_steps, seed, method, divergence, gain, balanced_nll, best_specialist,
  best_specialist_nll, base_nll, diverged, wall_s, nll_<m>...`` (divergence and gain in percent,
  see `substrate.fusion`).
- ``fit.csv`` / ``fit.json``: per method and level (``seed``: every (point, seed) is one
  observation; ``point``: the seed means of each point), the OLS line gain = a x divergence + b
  with 95% CIs, R^2, the residual SD and what the figure needs to draw the band, the zero-gain
  threshold -b/a, the leave-one-out RMSE, and whether each published line's slope and intercept
  lie inside our CIs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
from scipy import stats as sps

from sandbox.errors import require
from sandbox.identity import identity, key, never, rules
from sandbox.stats import DEFAULT_ALPHA
from substrate.fusion import METHODS, FusionConfig

DEFAULT_STUDY = "fusion"
#: The published lines (KALAVAI): gain = slope x divergence + intercept, percent.
PUBLISHED = (
    {"name": "published n=6", "slope": 0.82, "intercept": -2.72, "r2": 0.856, "n": 6},
    {"name": "published n=8", "slope": 0.83, "intercept": -2.80, "r2": 0.872, "n": 8},
)
FIT_METHODS = ("B3", "R", "uniform", "oracle", "base")
FUSION_COLUMNS = ["point", "specialist_steps", "seed", "method", "divergence", "gain", "balanced_nll",
                  "best_specialist", "best_specialist_nll", "base_nll", "diverged", "wall_s"]


@dataclass(frozen=True)
class FusionSweepConfig:
    """A fusion map: the trial template, the specialist step counts (points) and the seeds."""

    base: FusionConfig = field(default_factory=FusionConfig)
    specialist_steps: tuple[int, ...] = (1, 3, 10, 30, 100)
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=rules(never("more seeds grow the same map")))
    alpha: float = field(default=DEFAULT_ALPHA, metadata=rules(never("a statistics setting: the same trials")))
    """1 - confidence level of the fit's intervals."""
    cache: str = "runs/cache"
    """Folder of the cached corpus, base and specialists."""

    def __post_init__(self) -> None:
        require(len(self.specialist_steps) >= 1 and all(isinstance(s, int) and s >= 1 for s in self.specialist_steps)
                and len(set(self.specialist_steps)) == len(self.specialist_steps), "specialist_steps",
                ",".join(map(str, self.specialist_steps)), "distinct integers >= 1")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
                "at least one distinct seed")
        require(isinstance(self.alpha, float) and 0 < self.alpha < 1, "alpha", self.alpha, "a number in (0, 1)")

    def trial(self, steps: int, seed: int) -> FusionConfig:
        return dataclasses.replace(self.base, specialist_steps=int(steps), seed=int(seed))

    def folder_key(self) -> dict:
        """What names the default run folder: the fields after their rules (`sandbox.identity`)."""
        return identity(self)


def point_key(cfg: FusionConfig) -> str:
    """Ledger identity of a point: the trial's full config without seed and device."""
    return key({"system": "fusion", "v": 2, "trial": cfg}, 16)


# ---------------------------------------------------------------------------------------------
# The fit
# ---------------------------------------------------------------------------------------------


def fit_line(x, y, alpha: float = DEFAULT_ALPHA) -> dict:
    """OLS ``y = slope x + intercept`` with (1 - alpha) t CIs, R^2, the residual SD, the zero
    crossing ``-intercept / slope`` and the leave-one-out RMSE of held-out predictions.

    Also returns ``n, x_mean, sxx, t_crit`` so a reader can draw the confidence band
    ``t_crit s sqrt(1/n + (x - x_mean)^2 / sxx)`` and the prediction band (``1 +`` under the root).
    Fewer than 3 points or no spread in x give NaNs (no CI can be formed).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    n = len(x)
    nan = float("nan")
    out = {k: nan for k in ("slope", "slope_se", "slope_ci_low", "slope_ci_high", "intercept", "intercept_se",
                            "intercept_ci_low", "intercept_ci_high", "r2", "resid_sd", "x_mean", "sxx", "t_crit",
                            "threshold", "loo_rmse", "slope_p")}
    out["n"] = n
    if n < 3 or np.ptp(x) == 0:
        return out
    xm, ym = x.mean(), y.mean()
    sxx = float(((x - xm) ** 2).sum())
    slope = float(((x - xm) * (y - ym)).sum() / sxx)
    intercept = float(ym - slope * xm)
    resid = y - (intercept + slope * x)
    sst = float(((y - ym) ** 2).sum())
    df = n - 2
    s = math.sqrt(float((resid ** 2).sum()) / df)
    se_a = s / math.sqrt(sxx)
    se_b = s * math.sqrt(1.0 / n + xm * xm / sxx)
    t = float(sps.t.ppf(1 - alpha / 2, df))
    h = 1.0 / n + (x - xm) ** 2 / sxx                        # leverages: LOO residual = e / (1 - h)
    loo = resid / (1 - h)
    out.update(slope=slope, slope_se=se_a, slope_ci_low=slope - t * se_a, slope_ci_high=slope + t * se_a,
               intercept=intercept, intercept_se=se_b, intercept_ci_low=intercept - t * se_b,
               intercept_ci_high=intercept + t * se_b, r2=1.0 - float((resid ** 2).sum()) / sst if sst > 0 else nan,
               resid_sd=s, x_mean=float(xm), sxx=sxx, t_crit=t,
               threshold=-intercept / slope if slope != 0 else nan,
               loo_rmse=float(np.sqrt(np.mean(loo ** 2))) if n > 2 else nan,
               slope_p=float(2 * sps.t.sf(abs(slope / se_a), df)) if se_a > 0 else nan)
    return out


def fit_table(table: pd.DataFrame, alpha: float = DEFAULT_ALPHA, methods=FIT_METHODS) -> pd.DataFrame:
    """fit.csv: `fit_line` of gain on divergence per method and level, with the published lines' checks."""
    rows = []
    for method in methods:
        d = table[(table["method"] == method) & ~table["diverged"].astype(bool)]
        if d.empty:
            continue
        per_point = d.groupby("point", sort=True)[["divergence", "gain"]].mean()
        for level, (x, y) in (("seed", (d["divergence"], d["gain"])),
                              ("point", (per_point["divergence"], per_point["gain"]))):
            f = fit_line(x, y, alpha)
            row = {"method": method, "level": level, **f, "alpha": alpha,
                   "x_min": float(np.min(x)), "x_max": float(np.max(x))}
            for p, tag in zip(PUBLISHED, ("pub6", "pub8")):
                row[f"{tag}_slope_in_ci"] = bool(f["slope_ci_low"] <= p["slope"] <= f["slope_ci_high"])
                row[f"{tag}_intercept_in_ci"] = bool(f["intercept_ci_low"] <= p["intercept"] <= f["intercept_ci_high"])
            rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------
# The map
# ---------------------------------------------------------------------------------------------


@dataclass
class FusionOutcome:
    table: pd.DataFrame
    fit: pd.DataFrame
    computed: int
    reused: int
    figures: list


def run_fusion_map(cfg: FusionSweepConfig, out: Path, storage: str | None = None, study: str | None = None,
                   progress: Callable[[int, int, dict], None] | None = None,
                   draw: Callable[[Path], list] | None = None, argv: list[str] | None = None,
                   log: Callable[[str], None] | None = None, overwrite: bool = False) -> FusionOutcome:
    """Run (or resume) a fusion map into `out`; `draw(out)` (the figure layer, passed down by the
    command) draws the figures from the written tables. A folder holding another configuration is
    refused before anything runs; `overwrite` empties it first (`sandbox.results.open_run_dir`)."""
    from sandbox.results import RunDir, open_run_dir
    from substrate.cell import prepare_substrate
    from substrate.fusion import run_fusion
    from sweeps import ledger

    out = Path(out)
    name = study or DEFAULT_STUDY
    open_run_dir(out, "fusion", cfg, overwrite)
    store = ledger.storage_for(out, storage, command="fusion")
    st = ledger.open_study(store, name, metric=ledger.METRICS["fusion"])
    run = RunDir.create(out, command="fusion", config=cfg, seeds=list(cfg.seeds), argv=argv,
                        extra={"study": name, "storage": storage or str(out / "trials.journal"), "alpha": cfg.alpha,
                               "published": PUBLISHED})
    done = ledger.finished(st)
    total = len(cfg.specialist_steps) * len(cfg.seeds)
    bounds = {"specialist_steps": (min(cfg.specialist_steps), max(cfg.specialist_steps))}
    computed = reused = 0
    sub = None
    try:
        for steps in cfg.specialist_steps:
            key = point_key(cfg.trial(steps, cfg.seeds[0]))
            for seed in cfg.seeds:
                if ledger.trial_key(key, seed) in done:
                    reused += 1
                else:
                    if sub is None:
                        sub = prepare_substrate(cfg.base.cell(), cfg.cache, log)
                    res = run_fusion(cfg.trial(steps, seed), sub, cfg.cache)
                    rows = res["rows"]
                    by = {r["method"]: r["gain"] for r in rows}
                    ledger.record(st, key, {"specialist_steps": steps}, bounds, [(seed, rows, by.get("R", float("nan")))],
                                  ledger.labels("fusion", {"specialist_steps": steps}, "R vs best specialist"))
                    done[ledger.trial_key(key, seed)] = {"rows": rows}
                    computed += 1
                if progress:
                    progress(computed + reused, total, {"specialist_steps": steps, "seed": seed})
    except BaseException:
        run.release()
        raise
    table = []
    for i, steps in enumerate(cfg.specialist_steps):
        key = point_key(cfg.trial(steps, cfg.seeds[0]))
        for seed in cfg.seeds:
            for r in done[ledger.trial_key(key, seed)]["rows"]:
                table.append({"point": i, "specialist_steps": int(steps), "seed": int(seed), **r})
    df = pd.DataFrame(table)
    extra = sorted((c for c in df.columns if c.startswith("nll_")), key=lambda c: int(c[4:]))
    cols = [c for c in FUSION_COLUMNS if c in df.columns] + extra
    order = {m: i for i, m in enumerate(METHODS)}
    df = (df[cols].assign(_m=df["method"].map(order)).sort_values(["point", "seed", "_m"], kind="stable")
          .drop(columns="_m").reset_index(drop=True))
    run.write_csv("fusion.csv", df)
    fit = fit_table(df, cfg.alpha)
    run.write_csv("fit.csv", fit)
    run.write_json("fit.json", {"published": PUBLISHED, "fits": fit.to_dict(orient="records")})
    figs = list(draw(out)) if draw is not None else []
    run.finish(computed=computed, reused=reused, points=len(cfg.specialist_steps))
    return FusionOutcome(df, fit, computed, reused, figs)


__all__ = ["FusionSweepConfig", "PUBLISHED", "fit_line", "fit_table", "run_fusion_map", "point_key"]
