"""The trial-row steps of the worker queue (`sweeps.worker`), each safe under any number of
concurrent workers and safe to repeat after a database outage: claim a planned WAITING trial
(`claim`, copies of lost or failed trials first), find the RUNNING trials whose heartbeat stopped
(`running_planned`, `requeue_lost`), queue a copy under `sweeps.queue_db.plan_lock` (`_requeue`),
give a trial back (`give_back`) and record a result or a failure (`_record_result`,
`_record_failure`). The rules they follow are described in `sweeps.worker`.
"""

from __future__ import annotations

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState, create_trial

from sandbox.results import to_jsonable
from sweeps.ledger import _key_states
from sweeps.queue_db import plan_lock

#: A trial re-queued as lost (its worker died) this many times is given up: it kills its workers.
MAX_LOST = 10
#: Candidate waiting trials listed per claim attempt.
CLAIM_BATCH = 16


def _waiting_trial(job_attrs: dict, params: dict, distributions: dict):
    return create_trial(state=TrialState.WAITING, params=params, distributions=distributions, user_attrs=job_attrs)


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


def requeue_orphans(store, study: optuna.Study) -> int:
    """Queue the copy that a trial declared lost never got: declaring is two writes (the FAIL, then
    the copy), and a worker killed, or cut off from the database, between them leaves a key with no
    result and nothing waiting or running. Under `plan_lock`, one copy per such key (as
    `_fail_and_requeue` would have made it); returns how many were queued. Cheap enough to run when
    a worker finds nothing left to claim, which is exactly when an orphan would end the plan short."""
    with plan_lock(store, study.study_name):
        done, pending, _, by_key = _key_states(study)
        n = 0
        for key, ts in by_key.items():
            if key in done or key in pending:
                continue
            declared = [t for t in ts if t.state == TrialState.FAIL and "job" in t.user_attrs
                        and t.user_attrs.get("declared") == "lost"]
            if not declared:
                continue   # failed out on errors (its retries used up): not an orphan
            old = max(declared, key=lambda t: t.number)
            if any(t.user_attrs.get("requeue_of") == old.number for t in ts):
                continue   # its copy exists (and ended in an error): the retries decided
            lost = int(old.user_attrs.get("lost", 0)) + 1
            if lost <= MAX_LOST:
                n += _add_copy(study, old, "lost", int(old.user_attrs.get("attempt", 1)), lost)
        return n


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


def _record_result(store, tid: int, outcome) -> bool:
    """Write our trial's result (a `sweeps.worker.Outcome`); False when it had been declared lost meanwhile (its copy counts).
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
