"""What `sandbox sweep` runs on both systems, and its transformer path (``--system substrate``).

The analytic map is built in the command itself; this module holds what both systems share (the
folder check, the regime table) and the substrate map, which resolves the transformer's machine
defaults (`sweeps.substrate_map.SubstrateSweepConfig.defaults_for`): on a CPU a map that finishes in
minutes on 2 cores (preset tiny, 100 steps, 5 alignment points x 5 seeds, an event every 10 steps);
with CUDA, widened-1536 for 25,000 steps. What was picked is printed before anything runs.
"""

from __future__ import annotations

import time
from pathlib import Path

from sandbox.app.replay import recorded_argv


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


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def print_summary(console, summary, axes: list[str]) -> None:
    """The regime table of a map's summary (both systems): per point its delta, CI, Holm p, regime and
    the controls."""
    import pandas as pd
    from rich.table import Table

    colours = {"beats": "green", "degrades": "red", "ties": "cyan", "inconclusive": "yellow", "inert": "bright_black",
               "no-room": "magenta", "beats<eps": "green", "degrades<eps": "red"}
    acar = "delta_acar" in summary.columns          # the acar arm (--acar): its delta, label and mean slots
    rel = "value" in summary.columns and (summary["value"] == "rel_excess").all()
    unit = ("delta = rel_excess_grad - rel_excess_evo, shares of the start's excess loss; positive = evolution "
            "better; restart = optimiser restart only; beta2 = grad with Adam beta2 0.9; room = ceiling (grad vs "
            "the joint optimum); grad lr = grad's tuned router / adapter lr") if rel else \
        "delta = log loss_grad - log loss_evo; positive = evolution better; restart = optimiser restart only; room = oracle ceiling"
    t = Table(title="regimes (" + unit
              + ("; acar = log loss_grad - log loss_acar, acar slots = mean slots gated" if acar else "") + ")",
              title_justify="left")
    for c in ["point", *axes, "n", "delta", "95% CI", "p (Holm)", "regime", "restart", "beta2", "room", "grad lr",
              "accepted", "seeds needed", *(["acar", "acar regime", "acar slots"] if acar else [])]:
        t.add_column(c, justify="left" if c.endswith("regime") else "right")

    def num(v, fmt="+.4f") -> str:
        return "" if v is None or pd.isna(v) else format(v, fmt)

    for r in summary.to_dict("records"):
        need = r.get("seeds_needed")
        t.add_row(str(r["point"]), *(_fmt(r[a]) for a in axes), str(r["n"]), num(r["mean_delta"]),
                  f"[{num(r['ci_low'])}, {num(r['ci_high'])}]", num(r["p_holm"], ".3g"),
                  f"[{colours.get(r['regime'], 'white')}]{r['regime']}[/]",
                  num(r.get("delta_restart")), num(r.get("delta_beta2")),
                  num(r.get("room_joint") if pd.notna(r.get("room_joint", float("nan"))) else r.get("room")),
                  "" if pd.isna(r.get("grad_lr", float("nan"))) else
                  f"{r['grad_lr']:g} / {r['grad_adapter_lr']:.3g}" + (" (edge)" if r.get("tune_edge") else ""),
                  num(r.get("accepted"), ".2f"),
                  "" if need is None or pd.isna(need) else str(need),
                  *([num(r["delta_acar"]), f"[{colours.get(r['acar_regime'], 'white')}]{r['acar_regime']}[/]",
                     num(r["acar_mean_slots"], ".2f")] if acar else []))
    console.print(t)


