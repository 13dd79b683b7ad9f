"""Many machines, every trial exactly once: a study's plan of WAITING trials and the workers that run it.

The define step (``sandbox sweep|factorial --enqueue-only --storage postgresql://...``) writes every
planned trial (grid point or cell, and seed) into the study as a WAITING Optuna trial (`enqueue`).
Any number of ``sandbox worker`` processes, on any machines, then claim waiting trials one at a
time, run them and record them (`run_worker`) until none is left. Re-running the defining command
without ``--enqueue-only`` collects: every trial is in the ledger, so it computes nothing.

The plan:

- A planned trial carries the user attribute ``job`` (`Job.payload`): ``{"system": NAME, ...}``,
  everything a worker needs to rebuild the trial's configuration (for the analytic sandbox the
  point's full `TaskSpec` and `AnalyticConfig` and the seed; for the factorial the trial's
  `CellConfig`, the run folder and the cache). `SYSTEMS` maps a system name to the function that
  runs such a payload; a new system (e.g. substrate sweeps) plugs in by adding one entry. It also
  carries ``key`` and the attributes the collecting code reads (sweeps: ``point_key``, ``seed``,
  ``axes``; factorial: ``cell``, ``seed``), and ``attempt`` (1 for the first run).
- A finished trial carries what the single-process code writes for the same key, so
  `sweeps.ledger.finished` (sweeps) and `sweeps.ledger.TrialLedger` (factorial) read it unchanged:
  sweeps ``rows`` and ``delta`` (COMPLETE; FAIL with rows for a diverged pair), the factorial
  ``result`` (COMPLETE, value = balanced log-PPL or +inf).
- Enqueueing holds a PostgreSQL advisory transaction lock on the study (`plan_lock`), so running the
  define step twice, or on two machines at once, adds every key once: a key is added only when the
  study holds no result and no waiting or running trial for it. (Optuna's
  ``enqueue_trial(skip_if_exists=True)`` checks and writes without a lock.)

Claims: a worker lists waiting trials (`claim`) and moves one to RUNNING with Optuna's
``set_trial_state_values``, which on an RDB storage re-reads the row under ``SELECT ... FOR UPDATE``
and refuses unless it is still WAITING, so two workers never run the same trial. A worker never
calls ``study.ask()`` (which creates a new trial when none is waiting): it runs planned trials only.

Faults:

- heartbeats: the claimer writes the trial's heartbeat (Optuna's ``trial_heartbeats`` table, database
  clock) just before claiming and then every ``heartbeat_s`` from a thread. A RUNNING planned trial
  whose heartbeat is older than ``grace_s`` belongs to a dead worker (kill -9, lost machine): any
  worker marks it FAIL (the row-locked state change succeeds for one worker only) and enqueues a
  copy (``reason = "lost"``), which the next free worker runs. A worker that was only slow, not
  dead, finds its trial finished when it reports and drops its result (counted as ``dropped``).
  A trial is re-queued as lost at most `MAX_LOST` times (a trial that kills every worker stops).
- a trial that raises is recorded FAIL with ``error`` (exception type and first line) and without
  rows or result, so no table ever averages it in; a copy is enqueued while its ``attempt`` is at
  most ``retries`` (so it runs at most ``retries + 1`` times). A key whose last attempt failed is
  re-queued by the next define step.
- the database goes away (restart, failover, network): every storage step of a worker goes through
  `Patience`, which retries connection errors with capped exponential backoff for ``wait_s`` (the
  worker's ``--db-wait``, default 300 s, printed when it starts waiting) and then raises
  `StorageUnavailable` (one line naming the storage and the time waited). Steps are safe to repeat
  (a retried write recognises its own earlier commit; a re-queue re-checks the key under
  `plan_lock`); the heartbeat thread keeps beating on its own and reports outages it sees to the same
  `Patience`. Heartbeat ages count from the later of the beat and the server's start
  (``pg_postmaster_start_time``), and a worker that saw an outage declares nobody lost for
  ``grace_s`` after it: every worker's heartbeat stopped during the outage, not only the dead ones'.
  A result computed during an outage is written after reconnecting; past ``--db-wait`` the trial
  stays running without heartbeats and is re-run by another worker after the grace period.
- every re-queue (lost, failed) holds `plan_lock` and adds a copy only when the key has no result
  and no waiting or running trial, so a define step running at the same moment never duplicates a
  key. Copies are claimed first (`_waiting_ids`).
- giving back (`give_back`: the trial returns to WAITING in its place, same attempt, no copy) for a
  trial this worker must not run now: Ctrl-C or SIGTERM (e.g. a SLURM time limit; counted
  ``interrupted``), a factorial trial whose run folder a stalled (live, not dead) worker still locks
  (`FolderBusy`, counted ``busy``: the key waits for the folder, retried every ``grace_s / 2``,
  instead of spending its retries and ending with no result), or other code (`CodeMismatch`).

Code versions: the define step stores `code_identity` (the configuration hash scheme and the package
version) as the study attribute ``code``; a worker whose identity differs exits 2 with one line
before claiming (`check_code`), and a trial whose payload hashes differently here (`CodeMismatch`),
or names a system this code does not know, is given back and stops the worker (exit 2).

Storage: PostgreSQL only (`database`). SQLite and the journal file are refused for workers: they
have no row locks across machines (the journal's lock is a local ``flock``) and no heartbeats, so a
killed worker's trial could never be re-run; a single process runs them without workers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import optuna
from optuna.distributions import FloatDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState, create_trial

from sandbox.errors import BadInput
from sandbox.results import FolderBusy, to_jsonable
from sweeps import ledger
from sweeps.ledger import _key_states, is_database
from sweeps.ledger import safe_url as _safe_url

#: A trial re-queued as lost (its worker died) this many times is given up: it kills its workers.
MAX_LOST = 10
#: Candidate waiting trials listed per claim attempt.
CLAIM_BATCH = 16

_DB_ALLOWED = ("a postgresql:// URL of a reachable server (workers claim trials under the database's "
               "row locks and keep heartbeats in it)")


# ---------------------------------------------------------------------------------------------
# Storage
# ---------------------------------------------------------------------------------------------


class StorageUnavailable(BadInput):
    """The database stayed unreachable for the worker's whole ``--db-wait``: one line, exit 2."""

    def __init__(self, storage: str, waited_s: float, error: str):
        super().__init__("--storage", storage, f"a reachable database (unreachable for {waited_s:.0f} s, "
                         f"the --db-wait limit; last error: {error})")


