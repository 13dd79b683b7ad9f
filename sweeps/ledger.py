"""The trial ledger: every (point, seed) result of a sweep as one trial in an Optuna study.

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
from typing import Iterable

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

optuna.logging.set_verbosity(optuna.logging.WARNING)


def storage_for(out: Path, storage: str | None):
    """`storage` (an Optuna URL) or, by default, a journal file ``out/trials.journal``."""
    if storage is not None:
        return storage
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    out.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(out / "trials.journal")))


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
