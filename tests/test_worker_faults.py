"""Workers under faults, on the real PostgreSQL server of tests/conftest.py: a database restart
ridden out (and a too-long outage ending in one line, exit 2), workers of other code refused before
they claim, a stalled worker's busy folder waited for instead of spending the key's retries, a
define step racing a re-queue, Ctrl-C / SIGTERM exit codes, and the chaos run (SIGKILLs at seeded
random moments plus a database restart: every key exactly once, equal to one process)."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from sandbox.app.cli import main
from sandbox.errors import BadInput
from sweeps import ledger, systems, worker

from test_workers import SWEEP, TINY_ARGS, _env, _jobs, _results_per_key, _study

ROOT = Path(__file__).resolve().parents[1]

#: A worker whose analytic trials sleep $SLOW_S first (the result is the real one), and whose
#: factorial trials stop themselves (SIGSTOP) right after locking their folder when $STOP_AFTER_LOCK
#: is set: the moments the fault tests need, hit exactly. With $READY_DIR it marks when it has connected.
LAUNCHER = textwrap.dedent("""
    import os, signal, sys, time
    from sweeps import systems, worker

    slow = float(os.environ.get("SLOW_S", "0"))
    run_analytic = systems.run_analytic

    def sleepy(job, ctx):
        time.sleep(slow)
        return run_analytic(job, ctx)

    systems.SYSTEMS["analytic"] = sleepy   # the registry the app hands to the queue
    ready = os.environ.get("READY_DIR")
    if ready:   # mark the moment this worker has connected (a worker refuses an unreachable URL at start)
        database = worker.database

        def connected(*a, **k):
            store = database(*a, **k)
            open(os.path.join(ready, str(os.getpid())), "w").close()
            return store

        worker.database = connected
    if os.environ.get("STOP_AFTER_LOCK"):
        import substrate.cell as cell
        claim = cell.claim_run_dir

        def claim_then_stop(path, command, flag="--out"):
            out = claim(path, command, flag)
            if os.environ.pop("STOP_AFTER_LOCK", None):
                os.kill(os.getpid(), signal.SIGSTOP)   # stalled (not dead) while holding the folder
            return out

        cell.claim_run_dir = claim_then_stop
    from sandbox.app.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _launcher(tmp_path) -> Path:
    p = tmp_path / "launch.py"
    p.write_text(LAUNCHER)
    return p


def _worker_cmd(tmp_path, url: str, study: str, *extra: str) -> list[str]:
    return [sys.executable, str(_launcher(tmp_path)), "worker", "--storage", url, "--study", study, *extra]


def _trials(url: str, study: str):
    import optuna

    return optuna.load_study(study_name=study, storage=worker.database(url)).get_trials(deepcopy=False)


def _worker_counts(url: str, study: str) -> list[dict]:
    import optuna

    st = optuna.load_study(study_name=study, storage=worker.database(url))
    return [v for k, v in st.user_attrs.items() if k.startswith("worker:")]


def _wait_for(cond, timeout: float, what: str, step: float = 0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# ---------------------------------------------------------------------------------------------
# Signals: Ctrl-C exits 130, SIGTERM 143, each with one line (any command)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 143, "SIGTERM")])
def test_a_stopped_command_exits_130_or_143_with_one_line(tmp_path, sig, code, word):
    out = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "sandbox.app.cli", "sweep", "--points", "40", "--seeds", "4",
                          "--out", str(out), "--no-figures"], cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: out.exists() or p.poll() is not None, 120, "the sweep to start")
    time.sleep(1.0)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1].strip()
    assert p.returncode == code, err[-500:]
    assert len(err.splitlines()) == 1 and word in err and "Traceback" not in err


