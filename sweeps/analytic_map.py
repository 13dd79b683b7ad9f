"""The analytic sandbox as a map system (`sweeps.grid.MapSystem`): `sandbox sweep`.

A sweep point fixes the alignment and, optionally, one more knob (an *axis*); the rest of the
configuration is the base `TaskSpec` and `AnalyticConfig`. With tuning on, grad's optimiser setting
is chosen per point first (`plan_points`, stacked over the points, its outcomes kept in the
ledger's user attributes) and every arm runs at it. The missing (point, seed) rows of points that
share tensor shapes are solved as stacked batches (`sandbox.analytic.run_points`), each point
recorded as soon as its batch ends; robustness rows (an arm alone at its own tuned setting,
``--tune-robust``) follow in batches of their own.

Tables beyond the driver's: ``tuning.csv`` (every candidate of every point), and summary.csv's
``tune_edge`` / ``tune_score``. results.csv: point x seed x arm (grad, evo, restart, oracle, and
acar with its mode counts when on) with what the search did and the setting each arm ran at.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import pandas as pd

from sandbox.acar import USAGE_COLUMNS
from sandbox.analytic import AnalyticConfig
from sandbox.errors import require
from sandbox.identity import identity, key, never, rules
from sandbox.stats import CONVERGED_FRAC, DEFAULT_ALPHA, DEFAULT_EPS
from sandbox.tasks import TaskSpec
from sandbox.tuning import TuneConfig
from sweeps.points import axes_of, bounds_of, check_payload_key, grid_points, seed_outcome

#: results.csv columns of the acar arm (`sandbox.acar.usage`), present when the arm is on.
ACAR_COLUMNS = USAGE_COLUMNS
#: Axes a sweep can span besides alignment: name -> (lowest, highest, integer?).
AXES: dict[str, tuple[float, float, bool]] = {
    "plasticity": (0.0, 100.0, False),
    "context_noise": (0.0, 10.0, False),
    "overlap": (0.0, 1.0, False),
    "lr": (1e-6, 100.0, False),
    "mutation_scale": (1e-6, 100.0, False),
    "loss_floor": (0.0, 100.0, False),
    "population": (2, 4096, True),
    "interval": (1, 100_000, True),
    "steps": (0, 1_000_000, True),
    "batch": (0, 65_536, True),
    "beta2": (0.0, 0.9999, False),
    "domains": (1, 256, True),
    "slots": (1, 1024, True),
    "dim": (2, 4096, True),
    "rank": (1, 4096, True),
    "true_rank": (1, 4096, True),
    "context_dim": (1, 4096, True),
}
SEARCHES = ("grid", "boundary")
#: Default study name. Trials are keyed by a hash of the point's full configuration, so one study
#: can hold every sweep of a storage without collisions (a finer grid reuses the shared points).
DEFAULT_STUDY = "sweep"
#: With independent seeds, point i's evaluation seeds are ``seed + SEED_STRIDE * i``.
SEED_STRIDE = 100_000


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: base configuration, the grid, the seeds and the statistics settings."""

    task: TaskSpec = field(default_factory=TaskSpec)
    solver: AnalyticConfig = field(default_factory=AnalyticConfig)
    alignment: tuple[float, float] = (0.0, 1.0)
    """Alignment range (lo, hi); lo == hi is a single value."""
    points: int = 11
    """Alignment grid points (ignored for a single value)."""
    axis: str | None = None
    """Second regime axis (a knob name from `AXES`), or None."""
    axis_range: tuple[float, float] | None = None
    """Range (lo, hi) of the second axis."""
    axis_points: int = 5
    """Grid points of the second axis."""
    seeds: tuple[int, ...] = field(default=tuple(range(10)), metadata=rules(never("more seeds grow the same run")))
    eps: float = field(default=DEFAULT_EPS, metadata=rules(never("a statistics setting")))
    """Equivalence margin (nats of log loss) for TOST, fixed before the sweep."""
    alpha: float = field(default=DEFAULT_ALPHA, metadata=rules(never("a statistics setting")))
    """Test level (two-sided; Holm over the sweep's points)."""
    search: str = "grid"
    """grid: every point; boundary: an Optuna sampler proposes points where |mean delta| is small."""
    trials: int = 12
    """Points proposed by the boundary search."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """How grad's optimiser setting is chosen per point (`sandbox.tuning`)."""
    independent_seeds: bool = False
    """Give every point seeds of its own (seed + 100000 x point index) instead of the same seeds at
    every point: the points' deltas are then independent, as Holm's correction over the sweep's
    points assumes for its exact level (with shared seeds it stays valid, only conservative)."""
    converged_frac: float = field(default=CONVERGED_FRAC, metadata=rules(never("a statistics setting")))
    """A point is ``unconverged`` when grad still falls by more than this share of eps over its last half."""

    def __post_init__(self) -> None:
        lo, hi = self.alignment
        require(0.0 <= lo <= hi <= 1.0, "alignment", f"{lo}..{hi}", "LO..HI with 0 <= LO <= HI <= 1")
        require(isinstance(self.points, int) and 1 <= self.points <= 1001, "points", self.points, "an integer in [1, 1001]")
        require(isinstance(self.axis_points, int) and 1 <= self.axis_points <= 1001, "axis_points", self.axis_points,
                "an integer in [1, 1001]")
        if self.axis is not None:
            require(self.axis in AXES, "axis", self.axis, "NAME=LO..HI with NAME one of: " + ", ".join(sorted(AXES)))
            require(self.axis_range is not None, "axis", self.axis, "NAME=LO..HI")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
                "at least one distinct seed")
        require(isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0, "eps", self.eps, "a number > 0")
        require(isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1, "alpha", self.alpha, "a number in (0, 1)")
        require(self.search in SEARCHES, "search", self.search, "grid or boundary")
        require(isinstance(self.trials, int) and 1 <= self.trials <= 10_000, "trials", self.trials, "an integer in [1, 10000]")
        require(not (self.independent_seeds and self.search == "boundary"), "independent_seeds", True,
                "the grid search (the boundary search proposes points one at a time, without an index to "
                "derive their seeds from)")
        require(isinstance(self.converged_frac, (int, float)) and math.isfinite(self.converged_frac)
                and self.converged_frac >= 0, "converged_frac", self.converged_frac, "a number >= 0")
        grid = self.grid_points() if self.search == "grid" else []
        for a in grid:     # every point must be a valid configuration
            spec, solver = point_config(self, a)
            require(not solver.acar or spec.slots >= 3, "slots", spec.slots, "at least 3 with --acar")
        if self.tune.on:
            n = max(len(grid), self.trials if self.search == "boundary" else 1)
            self.tune.check_disjoint([s for i in range(n) for s in self.point_seeds(i)])

    def point_seeds(self, index: int) -> tuple[int, ...]:
        """The evaluation seeds of the point at `index` (the same at every point unless independent)."""
        return tuple(s + SEED_STRIDE * index for s in self.seeds) if self.independent_seeds else self.seeds

    @property
    def axes(self) -> list[str]:
        """Axis columns of the tables: alignment first."""
        return axes_of(self)

    def grid_points(self) -> list[dict[str, float]]:
        """Points in order (alignment-major): ``[{alignment: a, axis: v}, ...]``."""
        return grid_points(self, AXES)

    def bounds(self) -> dict[str, tuple[float, float]]:
        return bounds_of(self)

    def folder_key(self) -> dict:
        """What names the default run folder: everything but seeds and statistics settings (the
        hash is frozen by tests/test_contracts.py), so the same command resumes in the same folder.
        The folder still holds one configuration (`sandbox.results.open_run_dir`): the same command
        with more seeds or another eps finds it and is refused there; a new ``--out`` with the old
        ledger as ``--storage`` reuses its trials."""
        return identity(self)


