"""The router learning rate per cell (``tune`` grid): tuning trial keys and folders, tuning.csv rows,
the choice rule and the choice read back from a ledger.

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

The tuning trials themselves run in `sweeps.factorial.run_tuning`; `sweeps.factorial` re-exports
every name here.
"""

from __future__ import annotations

import math

import pandas as pd

from sandbox.errors import BadInput
from sweeps.factorial_config import FactorialConfig
from sweeps.factorial_tables import _num_or_nan
from sweeps.ledger import TrialLedger

def tune_key(cell: str, multiple: float, seed: int) -> str:
    """Ledger key of a tuning trial: ``tune/<cell>/<multiple>x/<seed>``."""
    return f"tune/{cell}/{multiple:g}x/{seed}"


def tune_dir_name(cell: str, multiple: float, seed: int) -> str:
    """A tuning trial's folder under the factorial folder."""
    return f"tuning/{cell}_x{multiple:g}_s{seed}"


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


def tuning_trials(fcfg: FactorialConfig) -> list[tuple[str, float, int]]:
    """``(cell, multiple, seed)`` of every tuning trial, in the order they run (none when ``tune`` is
    off): the one list the local run, the workers' plan, the ledger keys and the read-back share."""
    if not fcfg.tuning:
        return []
    return [(c, m, s) for s in fcfg.tune_seeds for c in fcfg.cells for m in fcfg.tune_router_lr]


def tuning_keys(fcfg: FactorialConfig) -> list[str]:
    """Ledger keys of every tuning trial (none when ``tune`` is off)."""
    return [tune_key(c, m, s) for c, m, s in tuning_trials(fcfg)]


def chosen_multiples(fcfg: FactorialConfig, choice: dict[str, dict], table: str | None = None) -> dict[str, float]:
    """``{cell: chosen multiple}`` of `choose_router_lr`'s `choice`; one line (exit 2) naming
    ``--tune-router-lr`` when every candidate of a cell was excluded (`table`: where tuning.csv is)."""
    failed = [cell for cell, c in choice.items() if c["multiple"] is None]
    if failed:
        where = f"; see {table}" if table else ""
        raise BadInput("--tune-router-lr", ",".join(f"{m:g}" for m in fcfg.tune_router_lr),
                       f"a grid with a candidate on which no tuning run diverged (every candidate of {failed[0]} "
                       f"diverged on some tuning seed{where}): add smaller multiples")
    return {cell: c["multiple"] for cell, c in choice.items()}


def chosen_from_ledger(fcfg: FactorialConfig, ledger: TrialLedger) -> dict[str, float] | None:
    """Each cell's chosen multiple of ``lr`` from the ledger's finished tuning trials; None while any is
    missing (the define step then queues the tuning trials first, `sweeps.systems.factorial_plan`)."""
    results = ledger.results()
    rows = []
    for cell, m, seed in tuning_trials(fcfg):
        r = results.get(tune_key(cell, m, seed))
        if r is None:
            return None
        rows.append(tuning_row(cell, m, seed, r))
    choice = choose_router_lr(pd.DataFrame(rows, columns=list(TUNING_COLUMNS)), fcfg.tune_router_lr)
    return chosen_multiples(fcfg, choice)

