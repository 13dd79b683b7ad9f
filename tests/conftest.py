"""Shared test settings: headless plotting, bounded hypothesis runs, a seeded generator fixture."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from hypothesis import HealthCheck, settings

# The test tensors are small: one thread avoids OpenMP oversubscription on shared 2-core machines
# (measured 30-200x slowdowns with the default of 2 threads while other processes ran).
torch.set_num_threads(1)

# The suite is deterministic: the default profile derandomises hypothesis (examples derived from
# each test's own source) and keeps no example database, so every run (CI included) tries the
# same cases. `HYPOTHESIS_PROFILE=explore python -m pytest` is the explicitly random run for
# finding new failing cases; add any it finds as an explicit @example / parametrised case.
settings.register_profile(
    "default", max_examples=60, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "explore", max_examples=300, deadline=None, derandomize=False,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def gen():
    import torch

    return torch.Generator().manual_seed(1234)


# ---------------------------------------------------------------------------------------------
# A PostgreSQL server for the worker tests (tests/test_workers.py)
# ---------------------------------------------------------------------------------------------


def _pg_bindir():
    """The folder holding initdb and pg_ctl: Debian's versioned folder (newest) or the PATH."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda p: int(p.split("/")[-3]) if p.split("/")[-3].isdigit() else 0)
    if found:
        return os.path.dirname(found[-1])
    initdb = shutil.which("initdb")
    return os.path.dirname(initdb) if initdb and shutil.which("pg_ctl") else None


def _pg_plan():
    """How this run gets a PostgreSQL server, as ``(bindir, user, reason)``: ``reason`` is None when
    one can be had (``$MOLORA_PG_URL``, or a throwaway server from ``bindir`` started as ``user``:
    the server refuses root, so as root it runs as ``postgres``, else ``nobody``), or the one line
    that says why the database tests skip."""
    import importlib.util
    import pwd

    if not (importlib.util.find_spec("psycopg") or importlib.util.find_spec("psycopg2")):
        return None, None, "no PostgreSQL driver: pip install -e '.[dev]'"
    if os.environ.get("MOLORA_PG_URL"):
        return None, None, None
    bindir = _pg_bindir()
    if bindir is None:
        return None, None, "no PostgreSQL server binaries (initdb, pg_ctl): install them or set MOLORA_PG_URL"
    user = None
    if os.geteuid() == 0:
        for name in ("postgres", "nobody"):
            try:
                user = pwd.getpwnam(name)
                break
            except KeyError:
                continue
        else:
            return None, None, "running as root without a 'postgres' or 'nobody' user to start PostgreSQL as; set MOLORA_PG_URL"
    return bindir, user, None


#: Where the session's database tests got their server (set by the pg_url fixture), for the summary.
_PG_USED: list[str] = []


def pytest_terminal_summary(terminalreporter):
    """One line at the end saying why the database tests (tests/test_workers.py) skipped, or where
    they got their server (pytest's -q hides the header, so the line goes in the summary)."""
    reason = _pg_plan()[2]
    if reason is not None:
        terminalreporter.write_line(f"postgresql: none, the database tests skipped ({reason})")
    elif _PG_USED:
        terminalreporter.write_line(f"postgresql: {_PG_USED[0]}")


class PgServer:
    """The session's PostgreSQL server: its `url`, and for a throwaway server started here (not
    ``$MOLORA_PG_URL``) `stop` (``pg_ctl stop -m immediate``: a crash, every connection cut) and
    `start` (same data folder, same socket), for the tests that restart the database under workers."""

    def __init__(self, url, bindir=None, data=None, folder=None, as_user=None):
        self.url, self.bindir, self.data, self.folder, self._as_user = url, bindir, data, folder, as_user

    @property
    def restartable(self) -> bool:
        return self.data is not None

    def _pg_ctl(self, *args):
        import os

        return self._as_user(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, *args)

    def stop(self) -> None:
        r = self._pg_ctl("-m", "immediate", "-w", "stop")
        assert r.returncode == 0, (r.stderr or r.stdout)[-300:]

    def start(self) -> None:
        import os

        r = self._pg_ctl("-l", os.path.join(self.folder, "server.log"), "-w", "-t", "60", "-o",
                         f"-k {self.folder} -c listen_addresses='' -c fsync=off -c max_connections=200", "start")
        assert r.returncode == 0, (r.stderr or r.stdout)[-300:]


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server (`PgServer`): ``$MOLORA_PG_URL`` when set (an existing server; it always
    wins; not restartable), else a throwaway server started here (initdb + pg_ctl in a temporary
    folder, Unix socket only, no TCP port; as an unprivileged user when running as root) and
    stopped at the end of the session; skipped with the one-line reason when neither is possible.
    Tests isolate themselves by study name. ``MOLORA_PG_URL`` is also set for the session, so
    subprocesses the tests start see it."""
    import shutil
    import subprocess
    import tempfile

    bindir, user, reason = _pg_plan()
    if reason is not None:
        pytest.skip(reason)
    url = os.environ.get("MOLORA_PG_URL")
    if url:
        _PG_USED.append("the server at $MOLORA_PG_URL")
        yield PgServer(url)
        return
    folder = tempfile.mkdtemp(prefix="molora-pg-", dir="/tmp")
    if user is not None:
        os.chown(folder, user.pw_uid, user.pw_gid)

    def as_user(*cmd):
        pre = {"user": user.pw_name} if user is not None else {}
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, cwd=folder, **pre)

    data = os.path.join(folder, "data")
    r = as_user(os.path.join(bindir, "initdb"), "-D", data, "-A", "trust", "-U", "molora", "--no-sync", "-E", "UTF8")
    if r.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed: {(r.stderr or r.stdout).strip()[-200:]}")
    server = PgServer(f"postgresql://molora@/postgres?host={folder}", bindir, data, folder, as_user)
    try:
        server.start()
    except AssertionError:
        log = os.path.join(folder, "server.log")
        tail = open(log).read()[-200:] if os.path.exists(log) else "pg_ctl start failed"
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {tail.strip()}")
    os.environ["MOLORA_PG_URL"] = server.url
    who = f" as {user.pw_name}" if user is not None else ""
    _PG_USED.append(f"a throwaway server from {bindir}{who}, stopped at the end")
    try:
        yield server
    finally:
        os.environ.pop("MOLORA_PG_URL", None)
        as_user(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_url(pg_server):
    """The session's PostgreSQL URL (`pg_server`)."""
    return pg_server.url