def point_config(cfg: SweepConfig, values: dict[str, float]) -> tuple[TaskSpec, AnalyticConfig]:
    """The task spec and solver config of one point (the base with the axis values filled in)."""
    task_fields = {f.name for f in dataclasses.fields(TaskSpec)}
    t = {k: v for k, v in values.items() if k in task_fields}
    s = {k: v for k, v in values.items() if k not in task_fields}
    return dataclasses.replace(cfg.task, **t), dataclasses.replace(cfg.solver, **s)


def point_key(spec: TaskSpec, solver: AnalyticConfig) -> str:
    """Hash of a point's full configuration (the ledger's point identity)."""
    return key({"task": spec, "solver": solver}, 16)


def tune_key(spec: TaskSpec, solver: AnalyticConfig, tune: TuneConfig) -> str:
    """The ledger key of one point's tuning outcome (the base config and the tuning settings)."""
    return "tune:" + key({"task": spec, "solver": solver, "tune": tune}, 16)


def own_key(spec: TaskSpec, solver: AnalyticConfig, arm: str) -> str:
    """The ledger key of a robustness row: `arm` alone at its own tuned setting `solver`."""
    return key({"own": arm, "task": spec, "solver": solver}, 16)


@dataclass
class PointPlan:
    """One point as it runs: the solver its arms run at (grad's tuned setting when tuning is on),
    its evaluation seeds, its ledger key and the tuning outcome."""

    values: dict
    spec: TaskSpec
    solver: AnalyticConfig
    seeds: tuple
    key: str
    tuned: object = None          # sandbox.tuning.TuneOutcome, or None with tuning off

    @property
    def row_keys(self) -> list[str]:
        """The ledger keys whose rows results.csv shows: the point's, then its robustness rows
        (``<arm>_own``, each arm alone at its own tuned setting, where tuning ran with ``robust``)."""
        own = self.tuned.own.items() if self.tuned is not None else []
        return [self.key] + [own_key(self.spec, c, arm) for arm, (c, _) in own]


