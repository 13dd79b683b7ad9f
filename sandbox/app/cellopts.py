"""The cell options shared by `sandbox full` and `sandbox factorial`: every knob of
`substrate.config.CellConfig` (its router and lifecycle knobs under their flat names), the run
options (cache, threads, --yes), and `cell_template`, which builds the validated `CellConfig` from
what the command received.

Defaults that depend on the machine come from `substrate.defaults`: with CUDA the preset is
widened-1536 for 25,000 steps; on a CPU it is `small` for 200 steps, and the command says so.
The lifecycle's schedule (`--lifecycle-every`, the old `--interval`), minimum age, evaluation and
checkpoint intervals default to values scaled to the step count (`substrate.defaults.schedule`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:   # the annotations only: the commands import the substrate lazily
    from sandbox.app.declare import Received
    from substrate.config import CellConfig

from substrate.defaults import CPU_PRESET, GPU_PRESET, PRESET_BASES, PRESET_STEPS, ROUTER_LR_RATIO

#: Run-time defaults of the cell options (`sandbox.app.declare`): keyword -> what None resolves to.
AUTO = {
    "preset": f"{GPU_PRESET} with CUDA, {CPU_PRESET} on a CPU",
    "steps": ", ".join(f"{n} for {p}" for p, n in PRESET_STEPS.items())
             + f"; with no --preset, {GPU_PRESET} on CUDA and {CPU_PRESET} on CPU",
    "device": "cuda when visible, else cpu",
    "router_lr": f"{ROUTER_LR_RATIO:g} x --lr",
    "eval_every": "steps/5, at most 1000",
    "checkpoint_every": "--eval-every",
    "lifecycle_every": "steps/5, at least 5 and at most 250",
    "min_age": "2 x --lifecycle-every, at most 500",
    "bases": ", ".join(f"{n} on {p}" for p, n in PRESET_BASES.items()) + "; 1 with --seeds-to-resolve",
    "train_data": "fresh when the run would read each fixed window more than once, else windows; windows with --data",
}


def cell_options() -> list:
    """Every knob of `substrate.cell.CellConfig` as an option, the nested router and lifecycle knobs
    under their flat names (`substrate.cell.NESTED`); ``cell`` and ``seed`` are the commands' own."""
    from dataclasses import fields

    from sandbox.app.declare import from_fields, own
    from sandbox.lifecycle import LifecycleConfig
    from sandbox.router import RouterConfig
    from substrate.cell import CELL_LIFECYCLE, CELL_ROUTER, NESTED, CellConfig

    top = [f.name for f in fields(CellConfig) if f.name not in ("cell", "seed", "router", "lifecycle")]
    opts = from_fields(CellConfig, top, auto=AUTO)    # router_kind is --router-kind (--router means softmax|sigmoid)
    opts.append(own("router_legacy", None, "--router", annotation=Optional[str], hidden=True,
                    help="Deprecated name of --router-kind (auto|acar)."))
    for group, cls, inst in (("router", RouterConfig, CELL_ROUTER), ("lifecycle", LifecycleConfig, CELL_LIFECYCLE)):
        mine = {k: f for k, (g, f) in NESTED.items() if g == group}
        # lifecycle.interval (flat name `interval` in identities) is --lifecycle-every
        rename = {f: ("lifecycle_every" if k == "interval" else k) for k, f in mine.items()}
        opts += from_fields(cls, list(mine.values()), instance=inst, rename=rename, auto=AUTO)
    opts.append(own("interval", None, "--interval", annotation=Optional[int], hidden=True,
                    help="Deprecated name of --lifecycle-every."))
    return opts


def run_options() -> list:
    """The execution settings shared by `full` and `factorial` (not part of a cell's identity)."""
    from sandbox.app.declare import own

    return [own("cache", "runs/cache", "--cache", help="Cache folder for corpora, pretrained bases and specialists."),
            own("threads", None, "--threads", annotation=Optional[int],
                help="torch CPU threads (default: 1 on machines with <= 2 cores, else torch's default)."),
            own("yes", False, "--yes", help="Run widened-1536 on a CPU anyway (it takes weeks there; refused without it).")]


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads. On <= 2 shared cores two threads made the `small` adaptation step up to
    7x slower (BENCHMARKS.md), so the default there is one; elsewhere torch's own default stays."""
    import os

    import torch

    from sandbox.options import check_int

    if threads is not None:
        torch.set_num_threads(check_int(threads, "--threads", 1, 256))
    elif (os.cpu_count() or 1) <= 2:
        torch.set_num_threads(1)


def cell_template(cell: str, seed: int, got: "Received", say, yes: bool = False,
                  one_base: bool = False) -> "CellConfig":
    """A validated `CellConfig` from the cell options the command received (`got`: `cell_options`
    among its options), resolving device and defaults (``bases``: `substrate.defaults.PRESET_BASES`,
    or 1 with `one_base`). widened-1536 on a CPU is refused unless `yes` (`check_affordable`)."""
    from sandbox.errors import BadInput
    from sandbox.lifecycle import LifecycleConfig
    from sandbox.router import RouterConfig
    from substrate.cell import CELL_LIFECYCLE, CELL_ROUTER, CellConfig
    from substrate.defaults import check_affordable, choose_run, resolve_device, schedule

    top = got.fields(CellConfig)
    legacy = got["router_legacy"]
    if legacy is not None:      # the old flag name of --router-kind, kept so scripts keep working
        if top.get("router_kind", "auto") not in ("auto", legacy):
            raise BadInput("--router", legacy,
                           f"the same value as --router-kind ({top['router_kind']}), or only one of them")
        top["router_kind"] = legacy
        say("note: --router is the old name of --router-kind on full and factorial (auto|acar); use --router-kind")
    every, every_flag = got["lifecycle_every"], "--lifecycle-every"
    old = got["interval"]
    if old is not None:         # the old flag name of --lifecycle-every (the same meaning: lifecycle events)
        if every is None:       # the new name, when given too, wins (a replay's override)
            every, every_flag = old, "--interval"
    device = resolve_device(got["device"])
    preset, steps, note = choose_run(got["preset"], got["steps"], device)
    times = schedule(steps, every, got["min_age"], got["eval_every"], got["checkpoint_every"], interval_flag=every_flag)
    bases = got["bases"] if got["bases"] is not None else 1 if one_base else PRESET_BASES.get(preset, 1)
    if top.get("data") is not None and not Path(top["data"]).is_dir():
        raise BadInput("--data", top["data"], "a folder with one subfolder of .txt files per domain")
    # validates every knob (the nested router and lifecycle first, as `CellConfig.of` does)
    cfg = got.build(CellConfig, cell=cell, seed=seed, preset=preset, steps=steps, device=device, bases=bases,
                    eval_every=times["eval_every"], checkpoint_every=times["checkpoint_every"],
                    router_kind=top.get("router_kind", "auto"),
                    router=got.build(RouterConfig, on=CELL_ROUTER),
                    lifecycle=got.build(LifecycleConfig, on=CELL_LIFECYCLE, interval=times["interval"],
                                        min_age=times["min_age"]))
    check_affordable(cfg, yes)
    if old is not None:         # said when the command has finished (an error stays one line)
        from sandbox.app.notes import later

        later("note: --interval is the old name of --lifecycle-every on full and factorial; use --lifecycle-every")
    if note:
        say(note)
    return cfg
