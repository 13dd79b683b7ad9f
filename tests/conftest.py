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


@pytest.fixture(scope="session")
def pg_url():
    """A PostgreSQL URL: ``$MOLORA_PG_URL`` (CI's server, started by .ci/run), or a throwaway server
    started here (initdb + pg_ctl in a temporary folder, Unix socket only, as the ``postgres`` user
    when running as root: the server refuses root) and stopped at the end; skipped with the reason
    when neither is possible. Tests isolate themselves by study name."""
    import importlib.util
    import pwd
    import shutil
    import subprocess
    import tempfile

    if not (importlib.util.find_spec("psycopg") or importlib.util.find_spec("psycopg2")):
        pytest.skip("no PostgreSQL driver: pip install -e '.[postgres]'")
    url = os.environ.get("MOLORA_PG_URL")
    if url:
        yield url
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server: set MOLORA_PG_URL or install the server (initdb, pg_ctl)")
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root without a 'postgres' user to start PostgreSQL as; set MOLORA_PG_URL")
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
    r = as_user(os.path.join(bindir, "pg_ctl"), "-D", data, "-l", os.path.join(folder, "server.log"), "-w", "-t", "30",
                "-o", f"-k {folder} -c listen_addresses='' -c fsync=off -c max_connections=200", "start")
    if r.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {(r.stderr or r.stdout).strip()[-200:]}")
    try:
        yield f"postgresql://molora@/postgres?host={folder}"
    finally:
        as_user(os.path.join(bindir, "pg_ctl"), "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)
