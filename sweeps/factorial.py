"""The factorial of cells on the transformer: a (cell, seed) trial ledger and the attribution.

Every (cell, seed) pair is one trial. Trials live in an Optuna study stored as a journal file
inside the output folder (embedded, no server; any Optuna storage URL works through `storage`),
keyed by the user attribute ``key = "<cell>/<seed>"``:

- a COMPLETE trial holds the run's metrics as the user attribute ``result`` and is never run again
  (its value is the balanced log-PPL, ``+inf`` for a diverged run, so divergence is a recorded
  result, not a failure to retry);
- a trial left RUNNING by a killed process is marked FAIL when the same command runs again and a
  new trial is opened for the key; the cell run itself resumes from its checkpoint in
  ``trials/<cell>_s<seed>/``, so at most one checkpoint interval of work is lost.

One process drives one folder at a time: the folder is claimed for the run's duration
(`sandbox.results.claim_run_dir`), and a second factorial on it is refused with one line naming
``--out`` (two processes on one ledger would each see the other's RUNNING trial as stale). It
holds one configuration: another factorial config (other knobs, fewer cells or seeds) on it is
refused (`sandbox.results.open_run_dir`; ``--overwrite`` replaces the folder); more cells or seeds
grow the run in place. The corpus is shared by every trial and each base with its specialists by
the trials of its seeds (`substrate.cell.prepare_substrate`), so the cells differ only in their
letters and pair by seed.

Replicates: seed s adapts base ``s mod bases`` (`substrate.cell.CellConfig.bases`), each base
pretrained with its own specialists from its own seed and prepared once when a trial on it first
runs. With two or more bases the statistics take the base as the unit (`sandbox.replicates`: seeds
averaged within base, paired tests across bases); with one they run across seeds and are conditional
on that base. The manifest's ``replication`` says which.

Router learning rate (``tune``): off runs every cell at the template's router lr (one value for
all cells; the tables and the report say the router lr was not tuned). grid first runs each cell at
every candidate of `FactorialConfig.tune_router_lr` (multiples of ``lr``) on the tuning seeds
`FactorialConfig.tune_seeds`, which are disjoint from the evaluation seeds, and chooses per cell the
candidate with the lowest mean final balanced log-PPL over them (`choose_router_lr`; a candidate with
a diverged tuning run is excluded; ties go to the smaller lr; a choice at either end of the grid is
flagged ``tune_edge``); the evaluation seeds then run at each cell's choice. Tuning trials are
ledger trials like the others (key ``tune/<cell>/<multiple>x/<seed>``, folder
``tuning/<cell>_x<multiple>_s<seed>``; the evaluation trials' keys name their router lr,
``<cell>/<seed>/<multiple>x``, and the study's name leaves the grid out, so a widened grid reuses the
finished candidates through ``--storage``), so a killed run resumes without rerunning finished ones and
``--enqueue-only`` queues them for workers (then, once they have finished, the evaluation trials:
`sweeps.systems.factorial_plan`). Their table is ``tuning.csv``; the choice goes into ``cells.csv``, ``attribution.csv``
and the manifest's ``tuning``.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from sandbox import gatestats, replicates
from sandbox.factors import DEFAULT_CELLS, parse_cell
from sandbox.errors import BadInput, require
from sandbox.options import DEFAULT_SEEDS
from sandbox import identity as ident
from sandbox.results import RunDir, atomic_write_csv, open_run_dir
from sandbox.stats import CONVERGED_FRAC, DEFAULT_EPS
from substrate.cell import CellConfig, data_check, prepare_substrate, revisit_warning, run_cell
from substrate.defaults import MAX_EPOCHS
from sweeps.ledger import METRICS, TrialLedger, labels

STUDY = "factorial"
#: Columns of cells.csv that come straight from a run's metrics.json.
METRIC_COLUMNS = ("balanced_log_ppl", "diverged", "diverged_step", "balanced_gap_to_floor", "initial_balanced_log_ppl",
                  "base_balanced_log_ppl", "initial_gap_to_base", "steps", "tokens", "wall_s", "tokens_per_s", "lifecycle_events", "router",
                  "features", "scope")


# ---------------------------------------------------------------------------------------------
# The factorial
# ---------------------------------------------------------------------------------------------


#: Named settings of `sandbox factorial --setting NAME`: a bundle of option values (keyword -> value,
#: the command's keywords, so ``cells`` and ``seeds`` beside the cell knobs) taken where the command line
#: does not give the option itself. A setting only fills in options: the run's configuration, folder
#: name and ledger are those of the same command with the values written out, and the manifest records
#: the setting (`resolve_setting`). ``mechanism``: where the study's mechanism is looked for on a CPU,
#: docs/results/2026-12-07-mechanism.md.
SETTINGS: dict[str, dict] = {
    "mechanism": dict(preset="small", steps=200, router_lr=0.9, cells="B3,R", seeds="0,1,2,3,4,5", bases=3),
}


def resolve_setting(name: str, options: dict, given: set[str]) -> dict:
    """Fill `options` (the command's keywords) in place from the named setting `SETTINGS[name]`, except
    the keywords in `given` (options on the command line win), and return the manifest's record
    ``{name, values, applied, overridden}``: the setting's values, those taken, and the command line's
    values where they replaced the setting's. An unknown name is one line naming ``--setting``."""
    if name not in SETTINGS:
        raise BadInput("--setting", name, "one of " + ", ".join(SETTINGS))
    values = SETTINGS[name]
    applied, overridden = {}, {}
    for key, value in values.items():
        if key in given:
            overridden[key] = options.get(key)
        else:
            options[key] = value
            applied[key] = value
    return {"name": name, "values": dict(values), "applied": applied, "overridden": overridden}


#: The most seeds `--seeds-to-resolve` may reach: each seed is one trial per cell (minutes each), so a
#: larger bound is a typo, and planning it would take the define step minutes before any trial starts.
MAX_SEEDS = 10_000

#: Values of `FactorialConfig.tune`.
TUNE_MODES = ("off", "grid")


@dataclass(frozen=True)
class FactorialConfig:
    """A factorial run: `cells` x `seeds` of the cell template `base` (its cell and seed ignored)."""

    base: CellConfig = field(default_factory=CellConfig)
    cells: tuple[str, ...] = tuple(c.name for c in DEFAULT_CELLS)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    eps: float = DEFAULT_EPS
    """Equivalence margin (nats) of the paired statistics."""
    alpha: float = 0.05
    """Test level of the paired statistics."""
    seeds_to_resolve: int | None = None
    """Sequential run: add seeds in rounds until every tested contrast is classified or this many
    seeds are reached (`sandbox.sequential`); None = the fixed seeds only."""
    round_seeds: int | None = None
    """Seeds added per round of a sequential run (default: as many as `seeds`; at least 2)."""
    spending: str = "obf"
    """Alpha-spending function of the sequential design: obf (O'Brien-Fleming type) or pocock."""
    tune: str = "off"
    """Router learning rate per cell: off (every cell at --router-lr; the tables say the router lr
    was not tuned) or grid (each cell's router lr chosen on the tuning seeds: lowest mean final
    balanced log-PPL, a candidate with a diverged tuning run excluded; the evaluation seeds then run
    at each cell's choice)."""
    tune_router_lr: tuple[float, ...] = (1.0, 3.0, 10.0, 30.0, 100.0)
    """Router learning rates --tune grid tries, as multiples of --lr (10 is the untuned default)."""
    tune_seeds: tuple[int, ...] = (1000, 1001, 1002)
    """Tuning seeds of --tune grid, disjoint from the evaluation seeds (seed s adapts base s mod --bases)."""

    def __post_init__(self) -> None:
        names = tuple(parse_cell(c, "--cells").name for c in self.cells)
        require(len(names) >= 1 and len(set(names)) == len(names), "cells", ",".join(self.cells), "distinct cells")
        object.__setattr__(self, "cells", names)
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds)
                and all(isinstance(s, int) and s >= 0 for s in self.seeds), "seeds", self.seeds,
                "distinct non-negative integers")
        require(isinstance(self.eps, (int, float)) and 0 < self.eps < 10, "eps", self.eps, "a number in (0, 10)")
        require(isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1, "alpha", self.alpha, "a number in (0, 1)")
        from sandbox.sequential import SPENDINGS

        require(self.spending in SPENDINGS, "spending", self.spending, "one of " + ", ".join(SPENDINGS))
        if self.seeds_to_resolve is not None:
            n = self.seeds_to_resolve
            require(isinstance(n, int) and not isinstance(n, bool) and max(2, len(self.seeds)) <= n <= MAX_SEEDS,
                    "seeds_to_resolve", n, f"an integer >= the number of --seeds ({len(self.seeds)}) and >= 2, "
                    f"at most {MAX_SEEDS} (each seed is one trial per cell)")
            require(len(self.seeds) >= 2, "seeds", self.seeds, "at least 2 seeds to start a sequential run")
            require(self.base.bases == 1, "bases", self.base.bases, "1 with --seeds-to-resolve (the sequential "
                    "design adds seeds, the unit of a one-base run; with several bases the unit is the base)")
        if self.round_seeds is not None:
            r = self.round_seeds
            require(isinstance(r, int) and not isinstance(r, bool) and r >= 2, "round_seeds", r,
                    "an integer >= 2 (each round is a stage with its own paired t test)")
        require(self.tune in TUNE_MODES, "tune", self.tune, "one of " + ", ".join(TUNE_MODES))
        grid = tuple(self.tune_router_lr)
        require(len(grid) >= 1 and len(set(grid)) == len(grid)
                and all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in grid)
                and len({f"{m:g}" for m in grid}) == len(grid),
                "tune_router_lr", ",".join(map(str, grid)), "distinct positive multiples of --lr")
        object.__setattr__(self, "tune_router_lr", tuple(sorted(float(m) for m in grid)))
        ts = tuple(self.tune_seeds)
        require(len(ts) >= 1 and len(set(ts)) == len(ts)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in ts), "tune_seeds",
                ",".join(map(str, ts)), "distinct non-negative integers")
        object.__setattr__(self, "tune_seeds", ts)
        if self.tune == "grid":   # the grid and the tuning seeds only bind when they are run
            top = max(self.tune_router_lr) * self.base.lr
            require(top <= 1, "tune_router_lr", ",".join(f"{m:g}" for m in self.tune_router_lr),
                    f"multiples of --lr {self.base.lr:g} giving a router lr in (0, 1] (the largest gives {top:g})")
            both = sorted(set(ts) & set(self.seeds))
            require(not both, "tune_seeds", ",".join(map(str, ts)), "seeds disjoint from the evaluation --seeds "
                    f"(both hold {','.join(map(str, both))})")
            require(self.base.router_lr is None, "router_lr", self.base.router_lr, "left out with --tune grid "
                    "(each cell's router lr is chosen from --tune-router-lr), or --tune off")

    def seed_pool(self) -> tuple[int, ...]:
        """The seeds in the order a sequential run adds them: `seeds`, then the smallest non-negative
        integers not among them, up to `seeds_to_resolve` in all (just `seeds` for a fixed run)."""
        pool, taken = list(self.seeds), set(self.seeds)   # a set: linear in the pool, not quadratic
        skip = set(self.tune_seeds) if self.tuning else set()   # tuning seeds never evaluate
        k = 0
        while len(pool) < (self.seeds_to_resolve or 0):
            if k not in taken and k not in skip:
                pool.append(k)
            k += 1
        return tuple(pool)

    def looks(self) -> list[int]:
        """Seeds in the run at each look of a sequential run (`sandbox.sequential.look_schedule`)."""
        from sandbox.sequential import look_schedule

        if self.seeds_to_resolve is None:
            return [len(self.seeds)]
        return look_schedule(len(self.seeds), self.seeds_to_resolve, self.round_seeds or max(2, len(self.seeds)))

    def settings(self) -> dict:
        """The settings every trial shares: the template's identity in the ``template`` view
        (`sandbox.identity`: without cell, seed and device; ``bases`` when it is not 1, since seed s
        adapts base s mod bases, so a one-base factorial keeps its name), and with ``tune`` grid the
        tuning grid and seeds (off, every earlier run, keeps the name it had)."""
        d = ident.identity(self.base, "template")
        if self.tuning:
            d["tune"] = {"router_lr": list(self.tune_router_lr), "seeds": list(self.tune_seeds)}
        return d

    @property
    def tuning(self) -> bool:
        """True when each cell's router lr is chosen on the tuning seeds (``tune`` grid)."""
        return self.tune == "grid"

    def tune_value(self, multiple: float) -> float:
        """The router lr of a grid candidate: `multiple` x the template's ``lr``."""
        return float(multiple) * self.base.lr

    @property
    def bases(self) -> int:
        """Bases the seeds are spread over (the template's ``bases``)."""
        return self.base.bases

    def trial_config(self, cell: str, seed: int, router_lr: float | None = None) -> CellConfig:
        """The (cell, seed) trial: the template's settings, on base ``seed mod bases``; at `router_lr`
        when given (a tuning candidate, or the cell's tuned choice)."""
        if router_lr is None:
            return replace(self.base, cell=cell, seed=seed)
        return replace(self.base, cell=cell, seed=seed, router_lr=float(router_lr))


