"""Settings are declared once: every command's options against the dataclasses they fill, and every
flag that an error message names against the flags the commands really have."""

from __future__ import annotations

import ast
import math
import pathlib
import re

import pytest
import typer.main

from sandbox.app.cli import app
from sandbox.errors import BadInput

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAG = re.compile(r"--[a-z][a-z0-9-]*")
#: Flag-shaped strings that are not ours: arguments of the programs we call.
FOREIGN = {"--porcelain",   # `git status --porcelain` (sandbox.results.git_state)
           "--help"}       # click's help option (sandbox.app.cli adds -h), not a command parameter


def _commands():
    group = typer.main.get_command(app)
    return group, group.commands


def _flags(command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def _defaults(command) -> dict[str, object]:
    return {p.name: p.default for p in command.params}


def _all_flags() -> set[str]:
    group, commands = _commands()
    flags = _flags(group)
    for c in commands.values():
        flags |= _flags(c)
    return flags


def _named_flags() -> dict[str, list[str]]:
    """Every flag a message can name: flag literals, and the fields `require` turns into flags."""
    found: dict[str, list[str]] = {}
    for pkg in ("sandbox", "substrate", "sweeps", "figures"):
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(f.read_text())):
                where = f"{f.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and FLAG.fullmatch(node.value):
                    found.setdefault(node.value, []).append(where)
                if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require" and len(node.args) >= 2
                        and isinstance(node.args[1], ast.Constant)):
                    found.setdefault("--" + node.args[1].value.replace("_", "-"), []).append(where + " (require)")
    return found


def test_every_flag_an_error_can_name_exists():
    flags = _all_flags()
    named = _named_flags()
    assert len(named) > 50   # the scan sees the code
    missing = {k: v for k, v in named.items() if k not in flags and k not in FOREIGN}
    assert not missing, f"messages name flags that no command has: {missing}"


def test_declared_commands_take_their_defaults_from_the_dataclasses():
    """Every option a command builds from a field defaults to that field's value (a cell's router and
    lifecycle knobs: the cell's defaults), or to None with the run-time default said in its help."""
    from sandbox.lifecycle import LifecycleConfig
    from sandbox.router import RouterConfig
    from substrate.cell import CellConfig

    _, commands = _commands()
    cell = CellConfig().flat()
    declared = {name: c for name, c in commands.items() if hasattr(c.callback, "__declared__")}
    assert {"full", "factorial", "fusion", "sweep", "bench"} <= set(declared)
    checked = 0
    for name, command in declared.items():
        defaults = _defaults(command)
        for o in command.callback.__declared__:
            assert defaults[o.name] == (None if o.default is ... else o.default) or o.default is ...
            if o.source is None:
                continue
            cls, field = o.source
            if o.auto:
                assert o.default is None and "(default: " in o.help, f"{name} {o.name}"
            elif cls in (CellConfig, RouterConfig, LifecycleConfig):
                assert o.default == cell[o.name], f"{name} {o.name}"
            else:
                assert o.default == getattr(cls(), field), f"{name} {o.name}"
            assert o.help, f"{name} --{o.name} has no help: document the field"
            checked += 1
    assert checked >= 2 * (len(cell) - 2) + 5   # every knob but cell and seed in full and factorial, and more


def test_every_cell_knob_is_an_option_of_full_and_factorial():
    from substrate.cell import CellConfig

    _, commands = _commands()
    knobs = set(CellConfig().flat()) - {"cell", "seed"}
    for name in ("full", "factorial"):
        assert knobs <= set(_defaults(commands[name])), knobs - set(_defaults(commands[name]))


BAD = ("bogus", -7, math.nan, 10**9, 1.5)


def _bad_values_name_real_flags(make, knobs, flags):
    raised = 0
    for k in knobs:
        for v in BAD:
            try:
                make(k, v)
            except BadInput as e:
                raised += 1
                assert e.flag in flags, f"{k}={v!r}: the error names {e.flag}, not a flag of the command"
            except (TypeError, ValueError) as e:   # only BadInput reaches a user as one line
                pytest.fail(f"{k}={v!r}: {type(e).__name__} {e} instead of BadInput")
    return raised


def test_bad_cell_knobs_name_flags_of_full():
    from substrate.cell import CellConfig

    _, commands = _commands()
    knobs = sorted(set(CellConfig().flat()) - {"cell", "seed", "data", "device"})
    raised = _bad_values_name_real_flags(lambda k, v: CellConfig.of(**{"preset": "tiny", k: v}), knobs,
                                         _flags(commands["full"]))
    assert raised > len(knobs)


def test_bad_analytic_settings_name_flags_of_sweep():
    from dataclasses import fields

    from sandbox.analytic import AnalyticConfig
    from sandbox.tasks import TaskSpec

    _, commands = _commands()
    flags = _flags(commands["sweep"])
    for cls in (AnalyticConfig, TaskSpec):
        knobs = [f.name for f in fields(cls)]
        raised = _bad_values_name_real_flags(lambda k, v: cls(**{k: v}), knobs, flags)
        assert raised > len(knobs)
