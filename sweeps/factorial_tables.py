"""The factorial's tables: cells.csv rows, convergence, the attribution's router-lr columns, the
concatenated per-trial tables, the gate figures and the scope contrast under the lifecycle.

Convergence (`convergence`): each (cell, seed) row of ``cells.csv`` has ``drop_last_half``, the
balanced log-PPL at the last evaluation at or before half the steps minus the final one, and each
cell the label ``converged`` (its mean drop at most `sandbox.stats.CONVERGED_FRAC` x ``eps``: the
cell was no longer falling by a meaningful share of the equivalence margin), the analytic map's rule.

After the trials: ``cells.csv`` (one row per (cell, seed), with its ``base``), ``attribution.csv``
(`sandbox.replicates.attribution`: every named contrast, the chain's per-unit sum and its gap to the
direct full-vs-B3 contrast, with the ``unit`` and the number of ``bases``), ``contrasts.csv`` (each
tested contrast's per-seed delta with the seed's base), the concatenated per-trial tables (``curves.csv``, ``gates.csv``,
``lifecycle.csv``, ``fitness.csv`` with ``cell`` and ``seed`` columns) and the figures
(`figures.report.build_report`: forest plot, per-cell curves, gate maps, lineage).

The run loop is `sweeps.factorial`, which re-exports every name here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sandbox import gatestats, replicates
from sandbox.results import atomic_write_csv
from sandbox.stats import CONVERGED_FRAC, DEFAULT_ALPHA, DEFAULT_EPS
from sweeps.factorial_config import FactorialConfig, trial_dir

#: Columns of cells.csv that come straight from a run's metrics.json.
METRIC_COLUMNS = ("balanced_log_ppl", "diverged", "diverged_step", "balanced_gap_to_floor", "initial_balanced_log_ppl",
                  "base_balanced_log_ppl", "initial_gap_to_base", "steps", "tokens", "wall_s", "tokens_per_s", "lifecycle_events", "router",
                  "features", "scope")



def _num_or_nan(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def with_drop(metrics: dict, folder: Path) -> dict:
    """A trial's metrics with ``drop_last_half`` (`last_half_drop` of its folder's curves.csv), stored
    in the ledger with the result so a collect run reads it wherever the trial ran."""
    p = Path(folder) / "curves.csv"
    df = pd.read_csv(p) if p.exists() and p.stat().st_size > 1 else None
    steps = metrics.get("steps")
    drop = last_half_drop(df, int(steps)) if df is not None and isinstance(steps, int) and steps > 0 else math.nan
    return {**metrics, "drop_last_half": None if not math.isfinite(drop) else drop}


def last_half_drop(curves: pd.DataFrame, steps: int) -> float:
    """Balanced log-PPL at the last evaluation at or before ``steps / 2`` minus the final one (NaN
    without a balanced curve); > 0 means the run was still falling over its last half."""
    if curves is None or not len(curves) or "domain" not in curves:
        return math.nan
    b = curves[curves["domain"] == "balanced"].sort_values("step")
    if not len(b):
        return math.nan
    mid = b[b["step"] <= steps / 2]
    if not len(mid) or b["step"].iloc[-1] <= mid["step"].iloc[-1]:
        return math.nan
    return float(mid["log_ppl"].iloc[-1] - b["log_ppl"].iloc[-1])


def convergence(cells: pd.DataFrame, eps: float, out: Path, frac: float = CONVERGED_FRAC) -> pd.DataFrame:
    """`cells` with ``drop_last_half`` per (cell, seed) (the trial's stored one, `with_drop`; for a
    result stored before it, `last_half_drop` of the trial's curves.csv under `out`, NaN where that is
    absent) and the per-cell label ``converged`` (the cell's mean drop <= `frac` x `eps`; empty where
    no drop is known), repeated on each row of the cell."""
    cells = cells.copy()
    drops = []
    stored = cells["drop_last_half"] if "drop_last_half" in cells else pd.Series(math.nan, index=cells.index)
    for (_, r), known in zip(cells.iterrows(), stored):
        if isinstance(known, (int, float)) and math.isfinite(known):
            drops.append(float(known))
            continue
        p = trial_dir(out, r["cell"], int(r["seed"])) / "curves.csv"
        df = pd.read_csv(p) if p.exists() and p.stat().st_size > 1 else None
        steps = r.get("steps")
        drops.append(last_half_drop(df, int(steps)) if df is not None and steps == steps and steps else math.nan)
    cells["drop_last_half"] = drops
    mean = cells.groupby("cell", sort=False)["drop_last_half"].mean()
    label = {c: ("" if not math.isfinite(v) else bool(v <= frac * eps)) for c, v in mean.items()}
    cells["converged"] = [label[c] for c in cells["cell"]]
    return cells


def tuning_lines(res: "FactorialResult") -> list[str]:
    """What the command says about the router lr and convergence after the attribution."""
    t, lines = res.tuning or {}, []
    if t.get("mode") == "grid":
        parts = []
        for cell, c in t["chosen"].items():
            edge = f", at the grid's {c['edge']} end: widen --tune-router-lr" if c["edge"] else ""
            parts.append(f"{cell} {c['router_lr']:.4g} ({c['multiple']:g} x --lr{edge})")
        lines.append(f"router lr tuned per cell on seeds {','.join(map(str, t['seeds']))} over "
                     f"{','.join(f'{m:g}' for m in t['multiples'])} x --lr ({t['computed']} tuning trials computed, "
                     f"{t['reused']} reused): " + "; ".join(parts))
    elif t:
        lines.append(f"router lr not tuned: every cell at {t['router_lr']:.4g} (--tune grid chooses it per cell)")
    conv = res.cells.drop_duplicates("cell") if "converged" in res.cells else None
    if conv is not None:
        words = [f"{r['cell']} {'converged' if r['converged'] is True else 'not converged' if r['converged'] is False else 'unknown'}"
                 for _, r in conv.iterrows()]
        lines.append("convergence (mean drop over the last half <= "
                     f"{CONVERGED_FRAC:g} x eps): " + "; ".join(words))
    return lines


@dataclass
class FactorialResult:
    out: Path
    cells: pd.DataFrame
    attribution: pd.DataFrame
    computed: int
    reused: int
    figures: list = field(default_factory=list)
    sequential: list = field(default_factory=list)
    """`sandbox.sequential.Decision` per tested contrast (sequential runs only)."""
    looks: list = field(default_factory=list)
    """Seeds in the run at each look taken (sequential runs only)."""
    tuning: dict = field(default_factory=dict)
    """The manifest's ``tuning``: the mode, and with grid the candidates, seeds, choices and counts."""