def plan_points(cfg: SweepConfig, points: list[dict[str, float]], study=None,
                device: str | None = None) -> list[PointPlan]:
    """Resolve every point: tune grad's setting where tuning is on (outcomes read from and stored
    in the ledger `study` when given, so a resumed sweep does not tune again; the missing points
    are tuned together in stacked batches), then key the point by the setting it runs at."""
    from sandbox.tuning import TuneOutcome, tune_points

    base = [point_config(cfg, v) for v in points]
    tuned: list = [None] * len(points)
    if cfg.tune.on:
        keys = [tune_key(spec, solver, cfg.tune) for spec, solver in base]
        cached = _tune_records(study) if study is not None else {}
        todo = [i for i, k in enumerate(keys) if k not in cached]
        fresh = tune_points([base[i] for i in todo], cfg.tune, device=device) if todo else []
        for i, out in zip(todo, fresh):
            tuned[i] = out
            if study is not None:
                _record_tune(study, keys[i], out)
        for i, k in enumerate(keys):
            if tuned[i] is None:
                tuned[i] = TuneOutcome.from_record(base[i][1], cached[k])
    plans = []
    for i, values, (spec, solver), t in zip(range(len(points)), points, base, tuned):
        run = t.chosen if t is not None else solver
        plans.append(PointPlan(values, spec, run, cfg.point_seeds(i), point_key(spec, run), t))
    return plans


def _tune_records(study) -> dict[str, dict]:
    """Tuning outcomes stored in the study's user attributes (not as trials: the queue and the
    results count trials, and a tuning outcome is neither a job nor a result)."""
    return {k: v for k, v in study.user_attrs.items() if k.startswith("tune:")}


def _record_tune(study, key: str, out) -> None:
    study.set_user_attr(key, out.record())


Evaluate = Callable[[TaskSpec, AnalyticConfig, Sequence[int]], list[tuple[int, list[dict], float]]]


def evaluate_point(spec: TaskSpec, solver: AnalyticConfig, seeds: Sequence[int],
                   device: str | None = None) -> list[tuple[int, list[dict], float]]:
    """Run every arm for `seeds` as one batch: ``[(seed, rows of the arms, delta), ...]``."""
    from sandbox.analytic import run_arms, run_points

    if device is not None and device != "cpu":
        return _records(run_points([(spec, solver, seeds)], device=device)[0], seeds, solver)
    return _records(run_arms(spec, solver, seeds), seeds, solver)