def transient(e: BaseException) -> bool:
    """True for a lost or refused database connection (a restart, a failover, the network), as
    SQLAlchemy or Optuna (``StorageInternalError`` wrapping it) raise it; False for anything else."""
    import sqlalchemy.exc as sx
    from optuna.exceptions import StorageInternalError

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (sx.OperationalError, sx.InterfaceError, sx.DisconnectionError, sx.PendingRollbackError)):
            return True
        if isinstance(e, sx.DBAPIError) and getattr(e, "connection_invalidated", False):
            return True
        if not isinstance(e, (StorageInternalError, sx.SQLAlchemyError)):
            return False
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class Patience:
    """Retry storage steps through database outages: capped exponential backoff (`first_s`,
    doubling up to `cap_s`) for at most `wait_s` per step, then `StorageUnavailable`.

    Counts what it did: `reconnects` (outages ridden out, whether a storage step or the heartbeat
    thread saw them) and `waited_s` (seconds the database was unreachable); `quiet_until` is the
    monotonic time before which this worker declares nobody lost (every worker's heartbeat stopped
    during the outage, not only the dead ones'). Thread-safe: the heartbeat thread reports too.
    """

    def __init__(self, storage: str, wait_s: float = 300.0, first_s: float = 0.25, cap_s: float = 8.0,
                 log: Callable[[str], None] | None = None, grace_s: float = 0.0):
        self.storage, self.wait_s, self.first_s, self.cap_s, self.log = storage, wait_s, first_s, cap_s, log
        self.grace_s = grace_s
        self.reconnects, self.waited_s, self.quiet_until = 0, 0.0, 0.0
        self._down_since: float | None = None
        self._lock = threading.Lock()

    def down(self, e: BaseException) -> None:
        """The database is unreachable (the first report of an outage prints one line)."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        if self.log:
            self.log(f"worker: database {_safe_url(self.storage)} unreachable ({_first_line(e, 100)}); "
                     f"retrying for up to {self.wait_s:g} s (--db-wait)")

    def back(self) -> None:
        """The database answered again: count the outage, keep quiet for the grace period."""
        with self._lock:
            if self._down_since is None:
                return
            now = time.monotonic()
            waited, self._down_since = now - self._down_since, None
            self.reconnects += 1
            self.waited_s += waited
            self.quiet_until = now + self.grace_s
        if self.log:
            self.log(f"worker: database back after {waited:.1f} s")

    def __call__(self, fn: Callable, *args, **kwargs):
        t0, delay = None, self.first_s
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as e:
                if not transient(e):
                    raise
                self.down(e)
                now = time.monotonic()
                t0 = now if t0 is None else t0
                if now - t0 >= self.wait_s:
                    with self._lock:
                        if self._down_since is not None:
                            self.waited_s += now - self._down_since
                            self._down_since = None
                    raise StorageUnavailable(_safe_url(self.storage), now - t0, _first_line(e, 120)) from None
                time.sleep(max(0.01, min(delay, self.wait_s - (now - t0))))
                delay = min(delay * 2, self.cap_s)
                continue
            self.back()
            return out


def database(storage: str | None, flag: str = "--storage"):
    """An `RDBStorage` on the PostgreSQL URL `storage`; anything else is a one-line `BadInput`.

    SQLite and the journal file are refused: a journal's lock is a local ``flock`` and SQLite's a
    file lock, neither works across machines, and neither keeps heartbeats, so a killed worker's
    trial could never be re-run. Several workers on one machine also need a (local) PostgreSQL
    server; one process with the journal needs no worker at all (plain ``sandbox sweep``).
    """
    s = str(storage) if storage is not None else ""
    if not s:
        raise BadInput(flag, s, _DB_ALLOWED)
    if not is_database(s):
        kind = ("a SQLite file" if s.startswith("sqlite") else "a journal file" if "://" not in s
                else f"a {s.split('://', 1)[0]} URL")
        raise BadInput(flag, s, f"a postgresql:// URL, not {kind}: workers on one or several machines claim trials "
                       "under PostgreSQL row locks and heartbeats (start a server as in the README); without "
                       "workers, run the sweep/factorial command itself on the journal or SQLite")
    return ledger.journal_or_url(s, flag)


@contextmanager
def plan_lock(store, study_name: str):
    """Hold PostgreSQL's advisory transaction lock of `study_name` (one definer/requeuer at a time).

    The lock lives in a transaction on its own connection and is released when the block ends, and
    by the server if this process dies (its connection closes)."""
    from sqlalchemy import text

    k = int.from_bytes(hashlib.sha256(f"molora-plan:{study_name}".encode()).digest()[:8], "big", signed=True)
    with store.engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": k})
        yield


def _study_id(store, name: str, flag: str = "--study") -> int:
    try:
        return store.get_study_id_from_name(name)
    except KeyError:
        names = sorted(s.study_name for s in store.get_all_studies())
        raise BadInput(flag, name, "a study defined on this --storage with `sandbox sweep|factorial --enqueue-only` "
                       f"(it holds: {', '.join(names[:8]) or 'none'}{', ...' if len(names) > 8 else ''})") from None


# ---------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One planned trial: its ledger key, what a worker needs (`payload`, stored as ``job``), the
    user attributes the collecting code reads (`attrs`) and Optuna params (sweep axes)."""

    key: str
    payload: dict
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)
    distributions: dict = field(default_factory=dict)


