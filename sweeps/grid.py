"""The map driver: one regime map over alignment and at most one more axis, for every system.

A *system* (`MapSystem`) says what a point is and how its seeds are computed; this module does
the rest, once for all of them (`run_map`):

1. plan the points: the grid (`cfg.grid_points()`), or, where the config asks for
   ``search="boundary"``, the points an Optuna sampler proposes (`sweeps.boundary`), then the
   system's plan of each (`MapSystem.plan`: its ledger key and seeds; the analytic system tunes
   grad's setting here);
2. find what the ledger (`sweeps.ledger`) already holds and hand the missing (point, seeds) to
   `MapSystem.evaluate`, which records each trial through `Trials` as soon as it is computed (a
   kill loses at most what was in flight; the same command resumes);
3. collect ``results.csv`` (point x seed x arm, the system's `result_columns`), decompose it into
   ``summary.csv`` (`sandbox.stats.decompose`: delta, delta_restart, room, each with its CI and
   label, Holm over every point), write the system's own tables, the figures
   (`figures.report.build_report`) and ``manifest.json`` (with ``axes``).

The same system object plans the queue's jobs (`map_jobs`: one per (point, seed), its payload from
`MapSystem.payload`) and runs them on a worker (`MapSystem.run_job`, registered in
`sweeps.systems.SYSTEMS`).

Systems: `sweeps.analytic_map.AnalyticMap` (``sandbox sweep``; `run_sweep` below) and
`sweeps.substrate_map.SubstrateMap` (``sandbox sweep --system substrate``;
`sweeps.substrate_map.run_substrate_sweep`). The analytic system's names (`SweepConfig`,
`point_key`, `plan_points`, ...) are re-exported here, where the app and the tests import them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

import pandas as pd

from sweeps import ledger
from sweeps.analytic_map import (ACAR_COLUMNS, AXES, DEFAULT_STUDY, RESULT_COLUMNS, SEARCHES,  # noqa: F401 (re-exported)
                                 SEED_STRIDE, AnalyticMap, Evaluate, PointPlan, SweepConfig, evaluate_point,
                                 own_key, plan_points, point_config, point_key, tune_key, tuning_table)

Progress = Callable[[int, int, dict], None]


class Plan(Protocol):
    """One planned point: axis values, ledger key, evaluation seeds, and the keys results.csv shows."""

    values: dict
    key: str
    seeds: tuple
    row_keys: list[str]


class MapSystem(Protocol):
    """What the driver needs of a system. An instance holds one map's config (`cfg`: `grid_points`,
    `bounds`, `axes`, `seeds`, `eps`, `alpha`) and its run-time settings (device, cache, log)."""

    name: str
    """The ledger's ``system`` label, its `sweeps.ledger.METRICS` entry and a job's ``system``."""
    study: str
    """The default study name."""
    axes_table: dict
    """Axes a map may span besides alignment: name -> (lowest, highest, integer?)."""
    cfg: object

    def plan(self, points: list[dict], study=None) -> list[Plan]:
        """Each point's plan (`study`: the ledger, where a system keeps what planning found)."""

    def evaluate(self, pending: list[tuple[Plan, list[int]]], trials: "Trials") -> None:
        """Compute the missing seeds of each ``(plan, seeds)`` and record them (`Trials.record`)."""

    def result_columns(self) -> list[str]:
        """results.csv columns after point, seed, arm and the axes."""

    def summary_options(self) -> dict:
        """Keyword arguments of `sandbox.stats.decompose` beyond the grouping, eps and alpha."""

    def annotate(self, summary: pd.DataFrame, plans: list) -> pd.DataFrame:
        """summary.csv with the system's own columns."""

    def tables(self, plans: list) -> dict[str, pd.DataFrame]:
        """Further tables of the run folder (name -> table)."""

    def manifest(self) -> dict:
        """Entries of manifest.json beyond the driver's."""

    def finish(self) -> dict:
        """Entries of manifest.json written when the run has finished."""

    def payload(self, plan: Plan, seed: int) -> dict:
        """What a worker needs to rebuild the trial (`map_jobs` adds system, seed and point_key)."""

    @staticmethod
    def run_job(job: dict, ctx) -> object:
        """A worker's run of one payload: a `sweeps.worker.Outcome`."""


