"""`sandbox full --cell CELL`: one factorial cell on the transformer substrate, one run folder per seed.

The knob options are shared with `sandbox factorial` (`sandbox.app.cellopts`: `cell_template`
builds the `CellConfig`, resolving the machine's preset and steps and the step-scaled schedule).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from sandbox.app.cellopts import apply_threads, cell_options, cell_template, run_options
from sandbox.app.replay import recorded_argv


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


def full(got) -> None:
    """Run one factorial cell (R: sigmoid router on hidden states; E: per-domain fitness; L: lifecycle)."""
    out, cache, stop_after = got["out"], got["cache"], got["stop_after"]
    from sweeps.ledger import check_names

    check_names(out=out, cache=cache)   # empty, too long: one line
    apply_threads(got["threads"])
    from dataclasses import replace

    from rich.console import Console

    from sandbox.factors import parse_cell
    from sandbox.options import check_int, parse_seeds
    from sandbox.results import config_hash

    console = Console(stderr=True)
    name = parse_cell(got["cell"]).name
    seed_list = parse_seeds(got["seeds"])
    if stop_after is not None:
        check_int(stop_after, "--stop-after", 1)
    template = cell_template(name, seed_list[0], got, lambda m: console.print(m, highlight=False, soft_wrap=True),
                             yes=got["yes"])
    ident = {**template.identity(), **({"bases": template.bases} if template.bases != 1 else {})}
    root = Path(out) if out else Path("runs") / f"full-{name.replace('+', '')}-{config_hash(ident)[:8]}"
    from sandbox.results import check_folder, release_run_dir

    check_folder(cache, "--cache")
    open_full(root, template, seed_list, got["overwrite"])   # the seeds' parent: one run, one configuration per seed folder
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