def study_name(fcfg: FactorialConfig) -> str:
    """The factorial's ledger study: one per shared settings (cells and seeds may differ). With
    ``tune`` grid the candidates and tuning seeds are left out of the name (every tuning trial's key
    names its candidate and seed, every evaluation trial's its router lr), so a widened grid or more
    tuning seeds reuse the finished tuning trials of the same study."""
    d = fcfg.settings()
    if fcfg.tuning:
        d["tune"] = "grid"
    return f"{STUDY}-{ident.key(d)}"


def trial_key(cell: str, seed: int, multiple: float | None = None) -> str:
    """Ledger key of an evaluation trial: ``<cell>/<seed>``, and ``/<multiple>x`` at a tuned router lr."""
    return f"{cell}/{seed}" if multiple is None else f"{cell}/{seed}/{multiple:g}x"


def trial_dir(out: Path, cell: str, seed: int) -> Path:
    return out / "trials" / f"{cell}_s{seed}"


def tune_key(cell: str, multiple: float, seed: int) -> str:
    """Ledger key of a tuning trial: ``tune/<cell>/<multiple>x/<seed>``."""
    return f"tune/{cell}/{multiple:g}x/{seed}"


def tune_dir_name(cell: str, multiple: float, seed: int) -> str:
    """A tuning trial's folder under the factorial folder."""
    return f"tuning/{cell}_x{multiple:g}_s{seed}"


