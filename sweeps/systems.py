"""What a worker runs for each system, and the plans the define steps build: the registry that the
app (``sandbox worker`` and ``sandbox sweep|factorial --enqueue-only``) hands to the generic queue
(`sweeps.worker`), which itself knows no system.

- Plan builders (the define step): `sweep_jobs` (an analytic grid sweep), `substrate_sweep_jobs` (a
  substrate map), both the map driver's `sweeps.grid.map_jobs` over their system, and
  `factorial_jobs` (a factorial); each returns one `sweeps.worker.Job` per trial, whose payload
  ``{"system": NAME, ...}`` holds everything a worker needs to rebuild the trial's configuration.
- Runners (the worker): `SYSTEMS` maps a system name to the function that runs such a payload and
  returns an `Outcome`: the map systems' own `run_job` (`sweeps.analytic_map.AnalyticMap`,
  `sweeps.substrate_map.SubstrateMap`) and `run_factorial_trial`. A runner whose payload hashes
  differently here raises `CodeMismatch` (the queue gives the trial back).
- `code_identity`: what a worker must share with the define step (stored in the study by
  `sweeps.worker.enqueue`, compared by `sweeps.worker.check_code`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from sandbox.errors import BadInput
from sandbox.results import to_jsonable
from sweeps import ledger
from sweeps.analytic_map import AnalyticMap
from sweeps.substrate_map import SubstrateMap
from sweeps.worker import Job, Outcome, Runner, WorkerContext


def code_identity() -> dict:
    """What a worker must share with the define step: the package version and a fingerprint of the
    configuration hash scheme (the hashes of the default configurations of every system, so a
    changed field, default or hashing rule changes it)."""
    import sandbox
    from sandbox.analytic import AnalyticConfig
    from sandbox.results import config_hash
    from sandbox.tasks import TaskSpec
    from substrate.cell import CellConfig
    from sweeps.analytic_map import point_key

    probe = {"analytic": point_key(TaskSpec(), AnalyticConfig()), "cell": config_hash(CellConfig().identity()),
             "json": config_hash({"a": [1, 2.5, None], "b": "x"})}
    return {"hash_scheme": config_hash(probe, 16), "version": sandbox.__version__}


# ---------------------------------------------------------------------------------------------
# Plans: one job per trial (the define step)
# ---------------------------------------------------------------------------------------------


def sweep_jobs(cfg) -> list[Job]:
    """The plan of a grid sweep (`sweeps.grid.SweepConfig`): one job per (point, seed), at grad's
    tuned setting where tuning is on (tuned here, by the define step, in stacked batches: every
    worker then runs the setting the collecting command finds again). Robustness rows
    (``--tune-robust``) are not planned: they run on one machine only."""
    from sweeps.grid import map_jobs

    if getattr(cfg, "search", "grid") != "grid":
        raise BadInput("--search", cfg.search, "grid with --enqueue-only (the boundary search picks points as results "
                       "arrive, so it cannot be planned ahead)")
    return map_jobs(AnalyticMap(cfg))


def substrate_sweep_jobs(cfg) -> list[Job]:
    """The plan of a substrate map (`sweeps.substrate_map.SubstrateSweepConfig`): one job per
    (point, seed); the payload is the point's full comparison (`RoutingArms`) and the cache of the
    shared base (made absolute, so workers on a shared filesystem reuse it)."""
    from sweeps.grid import map_jobs

    return map_jobs(SubstrateMap(cfg))


def factorial_jobs(fcfg, out: str | Path, cache: str | Path, *, tuning: bool = False,
                   chosen: dict[str, float] | None = None) -> list[Job]:
    """The plan of a factorial (`sweeps.factorial.FactorialConfig`): one job per (cell, seed); the
    per-trial folders go under `out` (workers on a shared filesystem resume each other's
    checkpoints there) and the base model cache under `cache`, unless a worker overrides them.
    `tuning`: the router-lr tuning trials instead (one per cell x candidate x tuning seed, each with
    its folder as ``dir``); `chosen`: cell -> the multiple of ``lr`` its evaluation trials run at."""
    from sweeps.factorial import trial_key, tune_dir_name, tune_key, tuning_trials

    out, cache = os.path.abspath(out), os.path.abspath(cache)
    if tuning:
        return [Job(key=tune_key(cell, m, seed),
                    payload={"system": "factorial", "cell": fcfg.trial_config(cell, seed, fcfg.tune_value(m)).flat(),
                             "out": out, "cache": cache, "dir": tune_dir_name(cell, m, seed)},
                    attrs={"cell": cell, "seed": int(seed), "tune_multiple": float(m),
                           **ledger.labels("factorial", arm=cell)})
                for cell, m, seed in tuning_trials(fcfg)]
    chosen = chosen or {}
    lr = {c: fcfg.tune_value(m) for c, m in chosen.items()}
    return [Job(key=trial_key(cell, seed, chosen.get(cell)),
                payload={"system": "factorial", "cell": fcfg.trial_config(cell, seed, lr.get(cell)).flat(),
                         "out": out, "cache": cache},
                attrs={"cell": cell, "seed": int(seed), **ledger.labels("factorial", arm=cell)})
            for seed in fcfg.seeds for cell in fcfg.cells]


def factorial_plan(fcfg, out: str | Path, cache: str | Path, storage: str) -> tuple[list[Job], str]:
    """The factorial define step's jobs and a line saying which: without tuning, every evaluation
    trial (`factorial_jobs`); with ``tune`` grid, the router-lr tuning trials until every one has
    finished in `storage`, then the evaluation trials at each cell's chosen router lr
    (`sweeps.factorial.chosen_from_ledger`)."""
    from sweeps.factorial import chosen_from_ledger, study_name

    if not fcfg.tuning:
        return factorial_jobs(fcfg, out, cache), ""
    chosen = chosen_from_ledger(fcfg, ledger.TrialLedger(storage, study_name(fcfg), metric=ledger.METRICS["factorial"]))
    if chosen is None:
        return factorial_jobs(fcfg, out, cache, tuning=True), (
            "tuning first: these are the router-lr tuning trials; once the workers have finished them, rerun with "
            "--enqueue-only to queue the evaluation trials at each cell's chosen router lr")
    return factorial_jobs(fcfg, out, cache, chosen=chosen), "evaluation trials at the chosen router lr: " + ", ".join(
        f"{c} {fcfg.tune_value(m):.4g} ({m:g} x --lr)" for c, m in chosen.items())


# ---------------------------------------------------------------------------------------------
# Runners: payload -> result attributes (the worker)
# ---------------------------------------------------------------------------------------------


def run_factorial_trial(job: dict, ctx: WorkerContext) -> Outcome:
    """One (cell, seed) of a factorial, or one router-lr tuning trial (its folder in ``dir``): the
    substrate is prepared once per worker (cached on disk)."""
    from sandbox.results import config_hash
    from substrate.cell import CellConfig, prepare_substrate, run_cell
    from sweeps.factorial import trial_dir, with_drop

    cfg = CellConfig.of(**job["cell"])
    out, cache = Path(ctx.out or job["out"]), ctx.cache or job["cache"]
    base = config_hash({**cfg.identity(), "cell": None, "seed": None, "cache": str(cache)})
    sub = ctx.substrates.get(base)
    if sub is None:
        sub = ctx.substrates[base] = prepare_substrate(cfg, cache, ctx.log)
    where = out / job["dir"] if job.get("dir") else trial_dir(out, cfg.cell, cfg.seed)   # dir: a tuning trial
    res = run_cell(cfg, where, cache, substrate=sub, log=ctx.log)
    metrics = to_jsonable(with_drop(res.metrics, res.out))
    v = metrics.get("balanced_log_ppl")
    return Outcome({"result": metrics}, float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf)


#: One (point, seed) of an analytic sweep / of a substrate map (the systems' own runners).
run_analytic: Runner = AnalyticMap.run_job
run_substrate_point: Runner = SubstrateMap.run_job

#: system name -> runner: the registry the app hands to `sweeps.worker.run_worker`. A new map system
#: implements `sweeps.grid.MapSystem` and adds its `run_job` here; another kind of job adds its plan
#: builder and runner.
SYSTEMS: dict[str, Runner] = {
    "analytic": run_analytic,
    "factorial": run_factorial_trial,
    "substrate": run_substrate_point,
}
