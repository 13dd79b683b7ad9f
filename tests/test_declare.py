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


#: Commands whose options are all their own (a worker's queue settings, a folder to report or export):
#: no config field behind them, so they are plain typer functions. Every other command declares its
#: options (`sandbox.app.declare`).
UNDECLARED = {"cells", "export", "report", "worker"}


def test_every_option_maps_to_one_field_or_is_the_commands_own():
    """Every visible option of every command is either built from exactly one config field or declared
    as the command's own, and no two options of one command fill the same field (so a flat name is
    never ambiguous within a command)."""
    import dataclasses

    _, commands = _commands()
    assert set(commands) - UNDECLARED == {"bench", "factorial", "full", "fusion", "sweep"}
    mapped = 0
    for name, command in sorted(commands.items()):
        visible = {p.name for p in command.params if not getattr(p, "hidden", False)}
        if name in UNDECLARED:
            assert not hasattr(command.callback, "__declared__"), name
            continue
        opts = {o.name: o for o in command.callback.__declared__}
        assert visible <= set(opts), f"{name}: options not declared: {visible - set(opts)}"
        assert {p.name for p in command.params} == set(opts), name
        sources = [o.source for o in opts.values() if o.source is not None]
        twice = {s for s in sources if sources.count(s) > 1}
        assert not twice, f"{name}: two options fill one field: {twice}"
        for o in opts.values():
            if o.source is not None:
                cls, field = o.source
                assert field in {f.name for f in dataclasses.fields(cls)}, f"{name} --{o.name}: {cls.__name__}.{field}"
                mapped += 1
    assert mapped > 150        # the walk sees the options (full and factorial alone carry every cell knob)


def _received(command: str, **changed):
    from sandbox.app.declare import Received

    _, commands = _commands()
    opts = commands[command].callback.__declared__
    values = {o.name: (None if o.default is ... else o.default) for o in opts}
    assert set(changed) <= set(values), set(changed) - set(values)
    return Received(opts, {**values, **changed})


def test_received_options_build_the_configs_they_came_from():
    """`Received.build` is the inverse of `from_fields`: a command's defaults build the class defaults
    back (nested configs filled, auto options left to the config), and a changed option lands in the
    field it was built from, under whatever keyword the command gave it."""
    from sandbox.analytic import AnalyticConfig
    from sandbox.tasks import TaskSpec
    from sandbox.tuning import TuneConfig
    from substrate.fusion import FusionConfig
    from sweeps.fusion import FusionSweepConfig
    from sweeps.grid import SweepConfig

    assert _received("sweep").build(SweepConfig) == SweepConfig()
    got = _received("sweep", context_noise=0.25, search_every=7, steps=33, tune="off", converged_frac=0.5)
    cfg = got.build(SweepConfig)
    assert (cfg.task.context_noise, cfg.solver.interval, cfg.solver.steps, cfg.tune.mode, cfg.converged_frac) == \
        (0.25, 7, 33, "off", 0.5)
    assert got.fields(AnalyticConfig)["interval"] == 7 and "batch" not in got.fields(AnalyticConfig)   # auto, None
    assert got.build(SweepConfig, task=TaskSpec(dim=8)).task == TaskSpec(dim=8)     # a given nested config wins
    assert got.build(TuneConfig, lrs=(0.1,)).lrs == (0.1,) and got["tune"] == "off"
    assert _received("fusion").build(FusionSweepConfig, base={"device": "cpu"}) == \
        FusionSweepConfig(base=FusionConfig(device="cpu"))


#: A value for each option both systems of `sandbox sweep` read (`Opt.systems`), other than either
#: system's default.
SHARED_SWEEP_VALUES = {"steps": 7, "lr": 0.0123, "batch": 3, "plasticity": 0.5, "reset_on_accept": True, "acar": True,
                       "population": 6, "mutation_scale": 0.07, "evo": "cma", "search_every": 3, "router": "sigmoid",
                       "points": 2, "seeds": "2", "eps": 0.02, "alpha": 0.1, "axis_points": 2}


class _Built(Exception):
    """Raised in place of a sweep's run once its config is built."""


