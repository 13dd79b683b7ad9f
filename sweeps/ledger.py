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

Labels for a reader of the study (optuna-dashboard, ``optuna.load_study``; docs/dashboard.md):
the study's metric name says what a trial's value is (`METRICS`, ``study.set_metric_names``), and
every trial written here carries `labels`: ``system`` (analytic, substrate, fusion, factorial),
``point`` (the axis values as ``name=value`` text), ``arm`` (what the value compares, e.g.
``evo vs grad``, or the factorial's cell) and ``metric`` (the value's meaning, for trials whose
value differs from the study's, e.g. a robustness row). They are read by no code here: keys, point
hashes and what `finished` returns are unchanged, and studies written before them read as before.

Journal files (the default storage):

- the path is made absolute, and writers serialise on ``flock`` of ``<journal>.flock``
  (`FlockLock`) instead of Optuna's default symlink lock. The kernel drops a flock when its holder
  dies, so a run killed while appending never leaves a stale lock behind. (Optuna's symlink lock,
  left behind by a kill, pointed at a relative target that did not exist; its grace period never
  started and the next run spun forever.)
- a kill in the middle of an append can leave a final line without its newline. Opening the
  journal cuts that partial line (`repair_journal`, under the lock) before anything is appended,
  so a resumed run never writes after a cut line; the lost write is the trial in flight, which is
  computed again.
- a journal damaged anywhere else, an unreachable or malformed storage URL, or a missing database
  driver is a one-line `BadInput` naming the flag (``--out`` for the default journal, ``--storage``
  otherwise).
"""

from __future__ import annotations

import errno
import json
import math
import os
import time
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Iterable

import optuna
from optuna.distributions import FloatDistribution
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import TrialState, create_trial

from sandbox.errors import BadInput
from sandbox.results import FILE_MODE, LOCK_NAME, claim_run_dir, release_run_dir, to_jsonable

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: Optuna's open lock with a short grace period
    fcntl = None

optuna.logging.set_verbosity(optuna.logging.WARNING)

#: Grace period (s) of the fallback lock on filesystems without flock: a lock file older than this
#: is broken (appends take milliseconds).
FALLBACK_GRACE_S = 10


class FlockLock:
    """Journal writers' lock: an exclusive ``flock`` on ``<journal>.flock`` (the ``acquire`` /
    ``release`` interface of Optuna's journal file locks).

    Blocking, and held only while one append runs. The kernel releases it when the holding
    process exits or is killed, so, unlike Optuna's symlink/open locks, it can never be left stale.
    """

    def __init__(self, journal: str | Path):
        self.path = str(journal) + ".flock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)   # drops the flock


def journal_lock(journal: str | Path):
    """`FlockLock` where the filesystem supports flock; else Optuna's open lock on the absolute
    path with a grace period of `FALLBACK_GRACE_S` seconds (a stale lock is broken after that)."""
    journal = os.path.abspath(journal)
    if fcntl is not None:
        probe = FlockLock(journal)
        try:
            fd = os.open(probe.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return probe
            except BlockingIOError:
                return probe       # held by a live writer: flock works here
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
            finally:
                os.close(fd)
        except OSError:
            pass
    return JournalFileOpenLock(journal, grace_period=FALLBACK_GRACE_S)


def repair_journal(path: str | Path) -> int:
    """Cut a final line left without its newline by a kill mid-append; returns the bytes removed.

    Optuna appends whole lines (each ends with a newline), so only the last line can be partial,
    and it was never a complete operation. Without the cut, the next append would land after the
    partial line and make it an undecodable line in the middle of the journal. Call it holding
    the journal's lock (`journal_or_url` does).
    """
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        keep, pos = 0, size
        while pos > 0:
            start = max(0, pos - 65536)
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def check_journal(path: str | Path) -> None:
    """Raise ValueError naming the first line of journal `path` that is not one JSON operation.

    After `repair_journal` every line is complete, so such a line was damaged outside this tool (or
    by an older release that appended after a partial line). Optuna reports one only when a later
    line follows it, possibly in the middle of a run; checking every line up front says so at once.
    """
    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            try:
                op = json.loads(line)
            except ValueError as e:
                raise ValueError(f"line {i}: {e}") from None
            if not isinstance(op, dict) or "op_code" not in op:
                raise ValueError(f"line {i}: not a journal operation")


def _first_line(e: BaseException, n: int = 100) -> str:
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text[:n] + ("..." if len(text) > n else "")


def _journal(path: Path, flag: str):
    """A `JournalStorage` on the journal file `path` (absolute, flock, partial last line cut)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_file():
        raise BadInput(flag, str(path), "a journal file path (this is a folder)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = journal_lock(path)
        with open(path, "ab"):
            pass
        lock.acquire()
        try:
            repair_journal(path)
        finally:
            lock.release()
    except OSError as e:
        raise BadInput(flag, str(path), f"a journal file this user can create and write ({e.strerror or e})") from None
    try:
        check_journal(path)
        return JournalStorage(JournalFileBackend(str(path), lock_obj=lock))
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise BadInput(flag, str(path), f"an intact Optuna journal (this one is damaged: {_first_line(e, 60)}; move "
                       "it away to start the ledger afresh, losing its finished trials)") from None


#: Seconds a PostgreSQL connection attempt may take (an unreachable host fails instead of hanging).
PG_CONNECT_TIMEOUT_S = 10


def _pg_engine(url: str) -> tuple[str, dict]:
    """SQLAlchemy URL and engine options for `url`: a bare ``postgresql://`` (or ``postgres://``)
    URL gets the installed driver (psycopg 3, else psycopg2; SQLAlchemy's default differs by
    release) and a connect timeout; any other URL is passed through."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"):
        return url, {}
    if scheme in ("postgresql", "postgres"):
        import importlib.util

        driver = "psycopg" if importlib.util.find_spec("psycopg") else "psycopg2"
        url = f"postgresql+{driver}{sep}{rest}"
    return url, {"connect_args": {"connect_timeout": PG_CONNECT_TIMEOUT_S}}


#: Optuna's study-name column (``VARCHAR(512)`` on PostgreSQL): a longer --study cannot be stored.
MAX_STUDY_NAME = 512


def check_names(study: str | None = None, **paths) -> None:
    """Refuse, with one line naming the flag, what would otherwise end in a traceback deep in a run:
    an empty ``--study``/``--out``/``--storage``/... (given but empty: never the default), a study name
    longer than `MAX_STUDY_NAME` characters, and a path (keyword = flag without ``--``, e.g.
    ``out=...``) with a component longer than its filesystem allows (``File name too long``)."""
    if study is not None:
        if not str(study).strip():
            raise BadInput("--study", study, "a non-empty study name (leave --study out for the default)")
        if len(str(study)) > MAX_STUDY_NAME:
            raise BadInput("--study", f"{str(study)[:24]}... ({len(str(study))} characters)",
                           f"a study name of at most {MAX_STUDY_NAME} characters (the storage's name column)")
    for name, value in paths.items():
        if value is None:
            continue
        flag = "--" + name.replace("_", "-")
        if not str(value).strip():
            raise BadInput(flag, value, f"a non-empty value (leave {flag} out for the default)")
        if "://" in str(value):
            continue
        path = Path(value)
        first = path if path.is_absolute() else Path.cwd() / path
        while True:
            try:
                first.stat()
                break
            except OSError:
                if first == first.parent:
                    break
                first = first.parent
        try:
            limit = os.pathconf(first, "PC_NAME_MAX")
        except (OSError, ValueError):
            limit = 255
        for part in path.parts:
            if len(os.fsencode(part)) > limit:
                raise BadInput(flag, f"{str(value)[:40]}... ({len(str(value))} characters)",
                               f"a path whose every name is at most {limit} bytes (the filesystem's limit; "
                               f"one here has {len(os.fsencode(part))})")


def safe_url(url) -> str:
    """`url` without its password (``user:secret@`` becomes ``user:***@``, a ``password=`` query
    parameter ``password=***``), for every message,
    hint and manifest that shows a storage URL."""
    import re

    s = re.sub(r"(://[^:/@?#]*):[^/?#]*@", r"\1:***@", str(url))
    return re.sub(r"([?&]password=)[^&]*", r"\1***", s)


def _rdb(url: str, flag: str, attempts: int = 5):
    """An `RDBStorage` on `url`; a creation race (two runs creating one fresh database's tables)
    is retried, anything else is a `BadInput` naming `flag`."""
    from optuna.storages import RDBStorage

    allowed = "a reachable Optuna storage URL, e.g. sqlite:///runs/ledger.db or postgresql://user@host/db"
    engine_url, kwargs = _pg_engine(url)
    for i in range(attempts):
        try:
            return RDBStorage(engine_url, engine_kwargs=kwargs) if kwargs else RDBStorage(engine_url)
        except Exception as e:   # sqlalchemy errors, missing drivers, bad URLs: all one line
            if "already exists" in str(e) and i + 1 < attempts:
                time.sleep(0.2 * (i + 1))
                continue
            raise BadInput(flag, safe_url(url), f"{allowed} ({type(e).__name__}: "
                           f"{safe_url(_first_line(e))})") from None
    raise AssertionError("unreachable")


def journal_or_url(storage: str | Path, flag: str = "--storage"):
    """An Optuna storage: an `RDBStorage` for a URL (anything with ``://``), otherwise a journal
    file at that path (see the module docstring). Problems are `BadInput` naming `flag`."""
    s = str(storage)
    if "://" in s:
        return _rdb(s, flag)
    return _journal(Path(s), flag)


def storage_for(out: Path, storage: str | None, command: str = "sweep"):
    """The ledger of run folder `out`: `storage` (an Optuna URL or journal path) or, by default, a
    journal file ``out/trials.journal``.

    Claims `out` first (`sandbox.results.claim_run_dir`), so a second run on the same folder is
    refused before it touches the ledger and a folder of another command is never written.
    """
    out = Path(out)
    fresh = not out.exists() or all(e.name == LOCK_NAME for e in out.iterdir())   # new (or only just claimed)
    claim_run_dir(out, command)
    try:
        if storage is not None:
            return journal_or_url(storage, "--storage")
        return journal_or_url(out / "trials.journal", "--out")
    except BadInput:
        if fresh:   # leave no empty folder behind a refused storage
            release_run_dir(out)
            (out / LOCK_NAME).unlink(missing_ok=True)
            try:
                out.rmdir()
            except OSError:
                pass
        raise


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


def is_database(storage: str | None) -> bool:
    """True for a PostgreSQL URL (the only storage a plan and workers can use)."""
    return storage is not None and str(storage).split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


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
