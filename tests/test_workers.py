"""Workers on a real PostgreSQL server: every planned trial exactly once, an idempotent
define step under concurrency, a SIGKILLed worker's trial re-run, raising trials failed and
retried at most N times, and the storages that cannot work refused with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from optuna.trial import TrialState

from sandbox.app.cli import main
from sandbox.errors import BadInput
from sweeps import ledger, systems, worker

ROOT = Path(__file__).resolve().parents[1]
#: A fast sweep: 3 points x 2 seeds.
SWEEP = ["--points", "3", "--seeds", "2", "--steps", "20", "--population", "4", "--domains", "2", "--slots", "2",
         "--dim", "8", "--rank", "2", "--true-rank", "1", "--context-dim", "4", "--draws", "2", "--eval-draws", "4"]


#: The factorial smoke test's tiny settings (tests/test_factorial.py).
TINY_ARGS = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
             "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]


def _study() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def _results_per_key(store, study: str) -> Counter:
    import optuna

    st = optuna.load_study(study_name=study, storage=store)
    return Counter(t.user_attrs["key"] for t in st.get_trials(deepcopy=False) if ledger.has_result(t))


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


# ---------------------------------------------------------------------------------------------
# Refusals (no server needed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage, what", [("sqlite:///x.db", "SQLite"), ("runs/x.journal", "journal file"),
                                           ("mysql://u@h/db", "mysql URL")])
def test_worker_refuses_sqlite_and_journal_with_one_line(storage, what, capsys):
    assert main(["worker", "--storage", storage, "--study", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--storage" in err and "postgresql://" in err and what in err


def test_enqueue_needs_a_database_and_a_grid(tmp_path, capsys):
    assert main(["sweep", *SWEEP, "--enqueue-only"]) == 2
    assert "--storage" in capsys.readouterr().err
    assert main(["sweep", *SWEEP, "--enqueue-only", "--storage", str(tmp_path / "t.journal")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "postgresql://" in err and not (tmp_path / "t.journal").exists()


def test_substrate_enqueue_needs_a_database(capsys, tmp_path):
    assert main(["sweep", "--system", "substrate", "--enqueue-only", "--storage", str(tmp_path / "t.journal"),
                 "--points", "2", "--seeds", "1", "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--storage" in err


def test_unreachable_database_is_one_line_exit_2(capsys):
    assert main(["worker", "--storage", "postgresql://nobody@127.0.0.1:1/none", "--study", "s"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --storage") and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Real workers on a real server
# ---------------------------------------------------------------------------------------------


def test_three_workers_run_every_planned_trial_exactly_once(pg_url, tmp_path, capsys):
    study = _study()
    args = [*SWEEP, "--storage", pg_url, "--study", study]
    assert main(["sweep", *args, "--enqueue-only"]) == 0
    assert "6 trials planned" in capsys.readouterr().out
    # collecting while trials wait is refused (it would compute what workers will compute)
    assert main(["sweep", *args, "--out", str(tmp_path / "early"), "--no-figures"]) == 2
    assert "still waiting or running" in capsys.readouterr().err and not (tmp_path / "early").exists()

    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "sandbox.app.cli", "worker", "--storage", pg_url, "--study", study,
                               "--heartbeat", "1", "--grace", "5"], cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    wall = time.perf_counter() - t0
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    claimed = sum(int(o[0].split("worker: ")[1].split(" claimed")[0]) for o in outs)
    store = worker.database(pg_url)
    per_key = _results_per_key(store, study)
    with capsys.disabled():
        print(f"\n3 workers, 6 trials: claimed {claimed}, results per key {sorted(per_key.values())}, {wall:.1f} s")
    assert claimed == 6 and len(per_key) == 6 and set(per_key.values()) == {1}

    # the collect step computes nothing, and equals a single-process run of the same sweep
    assert main(["sweep", *args, "--out", str(tmp_path / "collect"), "--no-figures"]) == 0
    assert "0 seed-points computed, 6 reused" in capsys.readouterr().out
    assert main(["sweep", *SWEEP, "--out", str(tmp_path / "alone"), "--no-figures"]) == 0
    a = pd.read_csv(tmp_path / "collect" / "summary.csv")
    b = pd.read_csv(tmp_path / "alone" / "summary.csv")
    pd.testing.assert_frame_equal(a, b)
    # defining again adds nothing: every key is finished
    assert main(["sweep", *args, "--enqueue-only"]) == 0
    assert "0 queued now" in capsys.readouterr().out
    assert sum(_results_per_key(store, study).values()) == 6


def _jobs(n: int, system: str = "test", **extra) -> list[worker.Job]:
    return [worker.Job(key=f"k{i}", payload={"system": system, "i": i, **extra}) for i in range(n)]


def test_enqueue_twice_and_concurrently_adds_every_key_once(pg_url):
    study, jobs = _study(), _jobs(40)
    stores = [worker.database(pg_url) for _ in range(4)]
    barrier, counts = threading.Barrier(4), []

    def define(store):
        barrier.wait()
        counts.append(worker.enqueue(store, study, jobs))

    threads = [threading.Thread(target=define, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(c.enqueued for c in counts) == 40 and sorted(c.pending for c in counts)[-1] == 40
    again = worker.enqueue(stores[0], study, jobs)
    assert again.enqueued == 0 and again.pending == 40
    import optuna

    waiting = optuna.load_study(study_name=study, storage=stores[0]).get_trials(states=(TrialState.WAITING,))
    assert sorted(Counter(t.user_attrs["key"] for t in waiting).values()) == [1] * 40


def _ok(job, ctx):
    return worker.Outcome({"result": {"i": job["i"]}}, float(job["i"]))


def test_a_raising_trial_is_failed_retried_at_most_n_times_and_never_a_result(pg_url):
    study = _study()
    store = worker.database(pg_url)
    calls = Counter()

    def flaky(job, ctx):
        calls[job["i"]] += 1
        if job["i"] == 1:
            raise ValueError("bad trial\nsecond line")
        return _ok(job, ctx)

    worker.enqueue(store, study, _jobs(3))
    counts = worker.run_worker(store, study, retries=2, heartbeat_s=0.5, grace_s=2, systems={"test": flaky},
                               code=None)
    assert calls == {0: 1, 1: 3, 2: 1}
    assert (counts.claimed, counts.completed, counts.failed, counts.retried, counts.gave_up) == (5, 2, 3, 2, 1)
    import optuna

    st = optuna.load_study(study_name=study, storage=store)
    bad = [t for t in st.get_trials() if t.user_attrs["key"] == "k1"]
    assert [t.state for t in bad] == [TrialState.FAIL] * 3 and [t.user_attrs["attempt"] for t in bad] == [1, 2, 3]
    assert all(t.user_attrs["error"] == "ValueError: bad trial" for t in bad)
    assert "k1" not in ledger.TrialLedger.results(_Led(st))
    assert _results_per_key(store, study) == {"k0": 1, "k2": 1}
    with pytest.raises(BadInput, match="failed every attempt"):
        ledger.check_settled(st, ["k0", "k1", "k2"], pg_url, study)
    # the next define step queues the failed key again (and nothing else)
    assert worker.enqueue(store, study, _jobs(3)).enqueued == 1
    assert st.user_attrs[[k for k in st.user_attrs if k.startswith("worker:")][0]]["gave_up"] == 1


class _Led:
    """A `TrialLedger` over an existing study (reads results the way the factorial does)."""

    def __init__(self, study):
        self.study = study


LAUNCHER = textwrap.dedent("""
    import sys, time, pathlib
    from sweeps import systems, worker

    marks = pathlib.Path(sys.argv[1])

    def sleepy(job, ctx):
        marks.joinpath(f"{job['i']}-{time.time():.3f}").touch()
        time.sleep(job["sleep"])
        return worker.Outcome({"result": {"i": job["i"]}}, float(job["i"]))

    systems.SYSTEMS["test"] = sleepy   # the registry the app hands to the queue
    from sandbox.app.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_a_sigkilled_workers_trial_is_run_again_by_another_worker(pg_url, tmp_path):
    study = _study()
    store = worker.database(pg_url)
    worker.enqueue(store, study, _jobs(3, sleep=1.5))
    launcher, marks = tmp_path / "launch.py", tmp_path / "marks"
    launcher.write_text(LAUNCHER)
    marks.mkdir()
    cmd = [sys.executable, str(launcher), str(marks), "worker", "--storage", pg_url, "--study", study,
           "--heartbeat", "0.5", "--grace", "2"]
    victim = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(marks.iterdir()) and time.time() < deadline:
        time.sleep(0.05)
    started = list(marks.iterdir())
    assert started, "the worker never started a trial"
    victim.send_signal(signal.SIGKILL)       # mid-trial: its trial stays RUNNING with a stopping heartbeat
    victim.wait()
    killed_at = time.time()
    killed_i = int(max(started, key=lambda p: float(p.name.split("-", 1)[1])).name.split("-")[0])   # its last trial
    rescuer = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert rescuer.returncode == 0, rescuer.stderr[-800:]
    assert "1 lost trials of other workers queued again" in rescuer.stdout
    assert _results_per_key(store, study) == {"k0": 1, "k1": 1, "k2": 1}
    reruns = sorted(float(p.name.split("-", 1)[1]) for p in marks.iterdir() if int(p.name.split("-")[0]) == killed_i)
    assert len(reruns) == 2
    print(f"killed worker's trial k{killed_i} re-run {reruns[1] - killed_at:.1f} s after the kill (grace 2 s)")
    import optuna

    st = optuna.load_study(study_name=study, storage=store)
    lost = [t for t in st.get_trials() if t.user_attrs.get("declared") == "lost"]
    assert len(lost) == 1 and lost[0].state == TrialState.FAIL and lost[0].user_attrs["key"] == f"k{killed_i}"


