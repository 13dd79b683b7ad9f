"""Many machines, every trial exactly once: a study's plan of WAITING trials and the workers that run it.

This is the generic queue: it knows no system. What a trial runs comes from the registry the caller
hands to `run_worker` (``systems``: name -> runner; the app hands `sweeps.systems.SYSTEMS`), the
plans from the caller's job builders (`sweeps.systems`), and the code identity the plan must match
from the caller (``code``; `sweeps.systems.code_identity`). The database under it (PostgreSQL only,
outages, the plan lock) is `sweeps.queue_db`.

The define step (``sandbox sweep|factorial --enqueue-only --storage postgresql://...``) writes every
planned trial (grid point or cell, and seed) into the study as a WAITING Optuna trial (`enqueue`).
Any number of ``sandbox worker`` processes, on any machines, then claim waiting trials one at a
time, run them and record them (`run_worker`) until none is left. Re-running the defining command
without ``--enqueue-only`` collects: every trial is in the ledger, so it computes nothing.

The plan:

- A planned trial carries the user attribute ``job`` (`Job.payload`): ``{"system": NAME, ...}``,
  everything a worker needs to rebuild the trial's configuration (for the analytic sandbox the
  point's full `TaskSpec` and `AnalyticConfig` and the seed; for the factorial the trial's
  `CellConfig`, the run folder and the cache). The ``systems`` registry maps a system name to the
  runner of such a payload (``runner(payload, WorkerContext) -> Outcome``); a new system plugs in
  by adding a plan builder and one entry to `sweeps.systems.SYSTEMS`. It also carries ``key`` and
  the attributes the collecting code reads (sweeps: ``point_key``, ``seed``, ``axes``; factorial:
  ``cell``, ``seed``), and ``attempt`` (1 for the first run).
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
  `Patience` (`sweeps.queue_db`: retries for ``--db-wait``, then `StorageUnavailable`, one line).
  Steps are safe to repeat (a retried write recognises its own earlier commit; a re-queue re-checks
  the key under `plan_lock`); the heartbeat thread keeps beating on its own and reports outages it
  sees to the same `Patience`. Heartbeat ages count from the later of the beat and the server's start
  (``pg_postmaster_start_time``), and a worker that saw an outage declares nobody lost for
  ``grace_s`` after it: every worker's heartbeat stopped during the outage, not only the dead ones'.
  A result computed during an outage is written after reconnecting; past ``--db-wait`` the trial
  stays running without heartbeats and is re-run by another worker after the grace period.
- every re-queue (lost, failed) holds `plan_lock` and adds a copy only when the key has no result
  and no waiting or running trial, so a define step running at the same moment never duplicates a
  key. Copies are claimed first (`sweeps.queue_trials._waiting_ids`).
- giving back (`give_back`: the trial returns to WAITING in its place, same attempt, no copy) for a
  trial this worker must not run now: Ctrl-C or SIGTERM (e.g. a SLURM time limit; counted
  ``interrupted``), a factorial trial whose run folder a stalled (live, not dead) worker still locks
  (`FolderBusy`, counted ``busy``: the key waits for the folder, retried every ``grace_s / 2``,
  instead of spending its retries and ending with no result), or other code (`CodeMismatch`).

Code versions: the define step stores the code identity it is given (`sweeps.systems.code_identity`:
the configuration hash scheme and the package version) as the study attribute ``code``; a worker
whose identity differs exits 2 with one line before claiming (`check_code`), and a trial whose
payload hashes differently here (`CodeMismatch`), or names a system the registry does not hold, is
given back and stops the worker (exit 2).

Storage: PostgreSQL only (`sweeps.queue_db.database`): SQLite and the journal file are refused for
workers. The storage names and the trial steps (`sweeps.queue_trials`: `claim`, `requeue_lost`,
`give_back`, ...) are re-exported here, where the app and the tests import them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import optuna
from optuna.trial import TrialState

from sandbox.errors import BadInput
from sandbox.results import FolderBusy, to_jsonable
from sweeps import ledger
from sweeps.ledger import _key_states, is_database  # noqa: F401 (the app's import)
from sweeps.ledger import safe_url as _safe_url
from sweeps.queue_db import (Patience, StorageUnavailable, _first_line, _study_id, database, plan_lock,  # noqa: F401
                             transient)
from sweeps.queue_trials import (CLAIM_BATCH, MAX_LOST, _record_failure, _record_result, _requeue,  # noqa: F401
                                 _waiting_trial, claim, count_waiting, give_back, requeue_lost, requeue_orphans,
                                 running_planned)


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


#: What a system runs for one trial: ``runner(payload, ctx) -> Outcome`` (the registry maps names to these).
Runner = Callable[[dict, WorkerContext], Outcome]


def check_code(study: optuna.Study, study_name: str, have: dict | None) -> None:
    """Refuse (one line, exit 2) to work on a plan defined by other code than `have` (this worker's
    `sweeps.systems.code_identity`); plans from before the check (no ``code`` attribute) are
    accepted, and so is every plan when `have` is None (runners that carry no version)."""
    want = study.user_attrs.get("code")
    if have is not None and want is not None and want != have:
        diff = ", ".join(f"{k} {want.get(k)!r} there, {have.get(k)!r} here" for k in sorted(set(want) | set(have))
                         if want.get(k) != have.get(k))
        raise BadInput("--study", study_name, f"a plan defined by this version of the code ({diff}); run the "
                       "define step's version on every worker")


def enqueue(store, study_name: str, jobs: Sequence[Job], direction: str = "maximize",
            progress: Callable[[int, int], None] | None = None, argv: list[str] | None = None,
            code: dict | None = None) -> PlanCounts:
    """Write every job not yet finished, waiting or running as a WAITING trial, under `plan_lock`.

    Idempotent: a second call (or a concurrent one on another machine) adds nothing. A key whose
    planned trials all failed is queued again (attempt 1). `code` (the define step's
    `sweeps.systems.code_identity`) is stored as the study attribute ``code`` for `check_code`."""
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
        if code is not None:
            study.set_user_attr("code", code)
    return counts


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


def _storage_name(store) -> str:
    return _safe_url(getattr(store, "url", None) or "the database")


def run_worker(store, study_name: str, *, systems: Mapping[str, Runner], code: dict | None, retries: int = 2,
               heartbeat_s: float = 10.0, grace_s: float = 60.0, max_trials: int | None = None,
               ctx: WorkerContext | None = None, progress: Callable[[int, int, int, str], None] | None = None,
               db_wait_s: float = 300.0) -> WorkerCounts:
    """Claim, run and record planned trials of `study_name` until none is waiting or running.

    `systems` maps a payload's ``system`` to its runner (the app hands `sweeps.systems.SYSTEMS`); a
    trial naming a system not in it is given back and stops the worker (`CodeMismatch`). `code` is
    this worker's code identity (`sweeps.systems.code_identity`; None accepts every plan).

    While other workers' trials run and nothing waits, this worker polls (every ``min(heartbeat_s,
    grace_s / 2)``) so that a trial whose worker died is re-run here after `grace_s`. `max_trials`
    stops after that many claims. `progress(finished_in_plan, total_in_plan, claimed_by_me,
    description)` is called after every state change seen. Every storage step rides out database
    outages of up to `db_wait_s` seconds (`Patience`; then `StorageUnavailable`). Refuses (`BadInput`)
    a plan defined by other code before claiming anything (`check_code`). Counts are stored in the
    study (also when it stops on an error).
    """
    ctx = ctx or WorkerContext()
    p = Patience(_storage_name(store), wait_s=db_wait_s, log=ctx.log, grace_s=grace_s,
                 first_s=min(0.25, max(0.01, db_wait_s / 8)))
    study_id = p(_study_id, store, study_name)
    study = p(optuna.load_study, study_name=study_name, storage=store)
    p(check_code, study, study_name, code)
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
                    orphans = p(requeue_orphans, store, study)   # a declaring worker died between its writes
                    if not orphans:
                        break
                    c["requeued_lost"] += orphans
                    continue
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
