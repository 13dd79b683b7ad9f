"""Help for users: -h everywhere, options grouped by concern, no design notes in option help, and
report tables that never break a number across lines."""

from __future__ import annotations

import re

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from sandbox.app.cli import app
from sandbox.app.commands.report import column_style
from sandbox.app.declare import user_help


def _help(*words: str) -> str:
    r = CliRunner().invoke(app, [*words], terminal_width=160)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.parametrize("cmd", ["full", "sweep", "factorial", "report", "export", "bench"])
def test_dash_h_is_help(cmd):
    assert _help(cmd, "-h") == _help(cmd, "--help")


def test_options_are_grouped_by_concern():
    out = _help("full", "-h")
    for panel in ("Run and output", "Cell and substrate", "Router", "Lifecycle"):
        assert f"─ {panel} ─" in out, panel
    # --anneal-steps sits in the Router panel, --out in Run and output
    router = out.split("─ Router ─")[1].split("╰")[0]
    assert "--anneal-steps" in router and "--out " not in router


def test_option_help_has_no_design_notes():
    for cmd in ("full", "factorial", "sweep"):
        out = " ".join(_help(cmd, "-h").split())
        for leak in ("None leaves it", "the class default", "substrate.defaults.", "temperature refuses it"):
            assert leak not in out, (cmd, leak)
    assert user_help("Length of the anneal (0 = tau_end from the start); None leaves it to the owner (a cell "
                     "anneals over its run's steps), and temperature refuses it.") == \
        "Length of the anneal (0 = tau_end from the start)."


def test_numbers_are_never_broken_across_lines():
    texts = ["8.543e-13", "0.0426", "+0.015"]
    t = Table()
    t.add_column("contrast", **column_style(["router R", "lifecycle L", "full"], False))
    t.add_column("p", **column_style(texts, False))
    for name, v in zip(("router R", "lifecycle L", "full"), texts):
        t.add_row(name, v)
    console = Console(width=24, record=True)
    console.print(t)
    out = console.export_text()
    for v in texts:
        assert re.search(re.escape(v), out), (v, out)