@dataclass(frozen=True)
class PlanCounts:
    """What one define step found and did (printed, and stored as the study attribute ``plan``)."""

    planned: int
    """Trials in this plan (points or cells x seeds)."""
    enqueued: int
    """Added as waiting trials now (new keys plus `requeued`)."""
    requeued: int
    """Keys whose last attempt had failed, queued again."""
    finished: int
    """Keys already holding a result (from workers or a single-process run)."""
    pending: int
    """Keys already waiting or running (queued by an earlier define step)."""


class CodeMismatch(RuntimeError):
    """A trial's payload hashes differently on this worker: another version of the code."""


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


def check_code(study: optuna.Study, study_name: str) -> None:
    """Refuse (one line, exit 2) to work on a plan defined by other code; plans from before the
    check (no ``code`` attribute) are accepted."""
    want, have = study.user_attrs.get("code"), code_identity()
    if want is not None and want != have:
        diff = ", ".join(f"{k} {want.get(k)!r} there, {have.get(k)!r} here" for k in sorted(set(want) | set(have))
                         if want.get(k) != have.get(k))
        raise BadInput("--study", study_name, f"a plan defined by this version of the code ({diff}); run the "
                       "define step's version on every worker")


def _waiting_trial(job_attrs: dict, params: dict, distributions: dict):
    return create_trial(state=TrialState.WAITING, params=params, distributions=distributions, user_attrs=job_attrs)


