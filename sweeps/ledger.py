"""Trial ledgers on Optuna storage: a finished trial is never computed twice.

Two write patterns share one storage (`sweeps.storage`):

- sweeps (`record` / `finished`): the seeds of a point are solved as one vectorised batch, then
  each (point, seed) is added as one finished trial;
- `TrialLedger` (the factorial): one long run per key, opened RUNNING with ask/tell so a killed
  process leaves a stale trial that the next run marks FAIL and reopens.

Sweep trials:

A trial is identified by its ``key`` user attribute, ``"<point hash>:<seed>"``, where the point hash
is a hash of the point's full resolved configuration (task spec and solver knobs with the axis
values filled in). So the same point reached from a different command (a finer grid, more seeds,
another axis order) is recognised and never computed twice, and two different configurations can
share one storage and study without colliding.

Trials are written with ``study.add_trial`` (one finished trial per storage write), so a killed
process leaves no half-written or RUNNING trial behind: a trial is either in the ledger with its
rows, or absent and computed again on the next run.

User attributes of a trial: ``key``, ``point_key``, ``seed``, ``axes`` (axis name -> value),
``rows`` (the results.csv rows of both arms, without point index and axis columns) and ``delta``.
The trial's value is delta (``log loss_grad - log loss_evo``); a pair with a diverged arm is stored
as a FAIL trial (Optuna values must be finite) but is still a finished result.

Labels for a reader of the study (optuna-dashboard, ``optuna.load_study``; docs/dashboard.md):
the study's metric name says what a trial's value is (`METRICS`, ``study.set_metric_names``), and
every trial written here carries `labels`: ``system`` (analytic, substrate, fusion, factorial),
``point`` (the axis values as ``name=value`` text), ``arm`` (what the value compares, e.g.
``evo vs grad``, or the factorial's cell) and ``metric`` (the value's meaning, for trials whose
value differs from the study's, e.g. a robustness row). They are read by no code here: keys, point
hashes and what `finished` returns are unchanged, and studies written before them read as before.

The storage under it (journal files and their locks, database URLs, names) is `sweeps.storage`;
its names are re-exported here, where the rest of the code has always found them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sandbox.errors import BadInput
from sandbox.results import to_jsonable
from sweeps.storage import (FALLBACK_GRACE_S, MAX_STUDY_NAME, PG_CONNECT_TIMEOUT_S, FlockLock,  # noqa: F401 (re-exported)
                            _first_line, _journal, _pg_engine, _rdb, check_journal, check_names, is_database,
                            journal_lock, journal_or_url, repair_journal, safe_url, storage_for)


def open_study(store, study: str, direction: str = "maximize", sampler=None, metric: str | None = None) -> optuna.Study:
    """Create or load `study` in `store` (see `storage_for`); `metric` names its value (`label_study`)."""
    st = optuna.create_study(storage=store, study_name=study, direction=direction, load_if_exists=True,
                             sampler=sampler)
    if metric is not None:
        label_study(st, metric)
    return st


#: What a trial's value is, per system: the study's metric name (`label_study`), shown by
#: optuna-dashboard as the name of the objective.
METRICS = {
    "analytic": "delta = rel_excess grad - evo (> 0: evo better)",
    "substrate": "delta = log_loss grad - evo (> 0: evo better)",
    "fusion": "gain of R over the best specialist (%)",
    "factorial": "balanced held-out log-PPL (nats/token; inf = diverged)",
    "boundary": "distance of |mean delta| from eps (the search's target: 0)",
}


def label_study(study: optuna.Study, metric: str) -> bool:
    """Name `study`'s objective `metric` (Optuna's public ``set_metric_names``), once: a study
    already named so is not written again. Returns whether it wrote. Another name is replaced (a
    study shared by two systems through ``--study`` shows the last one's)."""
    import warnings

    if study.metric_names == [metric]:
        return False
    with warnings.catch_warnings():   # set_metric_names is marked experimental by Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric])
    return True


def point_label(axes: dict) -> str:
    """A point's axis values as readable text: ``alignment=0.5, plasticity=0.1``."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in axes.items())


def labels(system: str, axes: dict | None = None, arm: str | None = None, metric: str | None = None) -> dict:
    """The readable user attributes of a trial (module docstring): ``system``, ``point`` (from
    `axes`), ``arm`` and ``metric`` (default the system's `METRICS` entry)."""
    out = {"system": system}
    if axes is not None:
        out["point"] = point_label(axes)
    if arm is not None:
        out["arm"] = arm
    out["metric"] = metric if metric is not None else METRICS.get(system, "")
    return out


def trial_key(point_key: str, seed: int) -> str:
    return f"{point_key}:{int(seed)}"


def finished(study: optuna.Study) -> dict[str, dict]:
    """``key -> user_attrs`` of every finished trial (the first one if a key was stored twice).

    A FAIL trial that a worker gave back or that was declared lost (attribute ``declared``, see
    `sweeps.worker`) is no result, even if its slow worker wrote rows before noticing."""
    out: dict[str, dict] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        attrs = t.user_attrs
        if t.state == TrialState.FAIL and "declared" in attrs:
            continue
        if "key" in attrs and "rows" in attrs and attrs["key"] not in out:
            out[attrs["key"]] = attrs
    return out


def record(study: optuna.Study, point_key: str, axes: dict[str, float], bounds: dict[str, tuple[float, float]],
           seed_rows: Iterable[tuple[int, list[dict], float]], label: dict | None = None) -> None:
    """Add one finished trial per ``(seed, rows, delta)`` of a point; `label` (see `labels`) is added
    to its user attributes for a reader and never replaces the ledger's own."""
    for seed, rows, delta in seed_rows:
        attrs = {**(label or {}), "key": trial_key(point_key, seed), "point_key": point_key, "seed": int(seed),
                 "axes": {k: float(v) for k, v in axes.items()}, "rows": rows,
                 "delta": float(delta) if math.isfinite(delta) else None}
        dists = {k: FloatDistribution(min(bounds[k][0], v), max(bounds[k][1], v)) for k, v in axes.items()}
        ok = math.isfinite(delta)
        study.add_trial(create_trial(
            params={k: float(v) for k, v in axes.items()}, distributions=dists,
            value=float(delta) if ok else None, state=TrialState.COMPLETE if ok else TrialState.FAIL,
            user_attrs=attrs))


class TrialLedger:
    """Results by key in an Optuna study; a finished key is never computed twice.

    Args:
        storage: an Optuna storage URL, or a path used as an Optuna journal file.
        study: the study name.
        flag: the flag named when the storage is unusable (``--out`` for a journal in the run folder).
        metric: the name of the trials' value (`label_study`).
    """

    def __init__(self, storage: str | Path, study: str, flag: str = "--storage", metric: str | None = None):
        self.study = open_study(journal_or_url(storage, flag), study, direction="minimize", metric=metric)

    def _trials(self, key: str, state) -> list:
        return [t for t in self.study.get_trials(deepcopy=False, states=(state,)) if t.user_attrs.get("key") == key]

    def results(self) -> dict[str, dict]:
        """Every finished key -> its stored result (the latest if a key was somehow stored twice)."""
        done = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return {t.user_attrs["key"]: t.user_attrs["result"] for t in done if "key" in t.user_attrs}

    def get(self, key: str) -> dict | None:
        done = self._trials(key, TrialState.COMPLETE)
        return done[-1].user_attrs["result"] if done else None

    def run(self, key: str, fn: Callable[[], dict], value: str, attrs: dict | None = None) -> tuple[dict, bool]:
        """The result of `key`: the stored one, or ``fn()`` recorded as a new COMPLETE trial.

        ``result[value]`` is the trial's objective (``+inf`` when it is not finite). Returns
        ``(result, computed)``. A trial left RUNNING for `key` by a killed process is marked FAIL
        first; an exception in `fn` marks the new trial FAIL and propagates.
        """
        TS = TrialState
        old = self.get(key)
        if old is not None:
            return old, False
        for stale in self._trials(key, TS.RUNNING):
            self.study.tell(stale.number, state=TS.FAIL)
        trial = self.study.ask()
        trial.set_user_attr("key", key)
        for k, v in (attrs or {}).items():
            trial.set_user_attr(k, to_jsonable(v))
        try:
            result = to_jsonable(fn())
        except BaseException:
            self.study.tell(trial, state=TS.FAIL)
            raise
        trial.set_user_attr("result", result)
        v = result.get(value)
        self.study.tell(trial, float(v) if isinstance(v, (int, float)) and math.isfinite(v) else math.inf)
        return result, True


# ---------------------------------------------------------------------------------------------
# Planned trials (`sweeps.worker`): what the collecting code checks before computing anything
# ---------------------------------------------------------------------------------------------


def has_result(t) -> bool:
    """A finished trial with a result the tables read (sweeps: rows; factorial: result)."""
    a = t.user_attrs
    return "key" in a and (t.state == TrialState.COMPLETE
                           or (t.state == TrialState.FAIL and "rows" in a and "declared" not in a))


def _key_states(study: optuna.Study) -> tuple[dict, set, set, dict]:
    """Per key: the result trial (first), pending keys (waiting or running), failed-out keys, trials."""
    done, pending, by_key = {}, set(), {}
    for t in study.get_trials(deepcopy=False):
        k = t.user_attrs.get("key")
        if k is None:
            continue
        by_key.setdefault(k, []).append(t)
        if has_result(t):
            done.setdefault(k, t)
        elif t.state in (TrialState.WAITING, TrialState.RUNNING) and "job" in t.user_attrs:
            pending.add(k)
    failed = {k for k, ts in by_key.items() if k not in done and k not in pending
              and any("job" in t.user_attrs and t.state == TrialState.FAIL for t in ts)}
    return done, pending, failed, by_key


@dataclass(frozen=True)
class Settled:
    """State of a plan's keys in a study (`plan_state`)."""

    planned: int
    finished: int
    pending: int
    """Waiting or running."""
    failed: list
    """``(key, error)`` of keys whose every planned attempt failed."""


def plan_state(study: optuna.Study, keys: Iterable[str]) -> Settled:
    keys = list(keys)
    done, pending, failed, by_key = _key_states(study)
    errs = []
    for k in keys:
        if k in failed:
            last = max((t for t in by_key[k] if t.state == TrialState.FAIL), key=lambda t: t.number)
            errs.append((k, last.user_attrs.get("error", "worker lost")))
    return Settled(len(keys), sum(k in done for k in keys), sum(k in pending for k in keys), errs)


def check_settled(study: optuna.Study, keys: Iterable[str], storage: str, study_name: str) -> None:
    """Refuse (one line naming ``--storage``) to collect while planned trials of `keys` are waiting
    or running, or failed out: computing them here would run a key that a worker may also run."""
    s = plan_state(study, keys)
    if s.pending:
        raise BadInput("--storage", storage, f"a study whose planned trials have finished: {s.pending} of {s.planned} "
                       f"are still waiting or running in study '{study_name}'; start `sandbox worker --storage URL "
                       f"--study {study_name}` or wait for the running ones, then rerun to collect")
    if s.failed:
        k, err = s.failed[0]
        raise BadInput("--storage", storage, f"a study whose planned trials have finished: {len(s.failed)} failed every "
                       f"attempt in study '{study_name}' (first: {k}: {err}); fix the cause and rerun with "
                       "--enqueue-only to queue them again, then start workers")
