"""Faults lose nothing and never hang: stale locks, truncated journals, one folder per
command, concurrent runs, damaged files and other bad inputs as one line with exit code 2.

Kill tests start real processes and end them with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest

from sandbox.analytic import AnalyticConfig
from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.results import LOCK_NAME, RunDir, atomic_write_text, claim_run_dir, release_run_dir
from sandbox.tasks import TaskSpec
from sweeps import grid, ledger

TASK = TaskSpec(domains=2, slots=3, dim=6, rank=2, true_rank=1, context_dim=4)
SOLVER = AnalyticConfig(steps=20, interval=5, population=4, plasticity=0.0)
SMALL = ["--domains", "2", "--slots", "3", "--dim", "6", "--rank", "2", "--true-rank", "1", "--context-dim", "4",
         "--steps", "20", "--interval", "5", "--population", "4", "--plasticity", "0", "--no-figures"]
ROOT = Path(__file__).resolve().parents[1]


def _cfg(**kw):
    return grid.SweepConfig(**{**dict(task=TASK, solver=SOLVER, points=3, seeds=(0, 1, 2)), **kw})


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return env


def cli(*args, cwd, timeout=60):
    """`sandbox ARGS` in a fresh process (as a user runs it); a hang fails the test, not the suite."""
    return subprocess.run([sys.executable, "-m", "sandbox.app.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def holder(code: str, cwd) -> subprocess.Popen:
    """A process that runs `code`, prints ``held`` and waits to be killed."""
    script = textwrap.dedent(code) + "\nprint('held', flush=True)\nimport signal; signal.pause()\n"
    p = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    line = p.stdout.readline()
    assert line.strip() == "held", p.stderr.read()
    return p


def sigkill(p: subprocess.Popen) -> None:
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=10)
    assert p.returncode == -signal.SIGKILL


def one_line(err: str, flag: str, after_progress: bool = False) -> str:
    """The one error line of stderr. A problem found once a run has started (a damaged file) may
    follow the run's progress lines (`after_progress`): then it must be the one error and the last line."""
    lines = [l for l in err.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    if not after_progress:
        assert len(lines) == 1, err
    assert lines[-1] == errors[0] and errors[0].startswith(f"error: {flag} ") and "expected" in errors[0], err
    return errors[0]


# ---------------------------------------------------------------------------------------------
# 1. A kill while holding the journal lock never makes a later run hang (relative --out)
# ---------------------------------------------------------------------------------------------


def test_journal_lock_of_a_killed_writer_is_free_at_once_with_a_relative_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", "--points", "2", "--seeds", "2", "--out", "runs/x", *SMALL]) == 0
    # the writer dies holding the journal's lock, in the middle of an append
    p = holder("""
        from sweeps.ledger import journal_lock
        journal_lock('runs/x/trials.journal').acquire()
    """, tmp_path)
    sigkill(p)
    # and an older release's stale symlink lock with a relative target (the reproduction)
    os.symlink("runs/x/trials.journal", tmp_path / "runs/x/trials.journal.lock")
    # a finer grid is another configuration: a new folder on the same journal
    r = cli("sweep", "--points", "3", "--seeds", "2", "--out", "runs/y", "--storage", "runs/x/trials.journal", *SMALL,
            cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "2 seed-points computed, 4 reused" in r.stdout


def test_journal_storage_is_absolute_and_flock_locked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = ledger.journal_or_url("rel/ledger.journal")
    lock = store._backend._lock
    assert isinstance(lock, ledger.FlockLock) and os.path.isabs(lock.path)
    assert Path(lock.path) == tmp_path / "rel" / "ledger.journal.flock"


# ---------------------------------------------------------------------------------------------
# 3. A truncated final journal line is cut on resume, never appended after
# ---------------------------------------------------------------------------------------------


def test_truncated_journal_is_repaired_on_resume_and_stays_readable(tmp_path):
    cfg = _cfg()
    first = grid.run_sweep(cfg, tmp_path / "a", figures=False)
    journal = tmp_path / "a" / "trials.journal"
    data = journal.read_bytes()
    journal.write_bytes(data[:-25])                      # a kill in the middle of the last append
    resumed = grid.run_sweep(cfg, tmp_path / "a", figures=False)
    assert resumed.computed == 1 and resumed.reused == 8  # only the trial in flight is redone
    assert journal.read_bytes().endswith(b"\n")
    again = grid.run_sweep(cfg, tmp_path / "a", figures=False)   # every later run reads it
    assert again.computed == 0 and again.reused == 9
    cols = [c for c in first.results.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(again.results[cols], first.results[cols])


@pytest.mark.parametrize("content, kept", [(b"", b""), (b'{"a":1}\n', b'{"a":1}\n'), (b'{"a":1}\n{"b"', b'{"a":1}\n'),
                                           (b'{"b"', b"")])
def test_repair_journal_cuts_only_a_partial_last_line(tmp_path, content, kept):
    p = tmp_path / "j"
    p.write_bytes(content)
    assert ledger.repair_journal(p) == len(content) - len(kept)
    assert p.read_bytes() == kept


def test_journal_with_a_damaged_complete_last_line_is_refused_before_the_run(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--out", str(out), "--points", "1", "--seeds", "1", *SMALL]) == 0
    j = out / "trials.journal"
    lines = j.read_bytes().splitlines(keepends=True)
    j.write_bytes(b"".join(lines[:-1]) + lines[-1][:9] + lines[-1])   # undecodable, but ends in a newline
    before = j.read_bytes()
    capsys.readouterr()
    assert main(["sweep", "--out", str(out), "--points", "1", "--seeds", "1", *SMALL]) == 2
    assert f"line {len(lines)}" in one_line(capsys.readouterr().err, "--out")
    assert j.read_bytes() == before


def test_journal_damaged_in_the_middle_is_one_line_naming_out(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sweep", "--out", str(out), "--points", "2", "--seeds", "2", *SMALL]) == 0
    j = out / "trials.journal"
    lines = j.read_bytes().splitlines(keepends=True)
    j.write_bytes(b"".join(lines[:2]) + lines[2][:10] + b"".join(lines[2:]))   # an old release's damage
    capsys.readouterr()
    assert main(["sweep", "--out", str(out), "--points", "2", "--seeds", "2", *SMALL]) == 2
    assert "trials.journal" in one_line(capsys.readouterr().err, "--out")


def test_sweep_killed_for_real_resumes_to_the_uninterrupted_result(tmp_path, capsys):
    args = ["sweep", "--points", "6", "--seeds", "4", *SMALL]
    p = subprocess.Popen([sys.executable, "-m", "sandbox.app.cli", *args, "--out", "k"], cwd=tmp_path, env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = tmp_path / "k" / "trials.journal"
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < 30 and not (journal.exists() and journal.stat().st_size > 0):
        time.sleep(0.01)
    sigkill(p)
    assert main([*args, "--out", str(tmp_path / "k")]) == 0
    assert main([*args, "--out", str(tmp_path / "fresh")]) == 0
    a, b = (pd.read_csv(tmp_path / d / "results.csv").drop(columns="wall_s") for d in ("k", "fresh"))
    pd.testing.assert_frame_equal(a, b)
    assert json.loads((tmp_path / "k" / "manifest.json").read_text())["ended"] is not None


# ---------------------------------------------------------------------------------------------
# 4. One folder, one command
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("owner, argv", [
    ("factorial", ["sweep", "--points", "1", "--seeds", "1"]),
    ("full", ["sweep", "--points", "1", "--seeds", "1"]),
    ("sweep", ["factorial", "--preset", "tiny"]),
    ("seed-dirs", ["sweep", "--points", "1", "--seeds", "1"]),
    ("sweep", ["full", "--cell", "B3", "--preset", "tiny"]),
])
def test_a_folder_of_another_command_is_refused_naming_out(tmp_path, capsys, owner, argv):
    out = tmp_path / "run"
    if owner == "seed-dirs":
        RunDir.create(out / "seed-42", "full", {"x": 1}).finish()
    else:
        RunDir.create(out, owner, {"x": 1}).finish()
    before = (out / "manifest.json").read_bytes() if (out / "manifest.json").exists() else None
    assert main([*argv, "--out", str(out), *(SMALL if argv[0] == "sweep" else [])]) == 2
    line = one_line(capsys.readouterr().err, "--out")
    assert "holds" in line
    if before is not None:
        assert (out / "manifest.json").read_bytes() == before
    assert not (out / "results.csv").exists() and not (out / "trials.journal").exists()


# ---------------------------------------------------------------------------------------------
# 5. Concurrent runs on one folder are detected and refused; a killed holder frees the folder
# ---------------------------------------------------------------------------------------------


def test_a_second_run_on_a_held_folder_is_refused_and_a_kill_frees_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    p = holder("""
        from sandbox.results import claim_run_dir
        claim_run_dir('runs/x', 'sweep')
    """, tmp_path)
    try:
        assert main(["sweep", "--points", "1", "--seeds", "1", "--out", "runs/x", *SMALL]) == 2
        line = one_line(capsys.readouterr().err, "--out")
        assert f"process {p.pid}" in line and "concurrent runs" in line
        assert main(["factorial", "--preset", "tiny", "--out", "runs/x", "--cache", "c"]) == 2
        assert "concurrent runs" in one_line(capsys.readouterr().err, "--out")
        assert not Path("runs/x/trials.journal").exists()
    finally:
        sigkill(p)
    assert main(["sweep", "--points", "1", "--seeds", "1", "--out", "runs/x", *SMALL]) == 0


def test_claim_is_reentrant_in_one_process_and_released_by_finish(tmp_path):
    out = tmp_path / "r"
    claim_run_dir(out, "sweep")
    claim_run_dir(out, "sweep")                                    # the same process: no-op
    run = RunDir.create(out, "sweep", {"x": 1})
    assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    run.finish()
    code = "from sandbox.results import claim_run_dir; claim_run_dir(%r, 'sweep'); print('ok')" % str(out)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert r.stdout.strip() == "ok", r.stderr
    release_run_dir(out)


def test_a_fresh_database_created_by_two_runs_at_once_is_retried(monkeypatch):
    import optuna.storages

    calls = []

    class Racy:
        def __init__(self, url):
            calls.append(url)
            if len(calls) == 1:
                raise RuntimeError('(sqlite3.OperationalError) table studies already exists')

    monkeypatch.setattr(optuna.storages, "RDBStorage", Racy)
    assert isinstance(ledger.journal_or_url("sqlite:///x.db"), Racy) and len(calls) == 2


# ---------------------------------------------------------------------------------------------
# 6. Tracebacks where the contract promises one line
# ---------------------------------------------------------------------------------------------


def _sweep(tmp_path, *args):
    return ["sweep", "--points", "1", "--seeds", "1", *SMALL, *args]


@pytest.mark.parametrize("args, flag", [
    (["--storage", "postgresql://nobody@127.0.0.1:1/none"], "--storage"),
    (["--storage", "nonsense://x"], "--storage"),
    (["--storage", "sqlite:////nonexistent/dir/ledger.db"], "--storage"),
    (["--storage", "sqlite://x:y"], "--storage"),
    (["--seeds", "1000000000"], "--seeds"),
    (["--seeds", "99999999999999999999,"], "--seeds"),
])
def test_bad_storage_and_seed_values_are_one_line(tmp_path, capsys, args, flag):
    assert main([*_sweep(tmp_path), "--out", str(tmp_path / "o"), *args]) == 2
    one_line(capsys.readouterr().err, flag)
    assert not (tmp_path / "o").exists()


def test_out_naming_a_file_or_an_unwritable_place_is_one_line(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    for out in (f, f / "sub"):
        assert main([*_sweep(tmp_path), "--out", str(out)]) == 2
        one_line(capsys.readouterr().err, "--out")
    assert main([*_sweep(tmp_path), "--out", str(tmp_path / "o"), "--storage", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "--storage")
    assert f.read_text() == "x"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only permissions")
def test_out_on_a_read_only_folder_is_one_line(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main([*_sweep(tmp_path), "--out", str(ro / "x")]) == 2
        one_line(capsys.readouterr().err, "--out")
    finally:
        ro.chmod(0o755)


def test_read_only_filesystem_error_is_one_line(tmp_path, monkeypatch):
    import errno

    real = os.open

    def erofs(path, flags, *a, **k):
        if str(path).endswith(LOCK_NAME):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", erofs)
    with pytest.raises(BadInput) as e:
        claim_run_dir(tmp_path / "x", "sweep")
    assert e.value.flag == "--out" and "Read-only file system" in str(e.value)


def test_truncated_manifest_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "s"
    assert main([*_sweep(tmp_path), "--out", str(out)]) == 0
    m = out / "manifest.json"
    m.write_text(m.read_text()[:40])
    capsys.readouterr()
    assert main([*_sweep(tmp_path), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err, "--out")
    assert "manifest.json is damaged" in line and "move it away" in line
    m.unlink()                                                   # the advice works
    assert main([*_sweep(tmp_path), "--out", str(out)]) == 0


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    os.umask(old)
    atomic_write_text(tmp_path / "t.txt", "x")
    assert (tmp_path / "t.txt").stat().st_mode & 0o777 == 0o666 & ~old


# ---------------------------------------------------------------------------------------------
# 6 (full). Damaged metrics.json, checkpoint and cached base: one line naming the file
# 7. A full run killed just after metrics.json is finished by the rerun
# 8. Smaller mismatches of `full` and `report`
# ---------------------------------------------------------------------------------------------

TINY = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4",
        "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def test_full_killed_after_metrics_is_finished_by_the_rerun(tmp_path, cache, capsys):
    out = tmp_path / "full"
    args = ["full", "--cell", "L", "--seeds", "7,", "--out", str(out), "--cache", cache, *TINY]
    # a real SIGKILL at the worst moment: metrics.json written, nothing after it
    code = textwrap.dedent(f"""
        import os, signal
        import figures.report
        figures.report.build_report = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        from sandbox.app.cli import main
        main({args!r})
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    seed = out / "seed-7"
    assert (seed / "metrics.json").exists() and (seed / "checkpoint.pt").exists()
    assert json.loads((seed / "manifest.json").read_text())["ended"] is None
    assert not (seed / "figures").exists()
    assert main(args) == 0
    assert json.loads((seed / "manifest.json").read_text())["ended"] is not None
    assert not (seed / "checkpoint.pt").exists()
    assert (seed / "figures" / "curves.png").exists()
    printed = capsys.readouterr().out
    assert str(seed / "figures") in printed.replace("\n", "")
    # 8: `sandbox report` on the folder given to --out reports every seed
    assert main(["report", str(out)]) == 0
    assert "seed-7" in capsys.readouterr().out


@pytest.mark.parametrize("victim, name", [("seed-7/metrics.json", "metrics.json"), ("cache-base", "base-")])
def test_damaged_run_and_cache_files_are_one_line_naming_them(tmp_path, cache, capsys, victim, name):
    out = tmp_path / "full"
    c = tmp_path / "cache" if victim == "cache-base" else Path(cache)
    args = ["full", "--cell", "B3", "--seeds", "7,", "--out", str(out), "--cache", str(c), *TINY]
    assert main(args) == 0
    path = next(c.glob("base-*.pt")) if victim == "cache-base" else out / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    if victim == "cache-base":
        (out / "seed-7" / "metrics.json").unlink()       # so that the rerun needs the base again
    capsys.readouterr()
    assert main(args) == 2
    line = one_line(capsys.readouterr().err, "--cache" if victim == "cache-base" else "--out", after_progress=True)
    assert name in line and "damaged" in line and "delete it" in line


def test_damaged_checkpoint_is_one_line(tmp_path, cache, capsys):
    out = tmp_path / "full"
    args = ["full", "--cell", "B3", "--seeds", "7,", "--out", str(out), "--cache", cache, *TINY]
    assert main([*args, "--stop-after", "2"]) == 0
    ck = out / "seed-7" / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:100])
    capsys.readouterr()
    assert main(args) == 2
    assert "checkpoint.pt" in one_line(capsys.readouterr().err, "--out", after_progress=True)


@pytest.mark.parametrize("args, flag", [
    (["full", "--cell", "B3", "--device", "cpu", "--preset", "widened-1536"], "--preset"),
    (["factorial", "--device", "cpu", "--preset", "widened-1536"], "--preset"),
])
def test_widened_on_cpu_is_refused_with_an_estimate_unless_yes(tmp_path, capsys, args, flag):
    assert main([*args, "--out", str(tmp_path / "o"), "--cache", str(tmp_path / "c")]) == 2
    line = one_line(capsys.readouterr().err, flag)
    assert "CPU hours" in line and "--yes" in line
    assert not (tmp_path / "o").exists()


def test_cache_naming_a_file_is_one_line(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    for cmd in (["full", "--cell", "B3"], ["factorial"]):
        assert main([*cmd, *TINY, "--out", str(tmp_path / "o"), "--cache", str(f / "sub")]) == 2
        one_line(capsys.readouterr().err, "--cache")


def test_steps_help_states_each_presets_default():
    from sandbox.app.cellopts import cell_options
    from substrate.defaults import PRESET_STEPS

    help_text = next(o.help for o in cell_options() if o.name == "steps")
    for preset, steps in PRESET_STEPS.items():
        assert f"{steps} for {preset}" in help_text


def test_report_warns_about_a_truncated_table(tmp_path, capsys):
    out = tmp_path / "s"
    assert main([*_sweep(tmp_path), "--out", str(out)]) == 0
    res = out / "results.csv"
    res.write_text(res.read_text()[:-20])
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "results.csv ends in the middle of a line" in err.replace("\n", "")
