"""The Optuna storage under every ledger (`sweeps.ledger`): journal files and their locks,
database URLs, the run folder's default journal and checks of names and paths.

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
import os
import time
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileOpenLock

from sandbox.errors import BadInput
from sandbox.results import FILE_MODE, LOCK_NAME, claim_run_dir, release_run_dir

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


def is_database(storage: str | None) -> bool:
    """True for a PostgreSQL URL (the only storage a plan and workers can use)."""
    return storage is not None and str(storage).split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")