def enqueue(store, study_name: str, jobs: Sequence[Job], direction: str = "maximize",
            progress: Callable[[int, int], None] | None = None, argv: list[str] | None = None) -> PlanCounts:
    """Write every job not yet finished, waiting or running as a WAITING trial, under `plan_lock`.

    Idempotent: a second call (or a concurrent one on another machine) adds nothing. A key whose
    planned trials all failed is queued again (attempt 1)."""
    study = ledger.open_study(store, study_name, direction=direction)
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("duplicate keys in a plan")
    with plan_lock(store, study_name):
        done, pending, failed, _ = _key_states(study)
        todo = [j for j in jobs if j.key not in done and j.key not in pending]
        requeued = sum(j.key in failed for j in todo)
        for i, j in enumerate(todo):
            attrs = {**to_jsonable(j.attrs), "key": j.key, "job": to_jsonable(j.payload), "attempt": 1}
            study.add_trial(_waiting_trial(attrs, j.params, j.distributions))
            if progress:
                progress(i + 1, len(todo))
        counts = PlanCounts(planned=len(jobs), enqueued=len(todo), requeued=requeued,
                            finished=sum(k in done for k in keys), pending=sum(k in pending for k in keys))
        study.set_user_attr("plan", {**dataclasses.asdict(counts), "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                                     "host": socket.gethostname(),
                                     "argv": None if argv is None else [_safe_url(a) for a in argv]})
        study.set_user_attr("code", code_identity())
    return counts


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
# Systems: payload -> result attributes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a system returns for one trial: user attributes to add, the value and the final state."""

    attrs: dict
    value: float | None
    state: TrialState = TrialState.COMPLETE


@dataclass(frozen=True)
class WorkerContext:
    """Per-worker state shared by a system's trials (overrides and caches)."""

    out: str | None = None
    cache: str | None = None
    log: Callable[[str], None] | None = None
    substrates: dict = field(default_factory=dict)


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


