"""`sandbox full --cell CELL`: one factorial cell on the transformer substrate, one run folder per seed.

The knob options are shared with `sandbox factorial` (`cell_template` builds the `CellConfig`).
Defaults that depend on the machine come from `substrate.defaults`: with CUDA the preset is
widened-1536 for 25,000 steps; on a CPU it is `small` for 200 steps, and the command says so.
The lifecycle's schedule (`--lifecycle-every`, the old `--interval`), minimum age, evaluation and
checkpoint intervals default to values scaled to the step count (`substrate.defaults.schedule`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:   # the annotation only: the command imports the substrate lazily
    from substrate.config import CellConfig

import typer

from sandbox.app.replay import recorded_argv

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


def cell_template(cell: str, seed: int, kw: dict, say, yes: bool = False, one_base: bool = False) -> "CellConfig":
    """A validated `CellConfig` from the command's options (`kw`), resolving device and defaults
    (``bases``: `substrate.defaults.PRESET_BASES`, or 1 with `one_base`). widened-1536 on a CPU is
    refused unless `yes` (`check_affordable`)."""
    from sandbox.errors import BadInput
    from substrate.cell import CellConfig
    from substrate.defaults import check_affordable, choose_run, resolve_device, schedule

    legacy = kw.pop("router_legacy", None)
    if legacy is not None:      # the old flag name of --router-kind, kept so scripts keep working
        if kw.get("router_kind", "auto") not in ("auto", legacy):
            raise BadInput("--router", legacy, f"the same value as --router-kind ({kw['router_kind']}), or only one of them")
        kw["router_kind"] = legacy
        say("note: --router is the old name of --router-kind on full and factorial (auto|acar); use --router-kind")
    every, every_flag = kw.pop("lifecycle_every", None), "--lifecycle-every"
    old = kw.pop("interval", None)
    if old is not None:         # the old flag name of --lifecycle-every (the same meaning: lifecycle events)
        if every is None:       # the new name, when given too, wins (a replay's override)
            every, every_flag = old, "--interval"
    device = resolve_device(kw.pop("device"))
    preset, steps, note = choose_run(kw.pop("preset"), kw.pop("steps"), device)
    kw.update(schedule(steps, every, kw.pop("min_age"), kw.pop("eval_every"), kw.pop("checkpoint_every"),
                       interval_flag=every_flag))
    if kw.get("bases") is None:
        kw["bases"] = 1 if one_base else PRESET_BASES.get(preset, 1)
    if kw.get("data") is not None and not Path(kw["data"]).is_dir():
        raise BadInput("--data", kw["data"], "a folder with one subfolder of .txt files per domain")
    cfg = CellConfig.of(cell=cell, seed=seed, preset=preset, steps=steps, device=device, **kw)   # validates every knob
    check_affordable(cfg, yes)
    if old is not None:         # said when the command has finished (an error stays one line)
        from sandbox.app.notes import later

        later("note: --interval is the old name of --lifecycle-every on full and factorial; use --lifecycle-every")
    if note:
        say(note)
    return cfg


def _full_options() -> list:
    from sandbox.app.declare import own

    return [own("cell", ..., "--cell", annotation=str,
                help="Factors: B3, R, E, L, R+E, L+R, E+L, R+E+L; order and case free."),
            own("seeds", "42,", "--seeds", help="Seeds: a comma list (42,137,2026) or a count; one run folder per seed."),
            own("out", None, "--out", help="Output folder (default runs/full-<cell>-<hash>); seed s goes to OUT/seed-s."),
            own("overwrite", False, "--overwrite", help="Replace the --out folder whole (a run folder of this tool holding another configuration: its tables, figures, journal and checkpoints are removed). Without it a folder holding another configuration is refused; the same configuration resumes."),
            own("stop_after", None, "--stop-after", annotation=Optional[int], hidden=True,
                help="Stop each run after this many steps in this invocation."),
            *cell_options(), *run_options()]


def full(**kw) -> None:
    """Run one factorial cell (R: sigmoid router on hidden states; E: per-domain fitness; L: lifecycle)."""
    cell, seeds, out, stop_after = kw.pop("cell"), kw.pop("seeds"), kw.pop("out"), kw.pop("stop_after")
    overwrite = kw.pop("overwrite")
    cache, threads, yes = kw.pop("cache"), kw.pop("threads"), kw.pop("yes")
    from sweeps.ledger import check_names

    check_names(out=out, cache=cache)   # empty, too long: one line
    apply_threads(threads)
    from dataclasses import replace

    from rich.console import Console

    from sandbox.factors import parse_cell
    from sandbox.options import check_int, parse_seeds
    from sandbox.results import config_hash

    console = Console(stderr=True)
    name = parse_cell(cell).name
    seed_list = parse_seeds(seeds)
    if stop_after is not None:
        check_int(stop_after, "--stop-after", 1)
    template = cell_template(name, seed_list[0], kw, lambda m: console.print(m, highlight=False, soft_wrap=True), yes=yes)
    ident = {**template.identity(), **({"bases": template.bases} if template.bases != 1 else {})}
    root = Path(out) if out else Path("runs") / f"full-{name.replace('+', '')}-{config_hash(ident)[:8]}"
    from sandbox.results import check_folder, release_run_dir

    check_folder(cache, "--cache")
    open_full(root, template, seed_list, overwrite)   # the seeds' parent: one run, one configuration per seed folder
    from sandbox.results import replaced_note

    if replaced_note(root):
        console.print(replaced_note(root), highlight=False, soft_wrap=True)
    rows = []
    for seed in seed_list:
        cfg = replace(template, seed=seed)
        folder = root / f"seed-{seed}"
        metrics = _run_one(cfg, folder, cache, stop_after, console)
        rows.append((seed, folder, metrics))
    release_run_dir(root)
    _print_summary(name, rows)


def open_full(root: Path, template, seeds, overwrite: bool = False) -> None:
    """Claim `sandbox full`'s parent folder and, before any seed runs, refuse a ``seed-N`` folder that
    holds another configuration than seed N's (`sandbox.results.check_config`); with `overwrite`,
    empty the parent first (every seed folder in it). Shared by the command and `sandbox.app.api.full`."""
    from dataclasses import replace

    from sandbox.results import check_config, open_run_dir, release_run_dir

    open_run_dir(root, "full", None, overwrite)
    try:
        for seed in seeds:
            check_config(root / f"seed-{seed}", replace(template, seed=seed))
    except BaseException:
        release_run_dir(root)
        raise


def _run_one(cfg, folder: Path, cache: str, stop_after, console):

    from figures.report import build_report
    from sandbox.app.progress import progress_bar, stage_callback
    from substrate.cell import run_cell

    console.print(f"cell {cfg.cell} seed {cfg.seed} on base {cfg.base_seed}: preset {cfg.preset}, {cfg.steps} steps on "
                  f"{cfg.device} -> {folder}")
    with progress_bar(console, loss="-") as bar:
        stage = stage_callback(bar, loss="-")   # pretraining the base and the specialists, when not cached
        task = None

        def progress(step, steps, info):
            nonlocal task
            if task is None:   # after the substrate's stages, so the bars stand in the order they ran
                task = bar.add_task(f"{cfg.cell} s{cfg.seed}", total=steps, completed=step - 1, loss="-")
            bar.update(task, completed=step, loss=f"{info['loss']:.4f}")

        res = run_cell(cfg, folder, cache, stop_after=stop_after, argv=recorded_argv(), progress=progress,
                       log=lambda m: console.print(m), draw_figures=build_report, stage=stage)
        if task is not None:
            bar.update(task, completed=res.step)
    if not res.done:
        console.print(f"stopped at step {res.step} (checkpoint saved; run the same command to resume)")
    return res.metrics


def _print_summary(cell: str, rows) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"cell {cell}: held-out log-PPL (nats/token), floor = true entropy rate")
    for c in ("seed", "balanced log-PPL", "gap to floor", "start", "plain base", "start - base", "events", "tokens/s",
              "diverged", "folder"):
        t.add_column(c, overflow="fold")
    for seed, folder, m in rows:
        if m is None:
            t.add_row(str(seed), "(stopped)", "", "", "", "", "", "", "", str(folder))
            continue
        f = lambda key, spec: "n/a" if not isinstance(m.get(key), (int, float)) or m[key] != m[key] else format(m[key], spec)
        t.add_row(str(seed), f("balanced_log_ppl", ".4f"), f("balanced_gap_to_floor", "+.4f"),
                  f("initial_balanced_log_ppl", ".4f"), f("base_balanced_log_ppl", ".4f"), f("initial_gap_to_base", "+.4f"),
                  str(m["lifecycle_events"]),
                  f("tokens_per_s", ".0f"), f"step {m['diverged_step']}" if m["diverged"] else "no", str(folder))
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80 columns
        console = Console(width=200)
    console.print(t)
    for seed, folder, m in rows:   # on their own lines, so no table width can hide them
        if m is not None:
            console.print(f"seed {seed}: tables in {folder}, figures in {Path(folder) / 'figures'}", highlight=False,
                          soft_wrap=True)


def register(app: typer.Typer) -> None:
    from sandbox.app.declare import declared

    app.command("full")(declared(_full_options())(full))
