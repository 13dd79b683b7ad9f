"""The command line: help, version, and the one-line exit-2 error contract."""

import subprocess
import sys

import pytest

from sandbox.app.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "sandbox.app.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_and_version():
    r = run_cli("--help")
    assert r.returncode == 0 and "cells" in r.stdout
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("sandbox ")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["cells", "--cells", "R+X"], "--cells"),
        (["cells", "--bogus"], "--bogus"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(args, flag):
    r = run_cli(*args)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in r.stderr


def test_main_returns_code_in_process(capsys):
    assert main(["cells", "--cells", "partial"]) == 0
    assert "R+E+L" in capsys.readouterr().out
    assert main(["cells", "--cells", "Q"]) == 2
