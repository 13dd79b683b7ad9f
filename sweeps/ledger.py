"""Trial ledgers on Optuna storage: a finished trial is never computed twice.

Two write patterns share the storage helpers below:

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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from sandbox.results import to_jsonable

optuna.logging.set_verbosity(optuna.logging.WARNING)


def journal_or_url(storage: str | Path):
    """An Optuna storage URL (anything with ``://``) as it is; otherwise a journal file at that path."""
    s = str(storage)
    if "://" in s:
        return s
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    Path(s).parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(s))


def storage_for(out: Path, storage: str | None):
    """`storage` (an Optuna URL) or, by default, a journal file ``out/trials.journal``."""
    return journal_or_url(storage if storage is not None else Path(out) / "trials.journal")


def open_study(store, study: str, direction: str = "maximize", sampler=None) -> optuna.Study:
    """Create or load `study` in `store` (see `storage_for`)."""
    return optuna.create_study(storage=store, study_name=study, direction=direction, load_if_exists=True,
                               sampler=sampler)


def trial_key(point_key: str, seed: int) -> str:
    return f"{point_key}:{int(seed)}"


def finished(study: optuna.Study) -> dict[str, dict]:
    """``key -> user_attrs`` of every finished trial (the first one if a key was stored twice)."""
    out: dict[str, dict] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)):
        attrs = t.user_attrs
        if "key" in attrs and "rows" in attrs and attrs["key"] not in out:
            out[attrs["key"]] = attrs
    return out


def record(study: optuna.Study, point_key: str, axes: dict[str, float], bounds: dict[str, tuple[float, float]],
           seed_rows: Iterable[tuple[int, list[dict], float]]) -> None:
    """Add one finished trial per ``(seed, rows, delta)`` of a point."""
    for seed, rows, delta in seed_rows:
        attrs = {"key": trial_key(point_key, seed), "point_key": point_key, "seed": int(seed),
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
    """

    def __init__(self, storage: str | Path, study: str):
        self.study = open_study(journal_or_url(storage), study, direction="minimize")

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