class Trials:
    """The ledger as one map run sees it: the finished trials (`done`, key -> user attributes),
    how to record more, and the counts of what this run computed and found."""

    def __init__(self, system: MapSystem, study, done: dict[str, dict], progress: Progress | None = None,
                 total: int = 0):
        self.system, self.study, self.done, self.progress, self.total = system, study, done, progress, total
        self.bounds = system.cfg.bounds()
        self.computed = self.reused = 0

    def missing(self, key: str, seeds: Sequence[int]) -> list[int]:
        """The seeds of `key` the ledger lacks."""
        return [s for s in seeds if ledger.trial_key(key, s) not in self.done]

    def record(self, plan: Plan, recs: list[tuple[int, list[dict], float]], key: str | None = None,
               arm: str = "evo vs grad", metric: str | None = None) -> None:
        """Add ``(seed, rows, delta)`` of `plan` to the ledger (one finished trial each) under
        `key` (default the point's own: those count as computed and move the progress; another
        key is a side row, e.g. a robustness row, labelled by `arm` and `metric`)."""
        key_ = plan.key if key is None else key
        ledger.record(self.study, key_, plan.values, self.bounds, recs,
                      ledger.labels(self.system.name, plan.values, arm, metric))
        for seed, rows, delta in recs:
            self.done[ledger.trial_key(key_, seed)] = {"rows": rows, "delta": delta}
        if key is None:
            self.computed += len(recs)
            if self.progress:
                self.progress(self.computed + self.reused, self.total, plan.values)


def compute(system: MapSystem, trials: Trials, plans: list[Plan]) -> None:
    """Compute and record every seed of `plans` the ledger lacks (`MapSystem.evaluate`)."""
    pending, reused = [], 0
    for plan in plans:
        missing = trials.missing(plan.key, plan.seeds)
        reused += len(plan.seeds) - len(missing)
        if missing:
            pending.append((plan, missing))
    trials.reused += reused
    if trials.progress and reused:
        trials.progress(trials.computed + trials.reused, trials.total, plans[0].values)
    if pending:
        system.evaluate(pending, trials)


@dataclass
class MapOutcome:
    results: pd.DataFrame
    summary: pd.DataFrame
    computed: int          # (point, seed) trials computed by this call
    reused: int            # trials found in the ledger
    figures: list
    plans: list = field(default_factory=list)
    base: dict | None = None
    """The substrate's base check (`sweeps.substrate_map.base_check`) when it ran."""


SweepOutcome = SubstrateOutcome = MapOutcome


def run_map(system: MapSystem, out: Path, storage: str | None = None, study: str | None = None,
            progress: Progress | None = None, figures: bool = True, argv: list[str] | None = None,
            overwrite: bool = False) -> MapOutcome:
    """Run (or resume) `system`'s map into `out` (module docstring). `progress` is called as
    ``progress(done_seeds, total_seeds, point_values)`` as trials finish. A folder holding another
    configuration is refused before anything is computed; `overwrite` empties it first
    (`sandbox.results.open_run_dir`)."""
    from sandbox import stats
    from sandbox.results import RunDir, open_run_dir

    cfg = system.cfg
    out = Path(out)
    open_run_dir(out, "sweep", cfg, overwrite)
    study_name = study or system.study
    store = ledger.storage_for(out, storage)
    st = ledger.open_study(store, study_name, metric=ledger.METRICS[system.name])
    run = RunDir.create(out, command="sweep", config=cfg, seeds=list(cfg.seeds), argv=argv,
                        extra={"axes": cfg.axes, "study": study_name,
                               "storage": ledger.safe_url(storage) if storage else str(out / "trials.journal"),
                               "eps": cfg.eps, "alpha": cfg.alpha, **system.manifest()})
    searched = 0
    if getattr(cfg, "search", "grid") == "boundary":
        from sweeps.boundary import propose_points

        def ensure(done: dict, values: dict) -> int:
            one = Trials(system, st, done)
            compute(system, one, system.plan([values], st))
            return one.computed

        points, searched = propose_points(cfg, store, st, ensure=ensure, axes=system.axes_table,
                                          point_id=lambda v: system.plan([v], st)[0].key)
    else:
        points = cfg.grid_points()
    plans = system.plan(points, st)
    trials = Trials(system, st, ledger.finished(st), progress, sum(len(p.seeds) for p in plans))
    trials.computed, trials.reused = searched, -searched   # the search's trials are found again below
    compute(system, trials, plans)
    results = results_table(system, plans, trials.done)
    run.write_csv("results.csv", results)
    for name, table in system.tables(plans).items():
        run.write_csv(name, table)
    summary = stats.decompose(results, by=["point", *cfg.axes], eps=cfg.eps, alpha=cfg.alpha,
                              **system.summary_options())
    summary = system.annotate(summary, plans)
    run.write_csv("summary.csv", summary)
    figs = []
    if figures:
        try:
            from figures.report import build_report

            figs = list(build_report(out))
        except ImportError as e:  # the figures package is optional for the tables
            figs = [f"figures skipped: {e}"]
    base = system.finish()
    run.finish(computed=trials.computed, reused=trials.reused, points=len(points), **base)
    return MapOutcome(results, summary, trials.computed, trials.reused, figs, plans, base.get("base_check"))