def _sweep_config(monkeypatch, folder: pathlib.Path, system: str, **changed):
    """The config `sandbox sweep --system SYSTEM` builds from its defaults and `changed`, caught where
    the command hands it to the system's run (`sweeps.grid.run_sweep`, `sweeps.substrate_map.run_substrate_sweep`)."""
    import sweeps.grid
    import sweeps.substrate_map

    caught = []

    def catch(cfg, *args, **kwargs):
        caught.append(cfg)
        raise _Built

    monkeypatch.setattr(sweeps.grid, "run_sweep", catch)
    monkeypatch.setattr(sweeps.substrate_map, "run_substrate_sweep", catch)
    _, commands = _commands()
    out = folder / f"{system}-{len(list(folder.iterdir()))}"
    got = _received("sweep", system=system, out=str(out), cache=str(folder / "cache"), **changed)
    with pytest.raises(_Built):
        commands["sweep"].callback.__wrapped_command__(got)
    return caught[0]


def _instances(cfg, cls: type) -> list:
    """Every config of class `cls` in the tree of dataclasses `cfg` (itself included)."""
    import dataclasses

    found = [cfg] if isinstance(cfg, cls) else []
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            found += _instances(v, cls)
    return found


def test_options_both_sweep_systems_read_lead_to_a_field_in_each(monkeypatch, tmp_path):
    """`sandbox sweep`'s options that both --system analytic and --system substrate read declare the
    field each fills in each system's config (`Opt.systems`): every declared field exists, and each
    system's builder puts a changed option there (the built config differs in that field and, where the
    option is the field's value, holds it)."""
    import dataclasses

    from sandbox.analytic import AnalyticConfig
    from sweeps.substrate_map import SubstrateSweepConfig

    _, commands = _commands()
    opts = {o.name: o for o in commands["sweep"].callback.__declared__}
    assert {n for n, o in opts.items() if o.systems} == set(SHARED_SWEEP_VALUES)
    assert opts["steps"].source_for("analytic") == (AnalyticConfig, "steps") == opts["steps"].source
    assert opts["points"].source_for("substrate") == (SubstrateSweepConfig, "points")
    assert opts["tune"].source_for("substrate") == opts["tune"].source   # not shared: its one source
    checked = 0
    for system in ("analytic", "substrate"):
        default = _sweep_config(monkeypatch, tmp_path, system)
        for name, value in SHARED_SWEEP_VALUES.items():
            assert {s for s, _ in opts[name].systems} == {"analytic", "substrate"}, name
            cls, field = opts[name].source_for(system)
            assert field in {f.name for f in dataclasses.fields(cls)}, f"--{name} on {system}: {cls.__name__}.{field}"
            changed = _sweep_config(monkeypatch, tmp_path, system, **{name: value})
            before, after = _instances(default, cls), _instances(changed, cls)
            assert before and len(before) == len(after), f"--{name} on {system}: no {cls.__name__} in the config"
            assert all(getattr(a, field) != getattr(b, field) for a, b in zip(after, before)), \
                f"--{name} on {system} does not reach {cls.__name__}.{field}"
            if name not in ("router", "seeds"):   # the cell B3|R; a count of seeds
                assert all(getattr(a, field) == value for a in after), f"--{name} on {system}"
            checked += 1
    assert checked == 2 * len(SHARED_SWEEP_VALUES)


def test_received_cell_options_replace_the_cells_own_router_and_lifecycle():
    from sandbox.app.cellopts import cell_template
    from sandbox.lifecycle import LifecycleConfig
    from sandbox.router import RouterConfig
    from substrate.cell import CELL_LIFECYCLE, CELL_ROUTER, CellConfig

    got = _received("full")
    assert got.build(RouterConfig, on=CELL_ROUTER) == CELL_ROUTER
    assert got.build(LifecycleConfig, on=CELL_LIFECYCLE) == CELL_LIFECYCLE        # --lifecycle-every: auto, None
    got = _received("full", cell="R+L", device="cpu", preset="tiny", steps=40, router_init="zero", n_die=2,
                    lifecycle_every=4, lr=1e-3)
    cfg = cell_template("R+L", 7, got, print)
    assert cfg == CellConfig.of(cell="R+L", seed=7, preset="tiny", steps=40, device="cpu", bases=3, router_init="zero",
                                n_die=2, interval=4, min_age=8, eval_every=8, checkpoint_every=8, lr=1e-3)


def test_received_refuses_options_it_was_not_declared_with():
    from sandbox.app.declare import Received, own

    opts = [own("out", None, "--out", help="x")]
    with pytest.raises(TypeError, match="not received: \\['out'\\]"):
        Received(opts, {})
    with pytest.raises(TypeError, match="not declared: \\['extra'\\]"):
        Received(opts, {"out": None, "extra": 1})
