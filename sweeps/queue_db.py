"""The PostgreSQL database under the worker queue (`sweeps.worker`): the only storage it accepts
(`database`), riding out outages (`Patience`), the plan lock (`plan_lock`) and a study's id.

- Storage: PostgreSQL only. SQLite and the journal file are refused for workers: they have no row
  locks across machines (the journal's lock is a local ``flock``) and no heartbeats, so a killed
  worker's trial could never be re-run; a single process runs them without workers.
- The database goes away (restart, failover, network): every storage step of a worker goes through
  `Patience`, which retries connection errors (`transient`) with capped exponential backoff for
  ``wait_s`` (the worker's ``--db-wait``, default 300 s, printed when it starts waiting) and then
  raises `StorageUnavailable` (one line naming the storage and the time waited). It counts the
  outages ridden out and the seconds waited, and after an outage keeps the worker from declaring
  anybody lost for a grace period (every worker's heartbeat stopped during it, not only the dead
  ones').
- `plan_lock`: a PostgreSQL advisory transaction lock on the study, held by every define step and
  every re-queue, so a key is added once however many of them run at the same moment.
"""

from __future__ import annotations

import hashlib
import threading
import time
from contextlib import contextmanager
from typing import Callable

from sandbox.errors import BadInput
from sweeps import ledger
from sweeps.ledger import is_database
from sweeps.ledger import safe_url as _safe_url

_DB_ALLOWED = ("a postgresql:// URL of a reachable server (workers claim trials under the database's "
               "row locks and keep heartbeats in it)")


class StorageUnavailable(BadInput):
    """The database stayed unreachable for the worker's whole ``--db-wait``: one line, exit 2."""

    def __init__(self, storage: str, waited_s: float, error: str):
        super().__init__("--storage", storage, f"a reachable database (unreachable for {waited_s:.0f} s, "
                         f"the --db-wait limit; last error: {error})")


def transient(e: BaseException) -> bool:
    """True for a lost or refused database connection (a restart, a failover, the network), as
    SQLAlchemy or Optuna (``StorageInternalError`` wrapping it) raise it; False for anything else."""
    import sqlalchemy.exc as sx
    from optuna.exceptions import StorageInternalError

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, (sx.OperationalError, sx.InterfaceError, sx.DisconnectionError, sx.PendingRollbackError)):
            return True
        if isinstance(e, sx.DBAPIError) and getattr(e, "connection_invalidated", False):
            return True
        if not isinstance(e, (StorageInternalError, sx.SQLAlchemyError)):
            return False
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class Patience:
    """Retry storage steps through database outages: capped exponential backoff (`first_s`,
    doubling up to `cap_s`) for at most `wait_s` per step, then `StorageUnavailable`.

    Counts what it did: `reconnects` (outages ridden out, whether a storage step or the heartbeat
    thread saw them) and `waited_s` (seconds the database was unreachable); `quiet_until` is the
    monotonic time before which this worker declares nobody lost (every worker's heartbeat stopped
    during the outage, not only the dead ones'). Thread-safe: the heartbeat thread reports too.
    """

    def __init__(self, storage: str, wait_s: float = 300.0, first_s: float = 0.25, cap_s: float = 8.0,
                 log: Callable[[str], None] | None = None, grace_s: float = 0.0):
        self.storage, self.wait_s, self.first_s, self.cap_s, self.log = storage, wait_s, first_s, cap_s, log
        self.grace_s = grace_s
        self.reconnects, self.waited_s, self.quiet_until = 0, 0.0, 0.0
        self._down_since: float | None = None
        self._lock = threading.Lock()

    def down(self, e: BaseException) -> None:
        """The database is unreachable (the first report of an outage prints one line)."""
        with self._lock:
            if self._down_since is not None:
                return
            self._down_since = time.monotonic()
        if self.log:
            self.log(f"worker: database {_safe_url(self.storage)} unreachable ({_first_line(e, 100)}); "
                     f"retrying for up to {self.wait_s:g} s (--db-wait)")

    def back(self) -> None:
        """The database answered again: count the outage, keep quiet for the grace period."""
        with self._lock:
            if self._down_since is None:
                return
            now = time.monotonic()
            waited, self._down_since = now - self._down_since, None
            self.reconnects += 1
            self.waited_s += waited
            self.quiet_until = now + self.grace_s
        if self.log:
            self.log(f"worker: database back after {waited:.1f} s")

    def __call__(self, fn: Callable, *args, **kwargs):
        t0, delay = None, self.first_s
        while True:
            try:
                out = fn(*args, **kwargs)
            except Exception as e:
                if not transient(e):
                    raise
                self.down(e)
                now = time.monotonic()
                t0 = now if t0 is None else t0
                if now - t0 >= self.wait_s:
                    with self._lock:
                        if self._down_since is not None:
                            self.waited_s += now - self._down_since
                            self._down_since = None
                    raise StorageUnavailable(_safe_url(self.storage), now - t0, _first_line(e, 120)) from None
                time.sleep(max(0.01, min(delay, self.wait_s - (now - t0))))
                delay = min(delay * 2, self.cap_s)
                continue
            self.back()
            return out


def database(storage: str | None, flag: str = "--storage"):
    """An `RDBStorage` on the PostgreSQL URL `storage`; anything else is a one-line `BadInput`.

    SQLite and the journal file are refused: a journal's lock is a local ``flock`` and SQLite's a
    file lock, neither works across machines, and neither keeps heartbeats, so a killed worker's
    trial could never be re-run. Several workers on one machine also need a (local) PostgreSQL
    server; one process with the journal needs no worker at all (plain ``sandbox sweep``).
    """
    s = str(storage) if storage is not None else ""
    if not s:
        raise BadInput(flag, s, _DB_ALLOWED)
    if not is_database(s):
        kind = ("a SQLite file" if s.startswith("sqlite") else "a journal file" if "://" not in s
                else f"a {s.split('://', 1)[0]} URL")
        raise BadInput(flag, s, f"a postgresql:// URL, not {kind}: workers on one or several machines claim trials "
                       "under PostgreSQL row locks and heartbeats (start a server as in the README); without "
                       "workers, run the sweep/factorial command itself on the journal or SQLite")
    return ledger.journal_or_url(s, flag)


@contextmanager
def plan_lock(store, study_name: str):
    """Hold PostgreSQL's advisory transaction lock of `study_name` (one definer/requeuer at a time).

    The lock lives in a transaction on its own connection and is released when the block ends, and
    by the server if this process dies (its connection closes)."""
    from sqlalchemy import text

    k = int.from_bytes(hashlib.sha256(f"molora-plan:{study_name}".encode()).digest()[:8], "big", signed=True)
    with store.engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": k})
        yield


def _study_id(store, name: str, flag: str = "--study") -> int:
    try:
        return store.get_study_id_from_name(name)
    except KeyError:
        names = sorted(s.study_name for s in store.get_all_studies())
        raise BadInput(flag, name, "a study defined on this --storage with `sandbox sweep|factorial --enqueue-only` "
                       f"(it holds: {', '.join(names[:8]) or 'none'}{', ...' if len(names) > 8 else ''})") from None


def _first_line(e: BaseException, n: int = 300) -> str:
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {text[:n]}" if text else type(e).__name__