def _settings(solver: AnalyticConfig) -> dict[str, dict]:
    """The optimiser setting each arm ran at (results.csv's lr, adapter_lr, beta2)."""
    s = {"lr": solver.lr, "adapter_lr": solver.lr * solver.plasticity, "beta2": solver.beta2}
    return {arm: ({**s, "beta2": solver.control_beta2} if arm == "beta2" else s) for arm in solver.arms}


def _records(res: dict, seeds: Sequence[int], solver: AnalyticConfig | None = None,
             rename: dict[str, str] | None = None) -> list[tuple[int, list[dict], float]]:
    """Ledger records of one point's arm results: ``[(seed, rows of the arms, delta), ...]``;
    delta = grad's rel_excess - evo's (the trial's value; an arm's own rel_excess for a
    robustness row, whose arm is renamed by `rename`)."""
    from sandbox.analytic import result_rows

    sets = _settings(solver) if solver is not None else None
    rows = result_rows(res, seeds, settings=sets)
    out = []
    for i, seed in enumerate(seeds):
        mine = [dict(r, arm=(rename or {}).get(r["arm"], r["arm"])) for r in rows if r["seed"] == seed]
        by_arm = {r["arm"]: r for r in mine}
        if "grad" in by_arm and "evo" in by_arm:
            delta = by_arm["grad"]["rel_excess"] - by_arm["evo"]["rel_excess"]
        else:
            delta = mine[0]["rel_excess"]
        out.append((int(seed), [{k: v for k, v in r.items() if k != "seed"} for r in mine], float(delta)))
    return out


#: results.csv columns after the axes (the acar arm's mode counts follow when it is on).
RESULT_COLUMNS = ("final_loss", "log_loss", "rel_excess", "rel_half", "rel_oracle", "initial_excess", "loss_evals",
                  "grad_steps", "diverged", "diverged_step", "generations", "accepted", "rel_gain", "step_size",
                  "lifecycle_events", "lr", "adapter_lr", "beta2", "wall_s")


def tuning_table(plans: list[PointPlan]) -> pd.DataFrame:
    """tuning.csv: one row per point x candidate (lr, adapter_lr, beta2, score, diverged seeds,
    half-budget drop, chosen), plus the robustness choices (``arm`` evo / restart)."""
    rows = []
    for i, plan in enumerate(plans):
        if plan.tuned is None:
            continue
        for r in plan.tuned.table:
            rows.append({"point": i, **plan.values, "arm": "grad", **r, "edge": plan.tuned.edge if r["chosen"] else ""})
        for arm, (c, score) in plan.tuned.own.items():
            rows.append({"point": i, **plan.values, "arm": arm, "lr": c.lr, "adapter_lr": c.lr * c.plasticity,
                         "beta2": c.beta2, "score": score, "chosen": True})
    return pd.DataFrame(rows)


def _with_tuning(summary: pd.DataFrame, plans: list[PointPlan]) -> pd.DataFrame:
    """summary.csv's ``tune_edge`` (where the choice sits at the end of a grid after widening: widen
    it further with --tune-lr / --tune-adapter) and
    ``tune_score`` (grad's score on the tuning seeds), NaN / empty with tuning off."""
    edge = {i: (p.tuned.edge if p.tuned is not None else "") for i, p in enumerate(plans)}
    score = {i: (p.tuned.score if p.tuned is not None else float("nan")) for i, p in enumerate(plans)}
    return summary.assign(tune_edge=summary["point"].map(edge), tune_score=summary["point"].map(score))


