"""What a worker runs for each system, and the plans the define steps build: the registry that the
app (``sandbox worker`` and ``sandbox sweep|factorial --enqueue-only``) hands to the generic queue
(`sweeps.worker`), which itself knows no system.

- Plan builders (the define step): `sweep_jobs` (an analytic grid sweep), `substrate_sweep_jobs` (a
  substrate map), `factorial_jobs` (a factorial); each returns one `sweeps.worker.Job` per trial,
  whose payload ``{"system": NAME, ...}`` holds everything a worker needs to rebuild the trial's
  configuration.
- Runners (the worker): `SYSTEMS` maps a system name to the function that runs such a payload and
  returns an `Outcome` (`run_analytic`, `run_substrate_point`, `run_factorial_trial`). A runner
  whose payload hashes differently here raises `CodeMismatch` (the queue gives the trial back).
- `code_identity`: what a worker must share with the define step (stored in the study by
  `sweeps.worker.enqueue`, compared by `sweeps.worker.check_code`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from sandbox.errors import BadInput
from sandbox.results import to_jsonable
from sweeps import ledger
from sweeps.worker import CodeMismatch, Job, Outcome, Runner, WorkerContext


def code_identity() -> dict:
    """What a worker must share with the define step: the package version and a fingerprint of the
    configuration hash scheme (the hashes of the default configurations of every system, so a
    changed field, default or hashing rule changes it)."""
    import sandbox
    from sandbox.analytic import AnalyticConfig
    from sandbox.results import config_hash
    from sandbox.tasks import TaskSpec
    from substrate.cell import CellConfig
    from sweeps.grid import point_key

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
    from sweeps.grid import plan_points

    require_grid = getattr(cfg, "search", "grid") == "grid"
    if not require_grid:
        raise BadInput("--search", cfg.search, "grid with --enqueue-only (the boundary search picks points as results "
                       "arrive, so it cannot be planned ahead)")
    bounds = cfg.bounds()
    jobs = []
    for plan in plan_points(cfg, cfg.grid_points()):
        values, spec, solver, pk = plan.values, plan.spec, plan.solver, plan.key
        dists = {k: FloatDistribution(min(bounds[k][0], v), max(bounds[k][1], v)) for k, v in values.items()}
        for seed in plan.seeds:
            jobs.append(Job(key=ledger.trial_key(pk, seed),
                            payload={"system": "analytic", "task": dataclasses.asdict(spec),
                                     "solver": dataclasses.asdict(solver), "seed": int(seed), "point_key": pk},
                            attrs={**ledger.labels("analytic", values, "evo vs grad"), "point_key": pk,
                                   "seed": int(seed), "axes": {k: float(v) for k, v in values.items()}},
                            params={k: float(v) for k, v in values.items()}, distributions=dists))
    return jobs


def substrate_sweep_jobs(cfg) -> list[Job]:
    """The plan of a substrate map (`sweeps.substrate_map.SubstrateSweepConfig`): one job per
    (point, seed); the payload is the point's full comparison (`RoutingArms`) and the cache of the
    shared base (made absolute, so workers on a shared filesystem reuse it)."""
    from sweeps.substrate_map import arms_payload, point_arms, point_key

    bounds = cfg.bounds()
    jobs = []
    for values in cfg.grid_points():
        pk = point_key(point_arms(cfg, values, cfg.seeds[0]))
        dists = {k: FloatDistribution(min(bounds[k][0], v), max(bounds[k][1], v)) for k, v in values.items()}
        for seed in cfg.seeds:
            jobs.append(Job(key=ledger.trial_key(pk, seed),
                            payload={"system": "substrate", "arms": arms_payload(point_arms(cfg, values, seed)),
                                     "seed": int(seed), "point_key": pk, "cache": os.path.abspath(cfg.cache)},
                            attrs={**ledger.labels("substrate", values, "evo vs grad"), "point_key": pk,
                                   "seed": int(seed), "axes": {k: float(v) for k, v in values.items()}},
                            params={k: float(v) for k, v in values.items()}, distributions=dists))
    return jobs


def factorial_jobs(fcfg, out: str | Path, cache: str | Path) -> list[Job]:
    """The plan of a factorial (`sweeps.factorial.FactorialConfig`): one job per (cell, seed); the
    per-trial folders go under `out` (workers on a shared filesystem resume each other's
    checkpoints there) and the base model cache under `cache`, unless a worker overrides them."""
    from sweeps.factorial import trial_key

    out, cache = os.path.abspath(out), os.path.abspath(cache)
    return [Job(key=trial_key(cell, seed),
                payload={"system": "factorial", "cell": fcfg.trial_config(cell, seed).flat(),
                         "out": out, "cache": cache},
                attrs={"cell": cell, "seed": int(seed), **ledger.labels("factorial", arm=cell)})
            for seed in fcfg.seeds for cell in fcfg.cells]


# ---------------------------------------------------------------------------------------------
# Runners: payload -> result attributes (the worker)
# ---------------------------------------------------------------------------------------------


def run_analytic(job: dict, ctx: WorkerContext) -> Outcome:
    """One (point, seed) of an analytic sweep; refuses a payload whose configuration hashes
    differently here (a worker running another version of the code than the definer)."""
    from sandbox.analytic import AnalyticConfig
    from sandbox.tasks import TaskSpec
    from sweeps.grid import evaluate_point, point_key

    spec, solver = TaskSpec(**job["task"]), AnalyticConfig(**job["solver"])
    if point_key(spec, solver) != job["point_key"]:
        raise CodeMismatch("the point's configuration hashes differently on this worker (another version of "
                           "the code than the define step's); run the same version everywhere")
    [(seed, rows, delta)] = evaluate_point(spec, solver, [int(job["seed"])])
    ok = math.isfinite(delta)
    return Outcome({"rows": rows, "delta": float(delta) if ok else None}, float(delta) if ok else None,
                   TrialState.COMPLETE if ok else TrialState.FAIL)


def run_factorial_trial(job: dict, ctx: WorkerContext) -> Outcome:
    """One (cell, seed) of a factorial: the substrate is prepared once per worker (cached on disk)."""
    from substrate.cell import CellConfig, prepare_substrate, run_cell
    from sweeps.factorial import trial_dir

    cfg = CellConfig.of(**job["cell"])
    out, cache = Path(ctx.out or job["out"]), ctx.cache or job["cache"]
    from sandbox.results import config_hash

    base = config_hash({**cfg.identity(), "cell": None, "seed": None, "cache": str(cache)})
    sub = ctx.substrates.get(base)
    if sub is None:
        sub = ctx.substrates[base] = prepare_substrate(cfg, cache, ctx.log)
    res = run_cell(cfg, trial_dir(out, cfg.cell, cfg.seed), cache, substrate=sub, log=ctx.log)
    metrics = to_jsonable(res.metrics)
    v = metrics.get("balanced_log_ppl")
    return Outcome({"result": metrics}, float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf)


def run_substrate_point(job: dict, ctx: WorkerContext) -> Outcome:
    """One (point, seed) of a substrate map: the base is prepared once per worker (cached on disk);
    refuses a payload that hashes differently here (another version of the code)."""
    from sandbox.evolution import EvolutionConfig
    from substrate.cell import CellConfig, prepare_substrate
    from substrate.routing import RoutingArms, run_arms
    from sweeps.substrate_map import point_key, seed_rows

    d = job["arms"]
    rc = RoutingArms(cell=CellConfig.of(**d["cell"]), evolution=EvolutionConfig(**d["evolution"]),
                     **{k: v for k, v in d.items() if k not in ("cell", "evolution")})
    if point_key(rc) != job["point_key"]:
        raise CodeMismatch("the point's configuration hashes differently on this worker (another version of "
                           "the code than the define step's); run the same version everywhere")
    cache = ctx.cache or job["cache"]
    from sandbox.results import config_hash

    base = config_hash({**rc.cell.identity(), "cell": None, "seed": None, "alignment": None, "cache": str(cache)})
    sub = ctx.substrates.get(base)
    if sub is None:
        sub = ctx.substrates[base] = prepare_substrate(rc.cell, cache, ctx.log)
    rows = seed_rows(run_arms(rc, sub))
    by = {r["arm"]: r["log_loss"] for r in rows}
    delta = by["grad"] - by["evo"]
    ok = math.isfinite(delta)
    return Outcome({"rows": rows, "delta": float(delta) if ok else None}, float(delta) if ok else None,
                   TrialState.COMPLETE if ok else TrialState.FAIL)


#: system name -> runner: the registry the app hands to `sweeps.worker.run_worker`. A new system adds its
#: plan builder here and one entry.
SYSTEMS: dict[str, Runner] = {
    "analytic": run_analytic,
    "factorial": run_factorial_trial,
    "substrate": run_substrate_point,
}