def cells_row(cell: str, seed: int, metrics: dict) -> dict:
    """One cells.csv row from a run's metrics: `METRIC_COLUMNS`, per-domain log-PPL as
    ``log_ppl_<domain>``, the router's peak learning rate and the gate diagnostics on the held-out
    windows at the start and the end of adaptation (`sandbox.gatestats.COLUMNS`:
    ``gate_<name>_before`` / ``gate_<name>_after``, per-domain ones averaged over domains)."""
    row = {"cell": cell, "seed": seed, "base": int(metrics.get("base_seed") or 0)}
    row.update({k: metrics.get(k) for k in METRIC_COLUMNS})
    if row["initial_gap_to_base"] is None:   # metrics.json written before the column existed
        row["initial_gap_to_base"] = (row["initial_balanced_log_ppl"] or math.nan) - (row["base_balanced_log_ppl"] or math.nan)
    if row["diverged"]:
        row["balanced_log_ppl"] = math.nan
    for name, v in (metrics.get("log_ppl") or {}).items():
        row[f"log_ppl_{name}"] = math.nan if v is None else v
    row["router_lr"] = metrics.get("router_lr", math.nan)
    row["drop_last_half"] = _num_or_nan(metrics.get("drop_last_half"))   # `with_drop`; NaN if stored before it
    row["train_epochs"] = metrics.get("train_epochs", math.nan)   # absent before epochs were counted
    gates = metrics.get("gates") or {}   # absent in metrics.json written before the diagnostics: NaN
    for phase in ("before", "after"):
        row.update(gatestats.columns(gates.get(phase), phase))
    return row


def _gate_figures(out: Path) -> list:
    """Each cell's gate figure (`figures.gates`, first seed) drawn again with the cell's name in its
    title, over the report's ``figures/gates_<cell>`` (the report splits the table by cell and so
    draws the panels without it)."""
    from figures import gates
    from figures.report import facets
    from sandbox.results import save_figure

    path = out / "gates.csv"
    if not path.exists():
        return []
    table = pd.read_csv(path)
    if "cell" not in table or table["cell"].nunique() < 2:
        return []
    paths = []
    for (suffix, part), cell in zip(facets(table[["cell", "seed", "phase", "domain", "slot", "mean_gate"]]),
                                    sorted(table["cell"].unique())):   # facets groups by cell, sorted
        df = gates.collect(part)
        df.attrs["cell"] = cell
        paths += save_figure(gates.plot(df), out / "figures" / f"gates{suffix}")
    return paths


def _concat_tables(fcfg: FactorialConfig, out: Path) -> None:
    """Stack each trial's curves/gates/lifecycle/fitness tables into one with cell and seed columns."""
    for name in ("curves.csv", "gates.csv", "lifecycle.csv", "fitness.csv"):
        parts = []
        for seed in fcfg.seeds:
            for cell in fcfg.cells:
                p = trial_dir(out, cell, seed) / name
                if p.exists() and p.stat().st_size > 1:
                    df = pd.read_csv(p)
                    if len(df):
                        parts.append(df.assign(cell=cell, seed=seed))
        if parts:
            atomic_write_csv(out / name, pd.concat(parts, ignore_index=True))


def scope_under_lifecycle(cells: pd.DataFrame, eps: float = DEFAULT_EPS, alpha: float = DEFAULT_ALPHA):
    """Paired R+E+L vs R+L (the scope factor where it can act: through the lifecycle's deaths), across
    bases when the table spans several (`sandbox.replicates`), else across seeds.

    Not one of the named contrasts (`sandbox.factors.CONTRASTS`): without L, E changes nothing but the
    logged fitness, so ``scope`` (R+E vs R) is zero by construction here; this contrast is the one
    that can show a scope effect. Returns a `sandbox.stats.Paired` or None if a cell is missing.
    """
    from sandbox import stats

    if replicates.replication(cells)["unit"] == "base":   # the base as the unit, as in the attribution
        cells = replicates.base_means(cells[cells["cell"].isin(["R+L", "R+E+L"])]).rename(columns={"base": "seed"})
    wide = cells.pivot(index="seed", columns="cell", values="balanced_log_ppl")
    if not {"R+L", "R+E+L"} <= set(wide.columns):
        return None
    both = wide[["R+L", "R+E+L"]].dropna(how="all")
    return stats.paired(both["R+L"].to_numpy(float), both["R+E+L"].to_numpy(float), eps, alpha)