def results_table(system: MapSystem, plans: list[Plan], done: dict[str, dict]) -> pd.DataFrame:
    """results.csv rows (point x seed x arm) of the planned points' seeds found in the ledger."""
    rows = []
    for i, plan in enumerate(plans):
        for key in plan.row_keys:
            for seed in plan.seeds:
                attrs = done.get(ledger.trial_key(key, seed))
                if attrs is None:
                    continue
                for r in attrs["rows"]:
                    rows.append({"point": i, "seed": int(seed), "arm": r["arm"], **plan.values,
                                 **{k: v for k, v in r.items() if k != "arm"}})
    cols = ["point", "seed", "arm", *system.cfg.axes, *system.result_columns()]
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["point", "seed", "arm"], kind="stable").reset_index(drop=True)


def map_jobs(system: MapSystem) -> list:
    """The queue's plan of a grid map (the define step): one `sweeps.worker.Job` per (point, seed),
    whose payload ``{"system", ..., "seed", "point_key"}`` rebuilds the trial on a worker."""
    from optuna.distributions import FloatDistribution

    from sweeps.worker import Job

    bounds = system.cfg.bounds()
    jobs = []
    for plan in system.plan(system.cfg.grid_points()):
        values, pk = plan.values, plan.key
        dists = {k: FloatDistribution(min(bounds[k][0], v), max(bounds[k][1], v)) for k, v in values.items()}
        for seed in plan.seeds:
            jobs.append(Job(key=ledger.trial_key(pk, seed),
                            payload={"system": system.name, **system.payload(plan, seed), "seed": int(seed),
                                     "point_key": pk},
                            attrs={**ledger.labels(system.name, values, "evo vs grad"), "point_key": pk,
                                   "seed": int(seed), "axes": {k: float(v) for k, v in values.items()}},
                            params={k: float(v) for k, v in values.items()}, distributions=dists))
    return jobs


def run_sweep(cfg: SweepConfig, out: Path, storage: str | None = None, study: str | None = None,
              evaluate: Evaluate = evaluate_point, progress: Progress | None = None,
              figures: bool = True, argv: list[str] | None = None, chunk_rows: int = 512,
              device: str | None = None, overwrite: bool = False) -> MapOutcome:
    """Run (or resume) an analytic sweep into `out` (`run_map` with `AnalyticMap`).

    `evaluate` computes a point's missing seeds (injected by tests to count calls; a custom one
    runs point by point); with the default, points that share tensor shapes are solved as
    stacked batches of at most `chunk_rows` rows (0: point by point). `device` (cpu or cuda;
    default cpu) holds the analytic solver's tensors; it is recorded in the manifest, not in the
    trial keys (results on another device differ only by float64 rounding). With tuning on,
    grad's setting is chosen per point first (`plan_points`; ``tuning.csv`` records every
    candidate) and every arm runs at it.
    """
    system = AnalyticMap(cfg, evaluate=None if evaluate is evaluate_point else evaluate, chunk_rows=chunk_rows,
                         device=device)
    return run_map(system, out, storage=storage, study=study, progress=progress, figures=figures, argv=argv,
                   overwrite=overwrite)
