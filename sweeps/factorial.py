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

The factorial is four modules of one concern each: `sweeps.factorial_config` (the design, the
named settings, the study and the evaluation trial keys), `sweeps.factorial_tuning` (the router lr
per cell), `sweeps.factorial_tables` (cells.csv, convergence, the concatenated tables and figures)
and this one, the run loop (`run_factorial`, `run_tuning`), which re-exports every name of the other
three, so ``from sweeps.factorial import ...`` reaches all of them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pandas as pd

from sandbox import replicates
from sandbox.results import RunDir, atomic_write_csv, open_run_dir
from sandbox.stats import CONVERGED_FRAC
from substrate.cell import CellConfig, data_check, prepare_substrate, revisit_warning, run_cell
from substrate.defaults import MAX_EPOCHS
from sweeps.ledger import METRICS, TrialLedger, labels
from sweeps.factorial_config import (MAX_SEEDS, SETTINGS, STUDY, TUNE_MODES, FactorialConfig,  # noqa: F401
                                     resolve_setting, study_name, trial_dir, trial_key)
from sweeps.factorial_tables import (METRIC_COLUMNS, FactorialResult, _concat_tables, _gate_figures,  # noqa: F401
                                     _num_or_nan, cells_row, convergence, last_half_drop,
                                     scope_under_lifecycle, tuning_lines, with_drop)
from sweeps.factorial_tuning import (TUNE_RULE, TUNING_COLUMNS, choose_router_lr, chosen_from_ledger,  # noqa: F401
                                     chosen_multiples, tune_dir_name, tune_key, tuning_keys, tuning_row,
                                     tuning_trials)


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
        chosen = chosen_multiples(fcfg, choice, str(out / "tuning.csv"))
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
        att = replicates.router_lr_columns(att, cells, fcfg.tuning)
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


def run_tuning(fcfg: FactorialConfig, out: Path, ledger: TrialLedger, substrate: Callable, cache_dir,
               stage: Callable[[str, int, int], None] | None = None) -> tuple[pd.DataFrame, dict]:
    """Every tuning trial (cell x candidate x tuning seed) through `ledger` (a finished one is read back,
    not run again); `substrate(tcfg)` gives the trial's prepared substrate. Returns the tuning table
    (`TUNING_COLUMNS`) and ``{computed, reused}``."""
    rows, computed, reused = [], 0, 0
    trials = tuning_trials(fcfg)
    for cell, m, seed in trials:
        tcfg = fcfg.trial_config(cell, seed, fcfg.tune_value(m))

        def go(tcfg=tcfg, where=out / tune_dir_name(cell, m, seed)) -> dict:
            res = run_cell(tcfg, where, cache_dir, substrate=substrate(tcfg), log=None)
            return with_drop(res.metrics, res.out)

        metrics, did = ledger.run(tune_key(cell, m, seed), go, "balanced_log_ppl",
                                  {"cell": cell, "seed": seed, "tune_multiple": m, **labels("factorial", arm=cell)})
        computed += did
        reused += not did
        rows.append(tuning_row(cell, m, seed, metrics))
        if stage is not None:
            stage("tuning", computed + reused, len(trials))
    return pd.DataFrame(rows, columns=list(TUNING_COLUMNS)), {"computed": computed, "reused": reused}
