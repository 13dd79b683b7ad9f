"""`sandbox sweep --system substrate`: the regime map on the transformer (`sweeps.substrate_map`).

Called by the `sweep` command with its parsed options; this module resolves the substrate's
defaults. On a CPU the default is a map that finishes in minutes on 2 cores (preset tiny, 100
steps, 5 alignment points x 5 seeds, an event every 10 steps); with CUDA, widened-1536 for 25,000
steps. What was picked is printed before anything runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from sandbox.app.replay import recorded_argv

CPU_DEFAULTS = dict(preset="tiny", steps=100, points=5, seeds=(0, 1, 2, 3, 4))
GPU_DEFAULTS = dict(preset="widened-1536", steps=25_000, points=5, seeds=(0, 1, 2))


def check_system_folder(run_dir, system: str) -> None:
    """Refuse (one line naming --out) a sweep folder of the other --system: its ledger, tables and
    figures would mix two systems' results."""
    from pathlib import Path

    from sandbox.errors import BadInput
    from sandbox.results import read_manifest_file

    m = Path(run_dir) / "manifest.json"
    if not m.is_file():
        return
    man = read_manifest_file(m, "--out")
    if man.get("command") != "sweep":
        return   # another command's folder: claim_run_dir refuses it
    held = man.get("system") or "analytic"
    if held != system:
        raise BadInput("--out", str(run_dir), f"a new folder or one holding a --system {system} sweep (this one "
                       f"holds a --system {held} sweep)")



def substrate_sweep(*, alignment, points, axis, axis_points, seeds, eps, alpha, out, storage, study, figures, steps, lr,
                    plasticity, router, evo, population, mutation_scale, interval, reset_on_accept, preset, batch, data,
                    cache, device, point_count_given, seeds_given, print_summary, enqueue_only=False,
                    search_windows=2, confirm=False, acar=False, overwrite=False) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from substrate.defaults import PRESET_STEPS, check_affordable, resolve_device
    from sandbox.errors import BadInput
    from sandbox.evolution import EvolutionConfig
    from sandbox.options import parse_axis
    from sandbox.results import check_folder, default_out, open_run_dir
    from substrate.cell import CellConfig
    from substrate.routing import RoutingArms
    from sweeps.substrate_map import AXES, SubstrateSweepConfig, run_substrate_sweep

    console = Console() if Console().is_terminal else Console(width=150)
    dev = resolve_device(device)
    base = GPU_DEFAULTS if dev == "cuda" else CPU_DEFAULTS
    preset = preset or base["preset"]
    steps = steps if steps is not None else (base["steps"] if preset == base["preset"] else PRESET_STEPS.get(preset, 100))
    points = points if point_count_given else base["points"]
    seeds = seeds if seeds_given else base["seeds"]
    if router == "acar":
        raise BadInput("--router", router, "softmax, sigmoid or a router plugin (sigma routing is an extra arm of "
                       "the map: add --acar)")
    plugin = router not in ("softmax", "sigmoid")    # a router plugin: the R cell's router (sandbox.plugins)
    if data is not None and not Path(data).is_dir():
        raise BadInput("--data", data, "a folder with one subfolder of .txt files per domain")
    check_folder(cache, "--cache")
    axis_name, axis_rng = None, None
    if axis:
        axis_name, axis_rng = parse_axis(axis, "--axis", {k: (lo, hi) for k, (lo, hi, _) in AXES.items()})
    given = {k: v for k, v in (("lr", lr),) if v is not None}          # else the cell's own default
    batch = CellConfig.batch if batch is None else batch              # the cell's own default, declared once
    cell = CellConfig.of(cell="R" if router == "sigmoid" or plugin else "B3", preset=preset, steps=steps, batch=batch,
                         data=data, device=dev, seed=seeds[0], **given, **({"router_kind": router} if plugin else {}))
    check_affordable(cell, yes=False)
    ecfg = EvolutionConfig(population=population, mutation_scale=mutation_scale, method=evo,
                           interval=interval if interval is not None else max(1, steps // 10))
    arms = RoutingArms(cell=cell, evolution=ecfg, reset_on_accept=reset_on_accept, search_windows=search_windows,
                       confirm=confirm, acar=acar, **({} if plasticity is None else {"plasticity": plasticity}))
    cfg = SubstrateSweepConfig(arms=arms, alignment=alignment, points=points, axis=axis_name,
                               axis_range=(axis_rng.lo, axis_rng.hi) if axis_rng else None, axis_points=axis_points,
                               seeds=tuple(seeds), eps=eps, alpha=alpha, cache=cache)
    run_dir = Path(out) if out else default_out("sweep", cfg.folder_key())
    check_system_folder(run_dir, "substrate")
    err = Console(stderr=True)
    from sandbox.app.commands.worker import check_collect, define
    from sweeps.substrate_map import DEFAULT_STUDY
    from sweeps.ledger import is_database
    from sweeps.systems import substrate_sweep_jobs

    if enqueue_only or is_database(storage):
        jobs = substrate_sweep_jobs(cfg)
        if enqueue_only:    # the define step: every (point, seed) queued for `sandbox worker`
            from sweeps.ledger import METRICS

            return define(console, jobs, storage, study or DEFAULT_STUDY, "maximize", "substrate sweep",
                          argv=recorded_argv(), metric=METRICS["substrate"])
        check_collect(storage, study or DEFAULT_STUDY, jobs)   # workers still running: refuse, not compute
    open_run_dir(run_dir, "sweep", cfg, overwrite)   # another configuration in --out: refused before anything runs
    from sandbox.results import replaced_note

    if replaced_note(run_dir):
        Console(stderr=True).print(replaced_note(run_dir), highlight=False, soft_wrap=True)
    err.print(f"substrate map: preset {preset}, {steps} steps, batch {batch}, router {router}, {len(cfg.grid_points())} "
              f"points x {len(seeds)} seeds, {len(arms.arms)} arms{' (with acar)' if acar else ''}, an event every {ecfg.interval} steps, --evo {evo}, "
              f"plasticity {arms.plasticity}{', confirmed acceptances' if confirm else ''}, on {dev} -> {run_dir}",
              highlight=False)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]substrate sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("seed-points"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=err, transient=False) as bar:
        task_id = bar.add_task("", total=None)

        def progress(done, total, values):
            bar.update(task_id, completed=done, total=total,
                       description=", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()))

        res = run_substrate_sweep(cfg, run_dir, storage=storage, study=study, progress=progress, figures=figures,
                                  argv=recorded_argv(), log=lambda m: err.print(m), overwrite=overwrite)
    print_summary(console, res.summary, cfg.axes)
    console.print(f"{res.computed} seed-points computed, {res.reused} reused from the ledger, "
                  f"{time.perf_counter() - t0:.1f} s; folder {run_dir}", highlight=False)
    console.print("room = domain-oracle routing (each domain on its specialist's slot) vs grad: not a proven "
                  "ceiling on the transformer, so no point is labelled no-room", highlight=False)
    for f in res.figures:
        console.print(f"  {f}", highlight=False)