#: system name -> runner. A new system adds its plan builder and one entry.
SYSTEMS: dict[str, Callable[[dict, WorkerContext], Outcome]] = {
    "analytic": run_analytic,
    "factorial": run_factorial_trial,
    "substrate": run_substrate_point,
}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerCounts:
    """What one worker did (printed, and stored as the study attribute ``worker:<host>:<pid>:<start>``)."""

    claimed: int = 0
    """Waiting trials this worker claimed."""
    completed: int = 0
    """Claimed trials recorded with a result (a diverged sweep pair included)."""
    failed: int = 0
    """Claimed trials that raised (recorded FAIL with their error)."""
    retried: int = 0
    """Of those, queued again (attempt <= --retries)."""
    gave_up: int = 0
    """Of those, not queued again (retries spent)."""
    requeued_lost: int = 0
    """Other workers' trials found without a heartbeat for --grace and queued again."""
    dropped: int = 0
    """Own results dropped because the trial had been declared lost meanwhile."""
    interrupted: int = 0
    """Own trials given back on Ctrl-C / SIGTERM."""
    given_back: int = 0
    """Own trials given back without counting an attempt (interrupted, busy folder, code mismatch)."""
    busy: int = 0
    """Of those, factorial trials whose folder another (stalled) worker still held."""
    reconnects: int = 0
    """Database outages ridden out (`Patience`)."""
    waited_s: float = 0.0
    """Seconds spent waiting for the database."""
    wall_s: float = 0.0


class Heartbeat:
    """A thread writing trial `trial_id`'s heartbeat every `every` seconds until `stop`. A failed
    beat (the database away) is tried again at the next one; the first beat that succeeds after a
    failure tells `patience` (`Patience.back`), so this worker declares nobody lost for a grace
    period even when its main thread never noticed the outage."""

    def __init__(self, store, trial_id: int, every: float, patience: "Patience | None" = None):
        self._store, self._id, self._every, self._patience = store, trial_id, every, patience
        self.failed_beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{trial_id}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        failing = False
        while not self._stop.wait(self._every):
            try:
                self._store.record_heartbeat(self._id)
            except Exception:   # a transient database error: the next beat tries again
                self.failed_beats += 1
                failing = True
                continue
            if failing and self._patience is not None:
                self._patience.back()
            failing = False

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _models():
    from optuna.storages._rdb import models

    return models


def _waiting_ids(store, study_id: int, limit: int, skip=()) -> list[int]:
    """Waiting trials in claim order: copies of lost or failed trials first (attribute
    ``requeue_of``: they have waited longest, and the plan's tail is not held up by them), then by
    trial number (the plan's order; a trial given back keeps its place)."""
    m = _models()
    ua = m.TrialUserAttributeModel
    session = store.scoped_session()
    try:
        q = (session.query(m.TrialModel.trial_id)
             .outerjoin(ua, (ua.trial_id == m.TrialModel.trial_id) & (ua.key == "requeue_of"))
             .filter(m.TrialModel.study_id == study_id, m.TrialModel.state == TrialState.WAITING))
        if skip:
            q = q.filter(m.TrialModel.trial_id.notin_(list(skip)))
        rows = q.order_by(ua.trial_user_attribute_id.is_(None), m.TrialModel.number).limit(limit).all()
        session.commit()
    finally:
        session.close()
    return [r[0] for r in rows]


def claim(store, study_id: int, skip=()) -> int | None:
    """Move one planned WAITING trial of the study to RUNNING (heartbeat written first); its trial
    id, or None when no planned trial is waiting (trial ids in `skip` are left alone). Safe under
    any number of concurrent claimers."""
    while True:
        ids = _waiting_ids(store, study_id, CLAIM_BATCH, skip)
        if not ids:
            return None
        for tid in ids:
            try:
                if "job" not in store.get_trial(tid).user_attrs:
                    continue   # not a planned trial (someone's enqueue_trial): never ours to run
                store.record_heartbeat(tid)
                if store.set_trial_state_values(tid, state=TrialState.RUNNING):
                    return tid
            except UpdateFinishedTrialError:
                continue
        if all("job" not in store.get_trial(t).user_attrs for t in ids):
            return None


