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


def test_full_router_kind_and_its_old_name(capsys, tmp_path):
    """`full`/`factorial` call the router kind --router-kind (auto|acar), as --router means
    softmax|sigmoid on `sweep`; the old name still works (hidden) and maps to the same field."""
    base = ["--cell", "B3", "--preset", "tiny", "--slots", "2", "--domains", "2", "--out", str(tmp_path / "f")]
    for cmd in ("full", "factorial"):
        b = [w if w != "--cell" else ("--cell" if cmd == "full" else "--cells") for w in base]
        for flag in ("--router-kind", "--router"):
            assert main([cmd, *b, flag, "acar"]) == 2
            err = capsys.readouterr().err
            assert "--slots" in err and "at least 3 with --router-kind acar" in err, err
        assert main([cmd, *b, "--router-kind", "bogus"]) == 2
        assert capsys.readouterr().err.count("\n") == 1
        assert main([cmd, *b, "--router-kind", "acar", "--router", "auto"]) == 2
        assert capsys.readouterr().err.startswith("error: --router 'auto'")
    assert "--router-kind" in _help("full") and "Deprecated" not in _help("full")


def _help(cmd: str) -> str:
    from typer.testing import CliRunner

    from sandbox.app.cli import app

    return CliRunner().invoke(app, [cmd, "--help"], terminal_width=200).output