# ---------------------------------------------------------------------------------------------
# Router learning rate per cell (``tune`` grid) and convergence
# ---------------------------------------------------------------------------------------------

#: Columns of tuning.csv.
TUNING_COLUMNS = ("cell", "multiple", "router_lr", "seed", "base", "loss", "diverged", "drop_last_half", "chosen")
#: How `choose_router_lr` scores a candidate (said in the manifest and the manual).
TUNE_RULE = ("lowest mean final balanced log-PPL over the tuning seeds; a candidate with a diverged tuning run "
             "excluded; ties to the smaller lr")


def tuning_row(cell: str, multiple: float, seed: int, metrics: dict) -> dict:
    """One tuning.csv row from a tuning trial's metrics (``loss`` NaN for a diverged run)."""
    loss = metrics.get("balanced_log_ppl")
    diverged = bool(metrics.get("diverged")) or not (isinstance(loss, (int, float)) and math.isfinite(loss))
    return {"cell": cell, "multiple": float(multiple), "router_lr": metrics.get("router_lr", math.nan), "seed": seed,
            "base": int(metrics.get("base_seed") or 0), "loss": math.nan if diverged else float(loss),
            "diverged": diverged, "drop_last_half": _num_or_nan(metrics.get("drop_last_half")), "chosen": False}


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