def running_planned(store, study_id: int) -> list[tuple[int, object]]:
    """``(trial_id, heartbeat age in seconds)`` of RUNNING trials with a heartbeat (planned trials:
    a single-process factorial's RUNNING trials have none and are never touched).

    The age counts from the later of the last heartbeat and the server's start
    (``pg_postmaster_start_time``): after a database restart nobody could beat while it was down,
    so every worker gets a full grace period of a running server before it counts as dead."""
    from sqlalchemy import text

    m = _models()
    session = store.scoped_session()
    try:
        now, up = session.execute(text("SELECT now(), pg_postmaster_start_time()")).one()
        now, up = now.replace(tzinfo=None), up.replace(tzinfo=None)
        rows = (session.query(m.TrialModel.trial_id, m.TrialHeartbeatModel.heartbeat)
                .join(m.TrialHeartbeatModel, m.TrialHeartbeatModel.trial_id == m.TrialModel.trial_id)
                .filter(m.TrialModel.study_id == study_id, m.TrialModel.state == TrialState.RUNNING).all())
        session.commit()
    finally:
        session.close()
    return [(tid, (now - max(hb, up)).total_seconds()) for tid, hb in rows]


def count_waiting(store, study_id: int) -> int:
    m = _models()
    session = store.scoped_session()
    try:
        n = (session.query(m.TrialModel.trial_id)
             .filter(m.TrialModel.study_id == study_id, m.TrialModel.state == TrialState.WAITING).count())
        session.commit()
    finally:
        session.close()
    return n


def _add_copy(study: optuna.Study, old, reason: str, attempt: int, lost: int) -> bool:
    """Queue a copy of trial `old` unless its key already holds a result or a waiting or running
    trial (a define step or another worker queued it). The caller holds `plan_lock`."""
    attrs = {k: v for k, v in old.user_attrs.items()
             if k not in ("rows", "delta", "result", "error", "worker", "declared", "given_back")}
    attrs.update(attempt=attempt, lost=lost, requeue_of=old.number, reason=reason)
    done, pending, _, _ = _key_states(study)
    if attrs.get("key") in done or attrs.get("key") in pending:
        return False
    study.add_trial(_waiting_trial(attrs, old.params, old.distributions))
    return True


def _requeue(store, study: optuna.Study, old, reason: str, attempt: int, lost: int) -> bool:
    """`_add_copy` under `plan_lock`: idempotent, so a step retried after a database outage, or
    racing a define step, never duplicates a key."""
    with plan_lock(store, study.study_name):
        return _add_copy(study, old, reason, attempt, lost)


def _fail_and_requeue(store, study: optuna.Study, tid: int, reason: str, count_attempt: bool) -> bool:
    """Mark RUNNING trial `tid` FAIL and queue a copy, all under `plan_lock`; False if it had
    finished meanwhile (or is over `MAX_LOST`). Only one caller can win the row-locked state change;
    a call retried after an outage finds its own FAIL (``declared`` = `reason`) and goes on."""
    with plan_lock(store, study.study_name):
        old = store.get_trial(tid)
        try:   # marked first: a slow worker's rows written meanwhile never count on a FAIL trial
            if old.state == TrialState.RUNNING:
                store.set_trial_user_attr(tid, "declared", reason)
                store.set_trial_state_values(tid, state=TrialState.FAIL)
            elif old.state != TrialState.FAIL or old.user_attrs.get("declared") != reason:
                return False   # finished by its worker meanwhile
        except UpdateFinishedTrialError:
            return False
        lost = int(old.user_attrs.get("lost", 0)) + (reason == "lost")
        if lost > MAX_LOST:
            return False
        return _add_copy(study, old, reason, int(old.user_attrs.get("attempt", 1)) + count_attempt, lost)