class AnalyticMap:
    """The analytic sandbox behind the map driver (`sweeps.grid.MapSystem`).

    `evaluate` computes a point's missing seeds (injected by tests to count calls; a custom one
    runs point by point); with the default, points that share tensor shapes are solved as stacked
    batches of at most `chunk_rows` rows (0: point by point). `device` (cpu or cuda; default cpu)
    holds the solver's tensors: recorded in the manifest, not in the trial keys."""

    name = "analytic"
    study = DEFAULT_STUDY
    axes_table = AXES

    def __init__(self, cfg: SweepConfig, evaluate: Evaluate | None = None, chunk_rows: int = 512,
                 device: str | None = None):
        self.cfg, self.chunk_rows, self.device = cfg, chunk_rows, device
        self.batched = evaluate is None and chunk_rows > 0
        self.evaluate_point = evaluate or functools.partial(evaluate_point, device=device)

    def plan(self, points: list[dict], study=None) -> list[PointPlan]:
        return plan_points(self.cfg, points, study, device=self.device)

    def evaluate(self, pending: list[tuple[PointPlan, list[int]]], trials) -> None:
        """Compute and record the missing seeds of `pending` ``(plan, seeds)``; each point is
        recorded (`trials.record`) as soon as its batch ends, so a kill loses at most the batch in
        flight. Robustness rows (stacked mode only) follow in batches of their own."""
        from sandbox.analytic import run_points

        if not self.batched:
            for plan, missing in pending:
                trials.record(plan, self.evaluate_point(plan.spec, plan.solver, missing))
            return

        def record(indices, results):
            for j, res in zip(indices, results):
                plan, missing = pending[j]
                trials.record(plan, _records(res, missing, plan.solver))

        run_points([(p.spec, p.solver, missing) for p, missing in pending], chunk_rows=self.chunk_rows,
                   on_chunk=record, device=self.device)
        plans = [p for p, _ in pending]
        for arm in sorted({a for p in plans if p.tuned is not None for a in p.tuned.own}):
            own = []
            for plan in plans:
                if plan.tuned is None or arm not in plan.tuned.own:
                    continue
                c = plan.tuned.own[arm][0]
                key = own_key(plan.spec, c, arm)
                missing = trials.missing(key, plan.seeds)
                if missing:
                    own.append((plan, c, key, missing))

            def record_own(indices, results, own=own, arm=arm):
                for j, res in zip(indices, results):
                    plan, c, key, missing = own[j]
                    trials.record(plan, _records(res, missing, c, rename={arm: f"{arm}_own"}), key=key,
                                  arm=f"{arm}_own", metric=f"rel_excess of {arm} at its own tuned setting")

            run_points([(p.spec, c, m) for p, c, _, m in own], arms=(arm,), chunk_rows=self.chunk_rows,
                       on_chunk=record_own, device=self.device)

    def result_columns(self) -> list[str]:
        """results.csv columns after the axes (the acar arm's mode counts when it is on)."""
        return [*RESULT_COLUMNS, *(ACAR_COLUMNS if self.cfg.solver.acar else ())]

    def summary_options(self) -> dict:
        return {"converged_frac": self.cfg.converged_frac}

    def annotate(self, summary: pd.DataFrame, plans: list[PointPlan]) -> pd.DataFrame:
        return _with_tuning(summary, plans)

    def tables(self, plans: list[PointPlan]) -> dict[str, pd.DataFrame]:
        return {"tuning.csv": tuning_table(plans)} if self.cfg.tune.on else {}

    def manifest(self) -> dict:
        return {"stats": {"eps": self.cfg.eps, "alpha": self.cfg.alpha, "converged_frac": self.cfg.converged_frac,
                          "value": "rel_excess"},
                **({"device": str(self.device)} if self.device is not None else {})}

    def finish(self) -> dict:
        return {}

    def payload(self, plan: PointPlan, seed: int) -> dict:
        """What a worker needs to rebuild (point, seed): the point's task spec and solver."""
        return {"task": dataclasses.asdict(plan.spec), "solver": dataclasses.asdict(plan.solver)}

    @staticmethod
    def run_job(job: dict, ctx) -> object:
        """One (point, seed) on a worker (`sweeps.systems.SYSTEMS`); refuses a payload whose
        configuration hashes differently here (a worker running another version of the code)."""
        spec, solver = TaskSpec(**job["task"]), AnalyticConfig(**job["solver"])
        check_payload_key(point_key(spec, solver), job)
        [(seed, rows, delta)] = evaluate_point(spec, solver, [int(job["seed"])])
        return seed_outcome(rows, delta)