def test_seeds_to_resolve_is_bounded(capsys, tmp_path):
    from sweeps.factorial import MAX_SEEDS

    for n in (MAX_SEEDS + 1, 10**12):
        assert main(["factorial", "--cells", "B3,R", "--seeds", "1,2", "--seeds-to-resolve", str(n),
                     "--out", str(tmp_path / "f"), "--cache", str(tmp_path / "c")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--seeds-to-resolve" in err and f"at most {MAX_SEEDS}" in err
    assert not (tmp_path / "f").exists()


# ---------------------------------------------------------------------------------------------
# Code versions
# ---------------------------------------------------------------------------------------------


def test_a_worker_of_other_code_exits_2_before_claiming(pg_url, capsys):
    study = _study()
    store = worker.database(pg_url)
    worker.enqueue(store, study, _jobs(4), code=systems.code_identity())
    import optuna

    st = optuna.load_study(study_name=study, storage=store)
    assert st.user_attrs["code"] == systems.code_identity()
    st.set_user_attr("code", {**systems.code_identity(), "version": "0.0.1", "hash_scheme": "0123456789abcdef"})
    assert main(["worker", "--storage", pg_url, "--study", study, "--heartbeat", "0.5", "--grace", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--study" in err and "'0.0.1' there" in err and "hash_scheme" in err
    assert [t.state for t in _trials(pg_url, study)] == [TrialState.WAITING] * 4   # nothing claimed
    # a plan from before the check (no `code` attribute) is still worked on
    store2 = worker.database(pg_url)
    st.set_user_attr("code", None)
    assert worker.run_worker(store2, study, heartbeat_s=0.5, grace_s=2, code=systems.code_identity(),
                             systems={"test": lambda j, c: worker.Outcome({"result": {}}, 0.0)}).completed == 4


def test_a_trial_hashing_differently_is_given_back_without_an_attempt(pg_url, tmp_path, capsys):
    study = _study()
    args = [*SWEEP, "--storage", pg_url, "--study", study]
    assert main(["sweep", *args, "--enqueue-only"]) == 0
    capsys.readouterr()
    store = worker.database(pg_url)
    first = min(_trials(pg_url, study), key=lambda t: t.number)
    job = {**first.user_attrs["job"], "point_key": "0" * 16}   # as if another version had defined it
    store.set_trial_user_attr(first._trial_id, "job", job)
    assert main(["worker", "--storage", pg_url, "--study", study, "--heartbeat", "0.5", "--grace", "2"]) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: --study") and "given back" in last and "hashes differently" in last
    assert "Traceback" not in err
    assert "1 claimed" in out and "1 given back" in out
    t = next(t for t in _trials(pg_url, study) if t.number == first.number)
    assert t.state == TrialState.WAITING and t.user_attrs["attempt"] == 1 and t.user_attrs["given_back"] == 1
    assert not [t for t in _trials(pg_url, study) if t.state == TrialState.FAIL]   # no retry spent


# ---------------------------------------------------------------------------------------------
# The database goes away
# ---------------------------------------------------------------------------------------------


def _restartable(pg_server):
    if not pg_server.restartable:
        pytest.skip("the server at $MOLORA_PG_URL is not started by the tests, so they cannot restart it")


def test_a_database_restart_is_ridden_out(pg_server, tmp_path):
    _restartable(pg_server)
    url, study = pg_server.url, _study()
    assert main(["sweep", *SWEEP, "--storage", url, "--study", study, "--enqueue-only"]) == 0
    env = {**_env(), "SLOW_S": "1.0"}
    p = subprocess.Popen(_worker_cmd(tmp_path, url, study, "--heartbeat", "0.5", "--grace", "3", "--db-wait", "60"),
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(t.state == TrialState.COMPLETE for t in _trials(url, study)), 120, "a first result")
    pg_server.stop()
    time.sleep(3.0)            # longer than --grace: every heartbeat is stale when it comes back
    pg_server.start()
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-800:]
    assert "unreachable" in err and "retrying for up to 60 s (--db-wait)" in err and "database back after" in err
    reconnects = int(re.search(r"database: (\d+) reconnects", out).group(1))
    assert reconnects >= 1 and "0 failed" in out and "0 lost trials" in out
    assert sorted(_results_per_key(worker.database(url), study).values()) == [1] * 6
    [counts] = _worker_counts(url, study)
    assert counts["reconnects"] == reconnects and counts["waited_s"] >= 2.5 and counts["completed"] == 6


def test_a_database_gone_longer_than_db_wait_is_one_line_exit_2(pg_server, tmp_path):
    _restartable(pg_server)
    url, study = pg_server.url, _study()
    assert main(["sweep", *SWEEP, "--storage", url, "--study", study, "--enqueue-only"]) == 0
    p = subprocess.Popen(_worker_cmd(tmp_path, url, study, "--heartbeat", "0.5", "--grace", "2", "--db-wait", "2"),
                         cwd=tmp_path, env={**_env(), "SLOW_S": "3"}, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: any(t.state == TrialState.RUNNING for t in _trials(url, study)), 120, "the claim")
        pg_server.stop()
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
        pg_server.start()
    last = err.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in err, err[-800:]
    assert last.startswith("error: --storage") and re.search(r"unreachable for [23] s", last) and "--db-wait" in last
    assert "molora@" in last and "1 claimed" in out


# ---------------------------------------------------------------------------------------------
# Exactly once: a stalled worker's busy folder, a define step racing a re-queue, SIGTERM
# ---------------------------------------------------------------------------------------------


def test_a_stalled_workers_folder_makes_the_key_wait_not_fail(pg_url, tmp_path, capsys):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "f")
    tiny = [("21" if a == "20" else a) for a in TINY_ARGS]   # --pretrain-steps 21: a study of its own (the
    args = ["factorial", "--cells", "R", "--seeds", "1", *tiny, "--cache", cache, "--out", out,   # study is named
            "--storage", pg_url, "--device", "cpu", "--no-figures"]                              # by the settings)
    assert main([*args, "--enqueue-only"]) == 0
    study = capsys.readouterr().err.split("study '")[1].split("'")[0]
    cmd = _worker_cmd(tmp_path, pg_url, study, "--heartbeat", "0.5", "--grace", "2")
    stalled = subprocess.Popen(cmd, cwd=tmp_path, env={**_env(), "STOP_AFTER_LOCK": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    rescuer = None
    try:
        # it stops itself holding the trial's folder lock; after --grace the trial is declared lost
        _wait_for(lambda: open(f"/proc/{stalled.pid}/stat").read().split(")")[1].split()[0] == "T", 180,
                  "the worker to stop in its trial folder")
        rescuer = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        # the copy meets the busy folder and is given back, maybe several times: never an attempt
        _wait_for(lambda: any(t.user_attrs.get("given_back", 0) >= 2 for t in _trials(pg_url, study)), 180,
                  "the copy to be given back")
        os.kill(stalled.pid, signal.SIGCONT)
        outs = [stalled.communicate(timeout=180), rescuer.communicate(timeout=180)]
    finally:
        for q in (stalled, rescuer):
            if q is not None and q.poll() is None:
                os.kill(q.pid, signal.SIGCONT)
                q.kill()
    assert stalled.returncode == 0 and rescuer.returncode == 0, [o[1][-600:] for o in outs]
    trials = _trials(pg_url, study)
    assert _results_per_key(worker.database(pg_url), study) == {"R/0": 1}
    assert not [t for t in trials if "error" in t.user_attrs]       # no attempt spent on the busy folder
    assert [t.user_attrs.get("declared") for t in trials if t.state == TrialState.FAIL] == ["lost"]
    busy = sum(c["busy"] for c in _worker_counts(pg_url, study))
    dropped = sum(c["dropped"] for c in _worker_counts(pg_url, study))
    assert busy >= 2 and dropped == 1   # the stalled worker's late result: dropped, its copy counts
    print(f"stalled worker: copy given back {busy} times on the busy folder, late result dropped, key kept")
    assert main(args) == 0
    assert "trials: 0 computed, 1 reused" in capsys.readouterr().err


def test_a_define_step_racing_a_requeue_queues_the_key_once(pg_url):
    """The interleaving that duplicated a key: the define step runs right after the re-queuer has
    marked the lost trial FAIL and before it adds the copy. Under `plan_lock` it has to wait."""
    study, jobs = _study(), _jobs(1)
    store, definer = worker.database(pg_url), worker.database(pg_url)
    worker.enqueue(store, study, jobs)
    tid = worker.claim(store, worker._study_id(store, study))
    import optuna

    st = optuna.load_study(study_name=study, storage=store)
    time.sleep(1.2)   # its heartbeat is now older than the grace below: lost
    real, result, racing = store.set_trial_state_values, [], threading.Event()

    def define_in_between(trial_id, state, values=None):
        ok = real(trial_id, state, values)
        if state == TrialState.FAIL and not racing.is_set():
            racing.set()
            t = threading.Thread(target=lambda: result.append(worker.enqueue(definer, study, jobs)))
            t.start()
            t.join(timeout=3.0)   # with the lock it cannot finish now; without, it queued the key here
        return ok

    store.set_trial_state_values = define_in_between
    try:
        assert worker.requeue_lost(store, st, worker._study_id(store, study), grace_s=1.0) == 1
    finally:
        store.set_trial_state_values = real
    _wait_for(lambda: result, 30, "the define step")
    waiting = [t for t in _trials(pg_url, study) if t.state == TrialState.WAITING]
    assert racing.is_set() and len(waiting) == 1 and result[0].enqueued == 0 and result[0].pending == 1
    assert waiting[0].user_attrs["reason"] == "lost" and tid is not None


def test_a_worker_killed_between_declaring_a_trial_lost_and_queueing_its_copy_loses_no_key(pg_url):
    """Declaring a trial lost is two writes (the FAIL, then the copy): a worker killed between them
    (done here by writing the first half by hand) leaves a key with no result and nothing queued.
    The last worker to find nothing left queues the missing copy and runs it."""
    import optuna

    study, store = _study(), worker.database(pg_url)
    worker.enqueue(store, study, _jobs(3))
    sid = worker._study_id(store, study)
    tid = worker.claim(store, sid)                       # k0's worker dies ...
    store.set_trial_user_attr(tid, "declared", "lost")   # ... and so does the one declaring it lost,
    store.set_trial_state_values(tid, state=TrialState.FAIL)   # after the FAIL, before the copy
    counts = worker.run_worker(store, study, retries=2, heartbeat_s=0.5, grace_s=2,
                               systems={"test": lambda job, ctx: worker.Outcome({"result": job["i"]}, 1.0)}, code=None)
    assert _results_per_key(store, study) == {"k0": 1, "k1": 1, "k2": 1}
    assert (counts.claimed, counts.completed, counts.requeued_lost) == (3, 3, 1)
    copy = [t for t in optuna.load_study(study_name=study, storage=store).get_trials() if t.user_attrs["key"] == "k0"
            and t.state == TrialState.COMPLETE]
    assert copy[0].user_attrs["requeue_of"] == store.get_trial(tid).number and copy[0].user_attrs["lost"] == 1
    # a key failed out on errors is no orphan: nothing more is queued
    assert worker.requeue_orphans(store, optuna.load_study(study_name=study, storage=store)) == 0


def test_a_lost_trials_copy_goes_to_the_front_of_the_queue(pg_url):
    study, store = _study(), worker.database(pg_url)
    worker.enqueue(store, study, _jobs(4))
    sid = worker._study_id(store, study)
    first = worker.claim(store, sid)   # k0 runs, and its worker dies
    import optuna

    time.sleep(1.2)
    assert worker.requeue_lost(store, optuna.load_study(study_name=study, storage=store), sid, grace_s=1.0) == 1
    nxt = store.get_trial(worker.claim(store, sid))
    assert nxt.user_attrs["key"] == "k0" and nxt.user_attrs["requeue_of"] == store.get_trial(first).number
    assert [store.get_trial(worker.claim(store, sid)).user_attrs["key"] for _ in range(3)] == ["k1", "k2", "k3"]


def test_sigterm_gives_the_trial_back_and_exits_143(pg_url, tmp_path):
    study = _study()
    assert main(["sweep", *SWEEP, "--storage", pg_url, "--study", study, "--enqueue-only"]) == 0
    p = subprocess.Popen(_worker_cmd(tmp_path, pg_url, study, "--heartbeat", "0.5", "--grace", "2"), cwd=tmp_path,
                         env={**_env(), "SLOW_S": "30"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: any(t.state == TrialState.RUNNING for t in _trials(pg_url, study)), 120, "the claim")
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err[-600:]
    assert err.strip().splitlines()[-1].startswith("stopped by SIGTERM") and "Traceback" not in err
    assert "1 claimed" in out and "1 given back (1 interrupted" in out
    trials = _trials(pg_url, study)
    assert [t.state for t in trials] == [TrialState.WAITING] * 6 and len(trials) == 6   # back in place, no copy
    assert [c["interrupted"] for c in _worker_counts(pg_url, study)] == [1]


# ---------------------------------------------------------------------------------------------
# Chaos: SIGKILLs at seeded random moments and a database restart
# ---------------------------------------------------------------------------------------------

#: Worker-collected tables against one process: a worker evaluates a point's seeds one at a time, one
#: process stacks them in one batch, so sums run in another order (measured up to 5.8e-14; docs/reliability.md).
TOLERANCE = 1e-12
#: The chaos run's seed: it picks the moments (after which result, how long after) and the victims.
CHAOS_SEED = 20261207
#: 4 points x 3 seeds = 12 keys of the fast analytic sweep.
CHAOS = ["--points", "4", "--seeds", "3", *SWEEP[4:]]


def test_chaos_kills_and_a_database_restart_lose_and_duplicate_nothing(pg_server, tmp_path, capsys):
    _restartable(pg_server)
    url, study, rng = pg_server.url, _study(), random.Random(CHAOS_SEED)
    args = [*CHAOS, "--storage", url, "--study", study]
    assert main(["sweep", *args, "--enqueue-only"]) == 0
    capsys.readouterr()
    cmd = _worker_cmd(tmp_path, url, study, "--heartbeat", "0.5", "--grace", "3", "--db-wait", "90")
    ready = tmp_path / "ready"
    ready.mkdir()
    env = {**_env(), "SLOW_S": "1.5", "READY_DIR": str(ready)}   # trials take >= 1.5 s: faults land mid-trial too

    def spawn():
        return subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def results():
        return sum(ledger.has_result(t) for t in _trials(url, study))

    procs, killed = [spawn() for _ in range(3)], []
    # four faults after the k-th result (k distinct in 1..9) plus a delay in [0, 1) s; one is the restart
    moments = sorted(rng.sample(range(1, 10), 4))
    restart_at = rng.randrange(4)
    faults = []
    try:
        for i, k in enumerate(moments):
            _wait_for(lambda: results() >= k, 120, f"result {k}")
            time.sleep(rng.random())
            if i == restart_at:   # once every live worker is past its start (an outage at start is exit 2)
                _wait_for(lambda: all(p.poll() is not None or (ready / str(p.pid)).exists()
                                      for p in procs if p not in killed), 120, "every worker connected")
                pg_server.stop()
                time.sleep(4.0)   # longer than --grace: every heartbeat is stale when it comes back
                pg_server.start()
                faults.append(f"database restart after result {k}")
                continue
            victim = rng.choice([p for p in procs if p not in killed])
            alive = victim.poll() is None
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            killed.append(victim)
            procs.append(spawn())
            faults.append(f"SIGKILL after result {k}" + ("" if alive else " (the victim had already exited)"))
        outs = {p.pid: p.communicate(timeout=150) for p in procs if p not in killed}
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = [(p.returncode, outs[p.pid][1][-600:]) for p in procs if p not in killed and p.returncode != 0]
    assert not bad, bad
    trials = _trials(url, study)
    per_key = Counter(t.user_attrs["key"] for t in trials if ledger.has_result(t))
    keys = {t.user_attrs["key"] for t in trials}
    duplicated, lost = sum(n > 1 for n in per_key.values()), len(keys - set(per_key))
    reconnects = sum(c["reconnects"] for c in _worker_counts(url, study))
    requeued = sum(t.user_attrs.get("declared") == "lost" for t in trials)
    with capsys.disabled():
        print(f"\nchaos (seed {CHAOS_SEED}): {len(faults)} faults ({'; '.join(faults)}), {len(keys)} keys, "
              f"{duplicated} duplicated, {lost} lost, {requeued} trials re-queued as lost, {reconnects} reconnects "
              f"(surviving workers), {len(procs)} workers started")
    story = {k: [(t.number, t.state.name, {a: t.user_attrs.get(a) for a in ("declared", "reason", "attempt", "lost",
                                                                          "requeue_of", "error", "worker")})
                 for t in trials if t.user_attrs.get("key") == k] for k in keys - set(per_key)}
    assert len(keys) == 12 and duplicated == 0 and lost == 0 and len(faults) == 4, story   # a lost key's trials
    assert not [t for t in trials if t.state in (TrialState.WAITING, TrialState.RUNNING)]
    assert not [t for t in trials if "error" in t.user_attrs]   # no fault cost a trial an attempt
    assert reconnects >= 1   # a worker alive across the restart rode it out
    # collecting computes nothing and equals one process
    assert main(["sweep", *args, "--out", str(tmp_path / "collect"), "--no-figures"]) == 0
    assert "0 seed-points computed, 12 reused" in capsys.readouterr().out
    assert main(["sweep", *CHAOS, "--out", str(tmp_path / "alone"), "--no-figures"]) == 0
    gaps = {}
    for table in ("summary.csv", "results.csv"):
        a, b = (pd.read_csv(tmp_path / d / table).drop(columns=["wall_s"], errors="ignore")   # a timing
                for d in ("collect", "alone"))
        pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=0, atol=TOLERANCE)
        gaps[table] = max((a[c] - b[c]).abs().max() for c in a.columns if pd.api.types.is_float_dtype(a[c]))
    with capsys.disabled():
        print(f"collected tables vs one process: largest differences {gaps} (tolerance {TOLERANCE:g})")


# ---------------------------------------------------------------------------------------------
# The last tracebacks: one line each
# ---------------------------------------------------------------------------------------------


def _one_line(err: str, *words: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err[-600:]
    assert all(w in lines[0] for w in words), lines[0]
    return lines[0]


def test_a_study_name_longer_than_the_storage_column_is_one_line(pg_url, tmp_path, capsys):
    long = "s" * 600
    for extra in ([], ["--enqueue-only"]):
        assert main(["sweep", *SWEEP, "--storage", pg_url, "--study", long, "--out", str(tmp_path / "o"),
                     "--no-figures", *extra]) == 2
        _one_line(capsys.readouterr().err, "--study", "600 characters", "at most 512")
    assert main(["worker", "--storage", pg_url, "--study", long]) == 2
    _one_line(capsys.readouterr().err, "--study", "at most 512")
    assert not (tmp_path / "o").exists()


def test_empty_names_and_too_long_paths_are_one_line(tmp_path, capsys):
    long = str(tmp_path / ("x" * 300))
    for args, flag in ((["--out", long], "--out"), (["--out", ""], "--out"), (["--study", ""], "--study"),
                       (["--storage", ""], "--storage"), (["--out", str(tmp_path / "o"), "--cache", ""], "--cache")):
        assert main(["sweep", *SWEEP, *args, "--no-figures"]) == 2
        _one_line(capsys.readouterr().err, flag)
    assert main(["factorial", "--cells", "B3,R", "--seeds", "1", "--out", long]) == 2
    _one_line(capsys.readouterr().err, "--out", "at most 255 bytes")
    assert main(["full", "--cell", "R", "--out", long]) == 2
    _one_line(capsys.readouterr().err, "--out", "at most 255 bytes")
    assert not list(tmp_path.iterdir())


def test_bench_out_on_a_read_only_place_is_refused_before_timing(tmp_path, capsys, monkeypatch):
    import errno

    ro, real = tmp_path / "ro", os.open
    ro.mkdir()

    def erofs(path, flags, *a, **k):   # a read-only filesystem (root writes through 0555 permissions)
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", erofs)
    t0 = time.perf_counter()
    assert main(["bench", "--quick", "--only", "loss", "--out", str(ro / "b.json")]) == 2
    _one_line(capsys.readouterr().err, "--out", "Read-only file system")
    assert time.perf_counter() - t0 < 30 and not list(ro.iterdir())


def test_full_refuses_a_sweep_folder(tmp_path, capsys):
    sw = tmp_path / "sw"
    assert main(["sweep", *SWEEP, "--out", str(sw), "--no-figures"]) == 0
    before = sorted(p.name for p in sw.iterdir())
    capsys.readouterr()
    assert main(["full", "--cell", "R", *TINY_ARGS[:2], "--out", str(sw), "--cache", str(tmp_path / "c")]) == 2
    _one_line(capsys.readouterr().err, "--out", "holds a sweep run")
    assert sorted(p.name for p in sw.iterdir()) == before


def test_a_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    import errno

    import sandbox.results.atomic as atomic   # where atomic_open lives (sandbox.results re-exports it)

    def full(path, mode="w"):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "atomic_open", full)
    out = tmp_path / "s"
    assert main(["sweep", *SWEEP, "--out", str(out), "--no-figures"]) == 1
    line = _one_line(capsys.readouterr().err, "disk is full", "No space left on device", "--out")
    assert str(out) in line


def test_storage_passwords_never_appear_in_errors(capsys):
    assert main(["worker", "--storage", "postgresql://me:s3cr%40t@127.0.0.1:1/none", "--study", "s"]) == 2
    err = _one_line(capsys.readouterr().err, "--storage", "me:***@127.0.0.1")
    assert "s3cr" not in err
    assert ledger.safe_url("postgresql://u:a@b@h/db?password=x&sslmode=require") == \
        "postgresql://u:***@h/db?password=***&sslmode=require"


@pytest.mark.parametrize("args, flag", [(["--db-wait", "-1"], "--db-wait"), (["--db-wait", "nan"], "--db-wait"),
                                        (["--grace", "1", "--heartbeat", "10"], "--grace")])
def test_worker_timing_flags_are_checked(args, flag, capsys):
    assert main(["worker", "--storage", "postgresql://u@127.0.0.1:1/x", "--study", "s", *args]) == 2
    _one_line(capsys.readouterr().err, flag)


# ---------------------------------------------------------------------------------------------
# Flags a system would silently ignore, and a folder of the other system
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag, system", [
    (["--system", "substrate", "--lifecycle"], "--lifecycle", "substrate"),
    (["--system", "substrate", "--domains", "3"], "--domains", "substrate"),
    (["--system", "substrate", "--slots", "3"], "--slots", "substrate"),
    (["--system", "substrate", "--search", "boundary"], "--search", "substrate"),
    (["--system", "substrate", "--tune", "off"], "--tune", "substrate"),
    (["--preset", "tiny"], "--preset", "analytic"),
    (["--data", "."], "--data", "analytic"),
    (["--cache", "c"], "--cache", "analytic"),
])
def test_a_flag_the_system_does_not_read_is_refused(args, flag, system, tmp_path, capsys):
    assert main(["sweep", *args, "--out", str(tmp_path / "o")]) == 2
    _one_line(capsys.readouterr().err, f"error: {flag}", f"--system {system}", "does not read it")
    assert not (tmp_path / "o").exists()


def test_a_sweep_folder_of_the_other_system_is_refused(tmp_path, capsys):
    sub = ["--system", "substrate", "--points", "2", "--seeds", "1", "--steps", "4", "--batch", "2",
           "--population", "3", "--cache", str(tmp_path / "cache"), "--device", "cpu", "--no-figures"]
    a, s = tmp_path / "a", tmp_path / "s"
    assert main(["sweep", *SWEEP, "--out", str(a), "--no-figures"]) == 0
    assert main(["sweep", *sub, "--out", str(s)]) == 0
    capsys.readouterr()
    before = {d: sorted(p.name for p in d.iterdir()) for d in (a, s)}
    assert main(["sweep", *sub, "--out", str(a)]) == 2
    _one_line(capsys.readouterr().err, "--out", "holds a --system analytic sweep")
    assert main(["sweep", *SWEEP, "--out", str(s), "--no-figures"]) == 2
    _one_line(capsys.readouterr().err, "--out", "holds a --system substrate sweep")
    assert {d: sorted(p.name for p in d.iterdir()) for d in (a, s)} == before