def give_back(store, tid: int) -> bool:
    """Return this worker's RUNNING trial `tid` to WAITING (same trial, same attempt, same place in
    the queue): for a trial it must not run now (interrupted, folder busy, other code). False when
    it had been declared lost meanwhile (its copy is already queued)."""
    try:
        n = int(store.get_trial(tid).user_attrs.get("given_back", 0))
        store.set_trial_user_attr(tid, "given_back", n + 1)
        return bool(store.set_trial_state_values(tid, state=TrialState.WAITING))
    except UpdateFinishedTrialError:
        return False


def requeue_lost(store, study: optuna.Study, study_id: int, grace_s: float) -> int:
    """FAIL and queue again every planned RUNNING trial whose heartbeat is older than `grace_s`."""
    n = 0
    for tid, age in running_planned(store, study_id):
        if age > grace_s and "job" in store.get_trial(tid).user_attrs:
            n += _fail_and_requeue(store, study, tid, "lost", count_attempt=False)
    return n


def _first_line(e: BaseException, n: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:n]}" if text else type(e).__name__


def _record_failure(store, tid: int, error: str) -> bool:
    """Mark our trial FAIL with `error`; False when it had been declared lost meanwhile. Retried
    after an outage, it recognises its own earlier write."""
    try:
        store.set_trial_user_attr(tid, "error", error)
        store.set_trial_state_values(tid, state=TrialState.FAIL)
        return True
    except UpdateFinishedTrialError:
        t = store.get_trial(tid)
        return t.state == TrialState.FAIL and "declared" not in t.user_attrs and t.user_attrs.get("error") == error


def _record_result(store, tid: int, outcome: Outcome) -> bool:
    """Write our trial's result; False when it had been declared lost meanwhile (its copy counts).
    Retried after an outage, it recognises its own earlier write."""
    try:
        for k, v in to_jsonable(outcome.attrs).items():
            store.set_trial_user_attr(tid, k, v)
        store.set_trial_state_values(tid, state=outcome.state,
                                     values=None if outcome.value is None else [outcome.value])
        return True
    except UpdateFinishedTrialError:
        t = store.get_trial(tid)
        return t.state == outcome.state and "declared" not in t.user_attrs


def _storage_name(store) -> str:
    return _safe_url(getattr(store, "url", None) or "the database")