def substrate_sweep(got, alignment: tuple[float, float], seeds: tuple[int, ...] | None,
                    search_every: int | None) -> None:
    """``sandbox sweep --system substrate``: the map of `sweeps.substrate_map` from the options `got`
    (`sandbox.app.declare.Received`), with `alignment` and `seeds` already parsed (`seeds` None: not
    given) and `search_every` resolved from ``--search-every`` / ``--interval``. The options the
    systems share (steps, lr, plasticity, batch, points, the search's) are read by name: here they
    set the cell, the search and the map instead of the analytic solver."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from substrate.defaults import check_affordable, resolve_device
    from sandbox.errors import BadInput
    from sandbox.evolution import EvolutionConfig
    from sandbox.options import parse_axis
    from sandbox.results import check_folder, default_out, open_run_dir
    from substrate.cell import CellConfig
    from substrate.routing import RoutingArms
    from sweeps.substrate_map import AXES, SubstrateSweepConfig, run_substrate_sweep

    out, storage, study, cache, overwrite = got["out"], got["storage"], got["study"], got["cache"], got["overwrite"]
    router, acar, confirm, evo = got["router"], got["acar"], got["confirm"], got["evo"]
    enqueue_only = got["enqueue_only"]
    console = Console() if Console().is_terminal else Console(width=150)
    dev = resolve_device(got["device"])
    base = SubstrateSweepConfig.defaults_for(dev)
    preset = got["preset"] or base.preset
    steps = got["steps"] if got["steps"] is not None else SubstrateSweepConfig.steps_for(preset)
    points = got["points"] if got["points"] is not None else base.points
    seeds = seeds if seeds is not None else base.seeds
    if router == "acar":
        raise BadInput("--router", router, "softmax, sigmoid or a router plugin (sigma routing is an extra arm of "
                       "the map: add --acar)")
    plugin = router not in ("softmax", "sigmoid")    # a router plugin: the R cell's router (sandbox.plugins)
    data = got["data"]
    if data is not None and not Path(data).is_dir():
        raise BadInput("--data", data, "a folder with one subfolder of .txt files per domain")
    check_folder(cache, "--cache")
    axis_name, axis_rng = None, None
    if got["axis"]:
        axis_name, axis_rng = parse_axis(got["axis"], "--axis", {k: (lo, hi) for k, (lo, hi, _) in AXES.items()})
    given = {k: got[k] for k in ("lr",) if got[k] is not None}          # else the cell's own default
    batch = CellConfig.batch if got["batch"] is None else got["batch"]   # the cell's own default, declared once
    cell = CellConfig.of(cell="R" if router == "sigmoid" or plugin else "B3", preset=preset, steps=steps, batch=batch,
                         data=data, device=dev, seed=seeds[0], **given, **({"router_kind": router} if plugin else {}))
    check_affordable(cell, yes=False)
    ecfg = EvolutionConfig(population=got["population"], mutation_scale=got["mutation_scale"], method=evo,
                           interval=search_every if search_every is not None
                           else SubstrateSweepConfig.search_every_for(steps))
    plasticity = {} if got["plasticity"] is None else {"plasticity": got["plasticity"]}
    arms = got.build(RoutingArms, cell=cell, evolution=ecfg, reset_on_accept=got["reset_on_accept"], acar=acar,
                     **plasticity)
    cfg = SubstrateSweepConfig(arms=arms, alignment=alignment, points=points, axis=axis_name,
                               axis_range=(axis_rng.lo, axis_rng.hi) if axis_rng else None,
                               axis_points=got["axis_points"], seeds=tuple(seeds), eps=got["eps"], alpha=got["alpha"],
                               cache=cache)
    run_dir = Path(out) if out else default_out("sweep", cfg.folder_key())
    check_system_folder(run_dir, "substrate")
    err = Console(stderr=True)
    from sandbox.app.plan import check_collect, define
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

        res = run_substrate_sweep(cfg, run_dir, storage=storage, study=study, progress=progress, figures=got["figures"],
                                  argv=recorded_argv(), log=lambda m: err.print(m), overwrite=overwrite)
    print_summary(console, res.summary, cfg.axes)
    console.print(f"{res.computed} seed-points computed, {res.reused} reused from the ledger, "
                  f"{time.perf_counter() - t0:.1f} s; folder {run_dir}", highlight=False)
    console.print("room = domain-oracle routing (each domain on its specialist's slot) vs grad: not a proven "
                  "ceiling on the transformer, so no point is labelled no-room", highlight=False)
    for f in res.figures:
        console.print(f"  {f}", highlight=False)