def choose_router_lr(table: pd.DataFrame, grid: tuple[float, ...]) -> dict[str, dict]:
    """Per cell of tuning table `table` (`TUNING_COLUMNS`), the candidate multiple of `grid` with the
    lowest mean loss over its tuning seeds (`TUNE_RULE`). Returns ``{cell: {multiple, router_lr,
    score, edge, excluded, scores}}``: ``multiple`` None when every candidate was excluded; ``edge``
    "low" or "high" when the choice is the grid's smallest or largest candidate (a grid of one is no
    edge), else ""; ``scores`` every candidate's mean (None where excluded)."""
    grid = tuple(sorted(grid))
    out = {}
    for cell in dict.fromkeys(table["cell"]):
        part = table[table["cell"] == cell]
        scores: dict[float, float | None] = {}
        for m in grid:
            rows = part[part["multiple"] == m]
            bad = len(rows) == 0 or rows["diverged"].astype(bool).any() or rows["loss"].isna().any()
            scores[m] = None if bad else float(rows["loss"].mean())
        valid = [m for m in grid if scores[m] is not None]
        best = min(valid, key=lambda m: (scores[m], m)) if valid else None
        edge = "" if best is None or len(grid) < 2 else "low" if best == grid[0] else "high" if best == grid[-1] else ""
        lr = part.loc[part["multiple"] == best, "router_lr"]
        out[cell] = {"multiple": best, "router_lr": float(lr.iloc[0]) if best is not None and len(lr) else None,
                     "score": scores[best] if best is not None else None, "edge": edge,
                     "excluded": [m for m in grid if scores[m] is None],
                     "scores": {f"{m:g}": scores[m] for m in grid}}
    return out


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