def run_worker(store, study_name: str, *, retries: int = 2, heartbeat_s: float = 10.0, grace_s: float = 60.0,
               max_trials: int | None = None, ctx: WorkerContext | None = None,
               progress: Callable[[int, int, int, str], None] | None = None,
               systems: dict | None = None, db_wait_s: float = 300.0) -> WorkerCounts:
    """Claim, run and record planned trials of `study_name` until none is waiting or running.

    While other workers' trials run and nothing waits, this worker polls (every ``min(heartbeat_s,
    grace_s / 2)``) so that a trial whose worker died is re-run here after `grace_s`. `max_trials`
    stops after that many claims. `progress(finished_in_plan, total_in_plan, claimed_by_me,
    description)` is called after every state change seen. Every storage step rides out database
    outages of up to `db_wait_s` seconds (`Patience`; then `StorageUnavailable`). Refuses (`BadInput`)
    a plan defined by other code before claiming anything (`check_code`). Counts are stored in the
    study (also when it stops on an error).
    """
    systems = systems or SYSTEMS
    ctx = ctx or WorkerContext()
    p = Patience(_storage_name(store), wait_s=db_wait_s, log=ctx.log, grace_s=grace_s,
                 first_s=min(0.25, max(0.01, db_wait_s / 8)))
    study_id = p(_study_id, store, study_name)
    study = p(optuna.load_study, study_name=study_name, storage=store)
    p(check_code, study, study_name)
    t0 = time.perf_counter()
    c = dict(claimed=0, completed=0, failed=0, retried=0, gave_up=0, requeued_lost=0, dropped=0, interrupted=0,
             given_back=0, busy=0)
    worker_id = f"{socket.gethostname()}:{os.getpid()}:{time.strftime('%Y%m%dT%H%M%S')}"
    poll = max(0.2, min(heartbeat_s, grace_s / 2))
    start_left = None
    skip: dict[int, float] = {}   # trials given back because their folder was busy -> retry after

    def report(desc: str) -> None:
        nonlocal start_left
        if progress is None:
            return
        left = p(count_waiting, store, study_id) + len(p(running_planned, store, study_id))
        start_left = left if start_left is None else max(start_left, left + c["claimed"])
        progress(start_left - left, start_left, c["claimed"], desc)

    def store_counts() -> WorkerCounts:
        counts = WorkerCounts(**c, reconnects=p.reconnects, waited_s=round(p.waited_s, 3),
                              wall_s=round(time.perf_counter() - t0, 3))
        try:
            study.set_user_attr(f"worker:{worker_id}", dataclasses.asdict(counts))
        except Exception:   # the database is away (StorageUnavailable): the counts are printed only
            pass
        return counts

    try:
        report("starting")
        while max_trials is None or c["claimed"] < max_trials:
            now = time.monotonic()
            for t in [t for t, until in skip.items() if until <= now]:
                del skip[t]
            if now >= p.quiet_until:
                c["requeued_lost"] += p(requeue_lost, store, study, study_id, grace_s)
            tid = p(claim, store, study_id, tuple(skip))
            if tid is None:
                if not p(running_planned, store, study_id) and not p(count_waiting, store, study_id):
                    break
                report("waiting for trials in busy folders" if skip else "waiting for running trials")
                time.sleep(poll)
                continue
            c["claimed"] += 1
            frozen = p(store.get_trial, tid)
            job = frozen.user_attrs["job"]
            attempt = int(frozen.user_attrs.get("attempt", 1))
            desc = f"{frozen.user_attrs.get('key')} (attempt {attempt})"
            report(desc)
            p(store.set_trial_user_attr, tid, "worker", worker_id)
            beat = Heartbeat(store, tid, heartbeat_s, p)
            try:
                run = systems.get(job.get("system"))
                if run is None:
                    raise CodeMismatch(f"unknown system {job.get('system')!r} (a newer version defined this plan)")
                outcome = run(job, ctx)
            except CodeMismatch as e:   # other code: give the trial back untouched and stop
                beat.stop()
                c["given_back"] += p(give_back, store, tid)
                raise BadInput("--study", study_name, f"a plan defined by this version of the code (trial "
                               f"{frozen.user_attrs.get('key')}: {e}); it was given back") from None
            except FolderBusy:   # a stalled (live) worker still holds the folder: the key waits for it
                beat.stop()
                back = p(give_back, store, tid)
                c["given_back"] += back
                c["busy"] += back
                skip[tid] = time.monotonic() + max(poll, grace_s / 2)
                report(f"{desc}: folder busy, given back")
                continue
            except Exception as e:
                beat.stop()
                c["failed"] += 1
                if not p(_record_failure, store, tid, _first_line(e)):
                    c["dropped"] += 1
                    continue
                if attempt <= retries:
                    c["retried"] += p(_requeue, store, study, frozen, "error", attempt + 1,
                                      int(frozen.user_attrs.get("lost", 0)))
                else:
                    c["gave_up"] += 1
                report(f"{desc} failed: {_first_line(e, 80)}")
                continue
            except BaseException:   # Ctrl-C / SIGTERM: give the trial back now (briefly patient)
                beat.stop()
                quick = Patience(p.storage, wait_s=min(db_wait_s, 10.0), first_s=0.1)
                try:
                    back = quick(give_back, store, tid)
                    c["interrupted"] += back
                    c["given_back"] += back
                except Exception:   # the database is away: the trial counts as lost after --grace
                    pass
                raise
            beat.stop()
            if p(_record_result, store, tid, outcome):
                c["completed"] += 1
            else:   # declared lost while we were slow: its copy counts
                c["dropped"] += 1
            report(desc)
    except BaseException as e:   # the counts so far travel with the error (the CLI prints them)
        e.worker_counts = store_counts()
        raise
    return store_counts()