def test_tiny_factorial_through_workers_collects_without_computing(pg_url, tmp_path, capsys):
    cache = str(tmp_path / "cache")
    args = ["factorial", "--cells", "B3,R", "--seeds", "1", *TINY_ARGS, "--cache", cache, "--out", str(tmp_path / "f"),
            "--storage", pg_url, "--device", "cpu", "--no-figures"]
    assert main([*args, "--enqueue-only"]) == 0
    err = capsys.readouterr().err
    study = err.split("study '")[1].split("'")[0]
    counts = worker.run_worker(worker.database(pg_url), study, heartbeat_s=1, grace_s=5, systems=systems.SYSTEMS,
                               code=systems.code_identity())
    assert (counts.claimed, counts.completed) == (2, 2)
    assert main(args) == 0
    assert "trials: 0 computed, 2 reused" in capsys.readouterr().err
    assert len(pd.read_csv(tmp_path / "f" / "cells.csv")) == 2


def test_tiny_substrate_map_through_a_worker_collects_without_computing(pg_url, tmp_path, capsys):
    args = ["sweep", "--system", "substrate", "--points", "2", "--seeds", "1", "--steps", "4", "--batch", "2",
            "--population", "3", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "s"),
            "--storage", pg_url, "--study", _study(), "--device", "cpu", "--no-figures"]
    assert main([*args, "--enqueue-only"]) == 0
    capsys.readouterr()
    study = args[args.index("--study") + 1]
    counts = worker.run_worker(worker.database(pg_url), study, heartbeat_s=1, grace_s=5, systems=systems.SYSTEMS,
                               code=systems.code_identity())
    assert (counts.claimed, counts.completed) == (2, 2)
    assert main(args) == 0
    assert "0 seed-points computed, 2 reused" in capsys.readouterr().out
    res = pd.read_csv(tmp_path / "s" / "results.csv")
    assert len(res) == 2 * 4 and set(res["arm"]) == {"grad", "evo", "restart", "oracle"}