def _router_lr_columns(att: pd.DataFrame, cells: pd.DataFrame, tuned: bool) -> pd.DataFrame:
    """`att` with the router lr each side of a contrast ran (``treated_router_lr``,
    ``reference_router_lr``: the cell's value, NaN for a side that is not one cell or ran several),
    ``router_lr_tuned`` and each side's convergence label."""
    lr = {c: (float(v.iloc[0]) if v.nunique() == 1 else math.nan)
          for c, v in cells.groupby("cell", sort=False)["router_lr"]}
    conv = dict(zip(cells["cell"], cells["converged"])) if "converged" in cells else {}
    att = att.copy()
    for side in ("treated", "reference"):
        att[f"{side}_router_lr"] = [lr.get(c, math.nan) if isinstance(c, str) else math.nan for c in att[side]]
        att[f"{side}_converged"] = [conv.get(c, "") if isinstance(c, str) else "" for c in att[side]]
    att["router_lr_tuned"] = tuned
    return att


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


def run_factorial(fcfg: FactorialConfig, out: str | Path, cache_dir: str | Path = "runs/cache", *,
                  storage: str | None = None, figures: bool = True, argv: list[str] | None = None,
                  on_trial: Callable[[str, int, bool], None] | None = None,
                  progress: Callable[[str, int, int, int, dict], None] | None = None,
                  log: Callable[[str], None] | None = None,
                  stage: Callable[[str, int, int], None] | None = None, overwrite: bool = False,
                  setting: dict | None = None) -> FactorialResult:
    """Run every missing (cell, seed) trial, then write the tables, attribution and figures.
    `stage(name, done, total)` reports pretraining and specialists (`prepare_substrate`); `setting`
    (`resolve_setting`'s record of a named setting) goes into the manifest as ``setting``.

    `on_trial(cell, seed, computed)` is called before a trial runs (computed False = reused);
    `progress(cell, seed, step, steps, info)` after every step of a computed trial.
    A folder holding another configuration (fewer cells or seeds included; more grow the run) is
    refused before anything runs; `overwrite` empties it first (`sandbox.results.open_run_dir`).
    """
    out = Path(out)
    open_run_dir(out, "factorial", fcfg, overwrite)   # one run and one configuration per folder
    planned = replicates.replication(pd.DataFrame({"seed": list(fcfg.seeds),
                                                   "base": [fcfg.trial_config(fcfg.cells[0], s).base_seed
                                                            for s in fcfg.seeds]}), fcfg.bases)
    run = RunDir.create(out, "factorial", fcfg, seeds=list(fcfg.seeds), argv=argv,
                        extra={"settings": fcfg.settings(), "eps": fcfg.eps, "alpha": fcfg.alpha,
                               "replication": planned, **({"setting": setting} if setting else {})})
    if log is not None:
        log(f"replication: {planned['statement']}")
    ledger = TrialLedger(storage or out / "ledger.journal", study_name(fcfg),
                         flag="--storage" if storage else "--out", metric=METRICS["factorial"])
    if storage:   # trials planned for `sandbox worker` and still waiting or running: refuse, not compute
        from sweeps.ledger import check_settled, is_database

        if is_database(storage):   # the evaluation keys of a tuned run are checked once the choice is known
            check_settled(ledger.study, tuning_keys(fcfg) or [trial_key(c, s) for s in fcfg.seeds for c in fcfg.cells],
                          storage, study_name(fcfg))
    subs: dict[int, object] = {}   # base -> its substrate, prepared when a trial on it first runs
    data: dict = {}
    done: dict[tuple[str, int], dict] = {}
    computed = reused = 0

    def substrate(tcfg: CellConfig):
        if tcfg.base_seed not in subs:
            subs[tcfg.base_seed] = prepare_substrate(tcfg, cache_dir, log, stage)
            if not data:   # every trial reads its data alike: checked once, warned once
                data.update(data_check(tcfg, subs[tcfg.base_seed].corpus))
                if revisit_warning(data) and log is not None:
                    log(revisit_warning(data))
        return subs[tcfg.base_seed]

    chosen: dict[str, float] = {}   # cell -> the multiple of lr its evaluation trials run at
    tuning: dict = {"mode": "off", "router_lr": fcfg.base.router_lr_value, "note": "router lr not tuned"}
    if fcfg.tuning:
        table, counts = run_tuning(fcfg, out, ledger, substrate, cache_dir, stage)
        choice = choose_router_lr(table, fcfg.tune_router_lr)
        for cell, c in choice.items():
            table.loc[(table["cell"] == cell) & (table["multiple"] == c["multiple"]), "chosen"] = True
        atomic_write_csv(out / "tuning.csv", table)
        failed = [cell for cell, c in choice.items() if c["multiple"] is None]
        if failed:
            raise BadInput("--tune-router-lr", ",".join(f"{m:g}" for m in fcfg.tune_router_lr),
                           f"a grid with a candidate on which no tuning run diverged (every candidate of {failed[0]} "
                           f"diverged on some tuning seed; see {out / 'tuning.csv'}): add smaller multiples")
        chosen = {cell: c["multiple"] for cell, c in choice.items()}
        if storage:
            from sweeps.ledger import check_settled, is_database

            if is_database(storage):
                check_settled(ledger.study, [trial_key(c, s, chosen[c]) for s in fcfg.seeds for c in fcfg.cells],
                              storage, study_name(fcfg))
        tuning = {"mode": "grid", "multiples": list(fcfg.tune_router_lr), "seeds": list(fcfg.tune_seeds),
                  "rule": TUNE_RULE, "chosen": choice, **counts}
        if log is not None:
            log(tuning_lines(FactorialResult(out, pd.DataFrame(), pd.DataFrame(), 0, 0, tuning=tuning))[0])

    def run_trials(seeds) -> pd.DataFrame:
        nonlocal computed, reused
        for seed in seeds:
            for cell in fcfg.cells:
                if (cell, seed) in done:
                    continue
                key = trial_key(cell, seed, chosen.get(cell))
                stored = ledger.get(key)
                if on_trial is not None:
                    on_trial(cell, seed, stored is None)
                tcfg = fcfg.trial_config(cell, seed, fcfg.tune_value(chosen[cell]) if chosen else None)
                if stored is None:
                    substrate(tcfg)

                def go(cell=cell, seed=seed, tcfg=tcfg) -> dict:
                    cb = (lambda s, n, info: progress(cell, seed, s, n, info)) if progress else None
                    res = run_cell(tcfg, trial_dir(out, cell, seed), cache_dir, substrate=subs[tcfg.base_seed],
                                   progress=cb, log=None)
                    return with_drop(res.metrics, res.out)

                metrics, did = ledger.run(key, go, "balanced_log_ppl",
                                          {"cell": cell, "seed": seed, **labels("factorial", arm=cell)})
                computed += did
                reused += not did
                done[(cell, seed)] = cells_row(cell, seed, metrics)
        return pd.DataFrame([done[(c, s)] for s in seeds for c in fcfg.cells])

    from sandbox import stats

    decisions, looks, seq_rows = [], [], []
    if fcfg.seeds_to_resolve is None:
        cells = run_trials(fcfg.seeds)
    else:
        from sandbox.sequential import decide

        pool = fcfg.seed_pool()
        for n in fcfg.looks():
            looks.append(n)
            cells = run_trials(pool[:n])
            deltas = stats.contrast_deltas(cells)
            decisions, seq_rows = decide(deltas.to_numpy(float), list(deltas.columns), looks, fcfg.seeds_to_resolve,
                                         fcfg.alpha, fcfg.eps, fcfg.spending)
            if log is not None:
                open_ = [d.contrast for d in decisions if d.regime == "inconclusive"]
                log(f"look {len(looks)}: {n} seeds; " + (f"unclassified: {', '.join(open_)}" if open_ else
                                                         "every contrast classified"))
            if all(d.regime != "inconclusive" for d in decisions):
                break
        atomic_write_csv(out / "sequential.csv", pd.DataFrame(seq_rows))
    cells["router_lr_tuned"] = fcfg.tuning
    edges = {cell: c["edge"] for cell, c in tuning.get("chosen", {}).items()}
    cells["tune_edge"] = [edges.get(c, "") for c in cells["cell"]]
    cells = convergence(cells, fcfg.eps, out)
    atomic_write_csv(out / "cells.csv", cells)
    fcfg = replace(fcfg, seeds=tuple(dict.fromkeys(cells["seed"].tolist())))   # the seeds actually run
    _concat_tables(fcfg, out)

    att = replicates.attribution(cells, eps=fcfg.eps, alpha=fcfg.alpha) if cells["cell"].nunique() >= 2 else pd.DataFrame()
    if len(att):
        atomic_write_csv(out / "contrasts.csv", replicates.contrasts(cells))
    if len(att) and decisions:
        seq = {d.contrast: d for d in decisions}
        att["sequential_regime"] = [seq[c].regime if c in seq else "" for c in att["contrast"]]
        att["sequential_look"] = [seq[c].look if c in seq else None for c in att["contrast"]]
    if len(att):
        att = _router_lr_columns(att, cells, fcfg.tuning)
        atomic_write_csv(out / "attribution.csv", att)
    written = []
    if figures:
        from figures.report import build_report

        written = list(build_report(out, study=True))
        written += _gate_figures(out)
    extra = {"looks": looks, "seeds_run": list(fcfg.seeds)} if looks else {}
    epochs = pd.to_numeric(cells["train_epochs"], errors="coerce").max()
    if math.isfinite(epochs):   # what the trials counted (the check before them was an expectation)
        data = {"train_data": fcfg.base.train_data_value, "train_windows": data.get("train_windows"),
                "epochs": float(epochs), "max_epochs": MAX_EPOCHS, "revisited": bool(epochs > MAX_EPOCHS),
                "counted": True}
    conv = {c: v for c, v in zip(cells["cell"], cells["converged"])}
    run.finish(computed=computed, reused=reused, replication=replicates.replication(cells, fcfg.bases),
               tuning=tuning, convergence={"rule": f"mean drop_last_half <= {CONVERGED_FRAC:g} x eps",
                                           "eps": fcfg.eps, "converged": conv},
               **({"data": data} if data else {}), **extra)
    return FactorialResult(out, cells, att, computed, reused, written, decisions, looks, tuning)


