"""Regime sweeps of the analytic sandbox over alignment and at most one more axis.

A sweep point fixes the alignment and, optionally, one more knob (an *axis*); the rest of the
configuration is the base `TaskSpec` and `AnalyticConfig`. For every point the missing seeds are
computed as one batch (`sandbox.analytic.run_arms`, vectorised over seeds and population) and
stored as trials in the ledger (`sweeps.ledger`), so re-running the same command resumes.

Outputs in the run folder: ``results.csv`` (point x seed x arm: grad, evo, restart, oracle, with
what the search did), ``summary.csv`` (`sandbox.stats.decompose`: delta, delta_restart and room,
each with its CI and label, Holm over every point of the sweep), ``manifest.json`` (with
``axes``), the regime curve or heatmap (`figures.report.build_report`) and ``trials.journal``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from sandbox.acar import USAGE_COLUMNS
from sandbox.analytic import AnalyticConfig
from sandbox.errors import require
from sandbox.options import Range
from sandbox.results import config_hash
from sandbox.stats import DEFAULT_EPS
from sandbox.tasks import TaskSpec

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
    seeds: tuple[int, ...] = tuple(range(10))
    eps: float = DEFAULT_EPS
    """Equivalence margin (nats of log loss) for TOST, fixed before the sweep."""
    alpha: float = 0.05
    """Test level (two-sided; Holm over the sweep's points)."""
    search: str = "grid"
    """grid: every point; boundary: an Optuna sampler proposes points where |mean delta| is small."""
    trials: int = 12
    """Points proposed by the boundary search."""

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
        for a in self.grid_points():     # every point must be a valid configuration
            spec, solver = point_config(self, a)
            require(not solver.acar or spec.slots >= 3, "slots", spec.slots, "at least 3 with --acar")

    @property
    def axes(self) -> list[str]:
        """Axis columns of the tables: alignment first."""
        return ["alignment"] + ([self.axis] if self.axis else [])

    def alignment_grid(self) -> np.ndarray:
        return np.round(Range(*self.alignment).grid(self.points), 12)   # 0.30000000000000004 -> 0.3

    def axis_grid(self) -> np.ndarray:
        if self.axis is None:
            return np.array([])
        vals = np.round(Range(*self.axis_range).grid(self.axis_points), 12)
        if AXES[self.axis][2]:
            vals = np.unique(np.round(vals).astype(int))
        return vals

    def grid_points(self) -> list[dict[str, float]]:
        """Points in order (alignment-major): ``[{alignment: a, axis: v}, ...]``."""
        out = []
        for a in self.alignment_grid():
            if self.axis is None:
                out.append({"alignment": float(a)})
            else:
                out.extend({"alignment": float(a), self.axis: _num(self.axis, v)} for v in self.axis_grid())
        return out

    def bounds(self) -> dict[str, tuple[float, float]]:
        b = {"alignment": tuple(self.alignment)}
        if self.axis:
            b[self.axis] = tuple(self.axis_range)
        return b

    def folder_key(self) -> dict:
        """What names the default run folder: everything but seeds and statistics settings, so
        the same command (or the same command with more seeds) resumes in the same folder."""
        d = dataclasses.asdict(self)
        for k in ("seeds", "eps", "alpha"):
            d.pop(k)
        d["solver"] = self.solver.identity()     # the ACAR options only when the acar arm is on
        return d


def _num(axis: str, v: float) -> float | int:
    return int(round(v)) if AXES[axis][2] else float(v)


def point_config(cfg: SweepConfig, values: dict[str, float]) -> tuple[TaskSpec, AnalyticConfig]:
    """The task spec and solver config of one point (the base with the axis values filled in)."""
    task_fields = {f.name for f in dataclasses.fields(TaskSpec)}
    t = {k: v for k, v in values.items() if k in task_fields}
    s = {k: v for k, v in values.items() if k not in task_fields}
    return dataclasses.replace(cfg.task, **t), dataclasses.replace(cfg.solver, **s)


def point_key(spec: TaskSpec, solver: AnalyticConfig) -> str:
    """Hash of a point's full configuration (the ledger's point identity)."""
    return config_hash({"task": spec, "solver": solver.identity()}, n=16)


Evaluate = Callable[[TaskSpec, AnalyticConfig, Sequence[int]], list[tuple[int, list[dict], float]]]


def evaluate_point(spec: TaskSpec, solver: AnalyticConfig, seeds: Sequence[int],
                   device: str | None = None) -> list[tuple[int, list[dict], float]]:
    """Run every arm for `seeds` as one batch: ``[(seed, rows of the arms, delta), ...]``."""
    from sandbox.analytic import run_arms, run_points

    if device is not None and device != "cpu":
        return _records(run_points([(spec, solver, seeds)], device=device)[0], seeds)
    return _records(run_arms(spec, solver, seeds), seeds)


def _records(res: dict, seeds: Sequence[int]) -> list[tuple[int, list[dict], float]]:
    """Ledger records of one point's arm results: ``[(seed, rows of the arms, delta), ...]``."""
    from sandbox.analytic import result_rows

    rows = result_rows(res, seeds)
    out = []
    for i, seed in enumerate(seeds):
        mine = [r for r in rows if r["seed"] == seed]
        by_arm = {r["arm"]: r for r in mine}
        delta = by_arm["grad"]["log_loss"] - by_arm["evo"]["log_loss"]
        out.append((int(seed), [{k: v for k, v in r.items() if k != "seed"} for r in mine], float(delta)))
    return out


def ensure_point(cfg: SweepConfig, study, done: dict[str, dict], values: dict[str, float],
                 evaluate: Evaluate = evaluate_point) -> tuple[int, int]:
    """Compute the seeds of one point missing from the ledger (one batch), record them, update
    `done`. Returns ``(computed, reused)`` seed counts."""
    from sweeps import ledger

    spec, solver = point_config(cfg, values)
    key = point_key(spec, solver)
    missing = [s for s in cfg.seeds if ledger.trial_key(key, s) not in done]
    if missing:
        recs = evaluate(spec, solver, missing)
        ledger.record(study, key, values, cfg.bounds(), recs)
        for seed, rows, delta in recs:
            done[ledger.trial_key(key, seed)] = {"rows": rows, "delta": delta}
    return len(missing), len(cfg.seeds) - len(missing)


@dataclass
class SweepOutcome:
    results: pd.DataFrame
    summary: pd.DataFrame
    computed: int          # (point, seed) trials computed by this call
    reused: int            # trials found in the ledger
    figures: list


def results_table(cfg: SweepConfig, points: list[dict[str, float]], done: dict[str, dict]) -> pd.DataFrame:
    """results.csv rows (point x seed x arm) for the current grid and seeds from the ledger."""
    rows = []
    for i, values in enumerate(points):
        key = point_key(*point_config(cfg, values))
        for seed in cfg.seeds:
            attrs = done.get(f"{key}:{seed}")
            if attrs is None:
                continue
            for r in attrs["rows"]:
                rows.append({"point": i, "seed": int(seed), "arm": r["arm"], **values,
                             **{k: v for k, v in r.items() if k != "arm"}})
    cols = ["point", "seed", "arm", *cfg.axes, "final_loss", "log_loss", "loss_evals", "grad_steps",
            "diverged", "diverged_step", "generations", "accepted", "step_size", "lifecycle_events", "wall_s"]
    if cfg.solver.acar:   # the acar arm's inputs gated with 1 / 2 / 3 slots (NaN on the other arms)
        cols += list(ACAR_COLUMNS)
    df = pd.DataFrame(rows, columns=cols)
    return df.sort_values(["point", "seed", "arm"], kind="stable").reset_index(drop=True)


def _ensure_points_batched(cfg: SweepConfig, study, done: dict[str, dict], points: list[dict[str, float]],
                           chunk_rows: int, progress, start: int, total: int,
                           device: str | None = None) -> tuple[int, int]:
    """`ensure_point` for many points at once: the missing (point, seed) rows of points that share
    tensor shapes are solved as stacked batches of at most `chunk_rows` rows
    (`sandbox.analytic.run_points`); each point is recorded in the ledger as soon as its batch
    ends, so a kill loses at most the batch in flight. Returns ``(computed, reused)``."""
    from sandbox.analytic import run_points
    from sweeps import ledger

    pending, reused = [], 0
    for values in points:
        spec, solver = point_config(cfg, values)
        key = point_key(spec, solver)
        missing = [s for s in cfg.seeds if ledger.trial_key(key, s) not in done]
        reused += len(cfg.seeds) - len(missing)
        if missing:
            pending.append((values, spec, solver, key, missing))
    computed = 0

    def record(indices, results):
        nonlocal computed
        for j, res in zip(indices, results):
            values, _, _, key, missing = pending[j]
            recs = _records(res, missing)
            ledger.record(study, key, values, cfg.bounds(), recs)
            for seed, rows, delta in recs:
                done[ledger.trial_key(key, seed)] = {"rows": rows, "delta": delta}
            computed += len(missing)
            if progress:
                progress(start + reused + computed, total, values)

    if progress and reused:
        progress(start + reused, total, points[0])
    run_points([(spec, solver, missing) for _, spec, solver, _, missing in pending], chunk_rows=chunk_rows,
               on_chunk=record, device=device)
    return computed, reused


def run_sweep(cfg: SweepConfig, out: Path, storage: str | None = None, study: str | None = None,
              evaluate: Evaluate = evaluate_point, progress: Callable[[int, int, dict], None] | None = None,
              figures: bool = True, argv: list[str] | None = None, chunk_rows: int = 512,
              device: str | None = None) -> SweepOutcome:
    """Run (or resume) a sweep into `out`; see the module docstring.

    `evaluate` computes a point's missing seeds (injected by tests to count calls; a custom one
    runs point by point); with the default, points that share tensor shapes are solved as
    stacked batches of at most `chunk_rows` rows (0: point by point). `progress` is called as
    ``progress(done_seeds, total_seeds, point_values)`` as points finish. `device` (cpu or cuda;
    default cpu) holds the analytic solver's tensors; it is recorded in the manifest, not in the
    trial keys (results on another device differ only by float64 rounding).
    """
    from sandbox import stats
    from sandbox.results import RunDir
    from sweeps import ledger

    out = Path(out)
    study_name = study or DEFAULT_STUDY
    store = ledger.storage_for(out, storage)
    st = ledger.open_study(store, study_name)
    run = RunDir.create(out, command="sweep", config=cfg, seeds=list(cfg.seeds), argv=argv,
                        extra={"axes": cfg.axes, "study": study_name,
                               "storage": storage or str(out / "trials.journal"), "eps": cfg.eps, "alpha": cfg.alpha,
                               **({"device": str(device)} if device is not None else {})})
    batched = evaluate is evaluate_point and chunk_rows > 0
    if evaluate is evaluate_point and device is not None:
        evaluate = functools.partial(evaluate_point, device=device)
    if cfg.search == "boundary":
        from sweeps.boundary import propose_points

        points, searched = propose_points(cfg, store, st, evaluate, ensure_point=ensure_point, axes=AXES,
                                          point_id=lambda v: point_key(*point_config(cfg, v)))
    else:
        points, searched = cfg.grid_points(), 0
    done = ledger.finished(st)
    total = len(points) * len(cfg.seeds)
    computed, reused = searched, -searched   # the search's trials are found again below
    if batched:
        c, r = _ensure_points_batched(cfg, st, done, points, chunk_rows, progress, computed + reused, total, device)
        computed, reused = computed + c, reused + r
    else:
        for values in points:
            c, r = ensure_point(cfg, st, done, values, evaluate)
            computed, reused = computed + c, reused + r
            if progress:
                progress(computed + reused, total, values)
    results = results_table(cfg, points, done)
    run.write_csv("results.csv", results)
    summary = stats.decompose(results, by=["point", *cfg.axes], eps=cfg.eps, alpha=cfg.alpha)
    run.write_csv("summary.csv", summary)
    figs = []
    if figures:
        try:
            from figures.report import build_report

            figs = list(build_report(out))
        except ImportError as e:  # the figures package is optional for the tables
            figs = [f"figures skipped: {e}"]
    run.finish(computed=computed, reused=reused, points=len(points))
    return SweepOutcome(results, summary, computed, reused, figs)