def tuning_keys(fcfg: FactorialConfig) -> list[str]:
    """Ledger keys of every tuning trial (none when ``tune`` is off)."""
    if not fcfg.tuning:
        return []
    return [tune_key(c, m, s) for s in fcfg.tune_seeds for c in fcfg.cells for m in fcfg.tune_router_lr]


def run_tuning(fcfg: FactorialConfig, out: Path, ledger: TrialLedger, substrate: Callable, cache_dir,
               stage: Callable[[str, int, int], None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Every tuning trial (cell x candidate x tuning seed) through `ledger` (a finished one is read back,
    not run again); `substrate(tcfg)` gives the trial's prepared substrate. Returns the tuning table
    (`TUNING_COLUMNS`) and ``{computed, reused}``."""
    rows, computed, reused = [], 0, 0
    total = len(fcfg.tune_seeds) * len(fcfg.cells) * len(fcfg.tune_router_lr)
    for seed in fcfg.tune_seeds:
        for cell in fcfg.cells:
            for m in fcfg.tune_router_lr:
                tcfg = fcfg.trial_config(cell, seed, fcfg.tune_value(m))
                key = tune_key(cell, m, seed)

                def go(tcfg=tcfg, where=out / tune_dir_name(cell, m, seed)) -> dict:
                    res = run_cell(tcfg, where, cache_dir, substrate=substrate(tcfg), log=None)
                    return with_drop(res.metrics, res.out)

                metrics, did = ledger.run(key, go, "balanced_log_ppl",
                                          {"cell": cell, "seed": seed, "tune_multiple": m,
                                           **labels("factorial", arm=cell)})
                computed += did
                reused += not did
                rows.append(tuning_row(cell, m, seed, metrics))
                if stage is not None:
                    stage("tuning", computed + reused, total)
    return pd.DataFrame(rows, columns=list(TUNING_COLUMNS)), {"computed": computed, "reused": reused}


def chosen_from_ledger(fcfg: FactorialConfig, ledger: TrialLedger) -> dict[str, float] | None:
    """Each cell's chosen multiple of ``lr`` from the ledger's finished tuning trials; None while any is
    missing (the define step then queues the tuning trials first, `sweeps.systems.factorial_plan`)."""
    results = ledger.results()
    rows = []
    for seed in fcfg.tune_seeds:
        for cell in fcfg.cells:
            for m in fcfg.tune_router_lr:
                r = results.get(tune_key(cell, m, seed))
                if r is None:
                    return None
                rows.append(tuning_row(cell, m, seed, r))
    choice = choose_router_lr(pd.DataFrame(rows, columns=list(TUNING_COLUMNS)), fcfg.tune_router_lr)
    failed = [cell for cell, c in choice.items() if c["multiple"] is None]
    if failed:
        raise BadInput("--tune-router-lr", ",".join(f"{m:g}" for m in fcfg.tune_router_lr),
                       f"a grid with a candidate on which no tuning run diverged (every candidate of {failed[0]} "
                       "diverged on some tuning seed): add smaller multiples")
    return {cell: c["multiple"] for cell, c in choice.items()}



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


def scope_under_lifecycle(cells: pd.DataFrame, eps: float = DEFAULT_EPS, alpha: float = 0.05):
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
