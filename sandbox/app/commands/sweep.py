"""`sandbox sweep`: map where evolutionary routing search beats, ties with or degrades the gradient
solution on the analytic sandbox, over alignment and one more regime axis."""

from __future__ import annotations

import math
import time
from typing import Optional

import typer

from sandbox.app.replay import recorded_argv



def _sweep_options() -> list:
    """`sandbox sweep`'s options: the sweep's, the task's and the solver's fields (`SweepConfig`,
    `TaskSpec`, `AnalyticConfig`), the transformer's where `--system substrate` uses them, and the
    command's own. Options both systems share default to None: each system resolves its own."""
    from sandbox.analytic import CHUNK_ROWS, AnalyticConfig
    from sandbox.app.declare import from_fields, own, per_system
    from sandbox.evolution import EvolutionConfig
    from sandbox.options import Range
    from sandbox.tasks import TaskSpec
    from substrate.cell import CellConfig
    from substrate.defaults import PRESET_STEPS
    from substrate.routing import RoutingArms
    from sweeps.grid import SweepConfig
    from sweeps.substrate_map import SubstrateSweepConfig

    sw, an, cell = SweepConfig(), AnalyticConfig(), CellConfig()
    CPU_DEFAULTS, GPU_DEFAULTS = SubstrateSweepConfig.defaults_for("cpu"), SubstrateSweepConfig.defaults_for("cuda")
    per_preset = ", ".join(f"{p} {n}" for p, n in PRESET_STEPS.items())
    auto = {
        "points": f"{sw.points}; substrate: {CPU_DEFAULTS.points}",
        "steps": f"{an.steps}; substrate: per preset, {per_preset}",
        "lr": f"{an.lr:g}; substrate: the cell's {cell.lr:g}",
        "plasticity": f"{an.plasticity:g}; substrate: {RoutingArms.plasticity:g}",
        "search_every": f"{an.interval}; substrate: steps/10",
        "lifecycle_every": "--search-every",
        "preset": f"substrate: {CPU_DEFAULTS.preset} on a CPU, {GPU_DEFAULTS.preset} on CUDA",
        "device": "cuda when visible, else cpu",
        "batch": f"analytic: {an.batch} (the exact expected loss); substrate: the cell's {cell.batch} windows",
    }
    task_fields = ("domains", "slots", "dim", "rank", "true_rank", "context_dim", "context_noise", "overlap")
    solver_fields = ("steps", "lr", "plasticity", "router", "evo", "population", "mutation_scale", "interval",
                     "lifecycle_every", "reset_on_accept", "oracle", "lifecycle", "scope", "selection", "crossover", "crossover_t",
                     "mutation", "finetune_steps", "finetune_lr", "death", "inherit_mode", "reallocation", "acar",
                     "acar_tol", "budget", "draws", "eval_draws", "fresh_noise", "loss_floor", "lora_alpha", "beta2",
                     "control_beta2", "accept_tol")
    switches = {"reset_on_accept": ("--reset-on-accept/--keep-state",), "lifecycle": ("--lifecycle/--no-lifecycle",),
                "acar": ("--acar/--no-acar",), "fresh_noise": ("--fresh-noise/--fixed-noise",),
                "confirm": ("--confirm/--no-confirm",), "independent_seeds": ("--independent-seeds/--shared-seeds",),
                "tune_robust": ("--tune-robust/--no-tune-robust",)}
    from sandbox.app.declare import field_docs
    from sandbox.tuning import TuneConfig

    tc, tdoc = TuneConfig(), field_docs(TuneConfig)
    joined = lambda xs: ",".join(f"{x:g}" for x in xs)   # noqa: E731
    #: The options both systems read, and the field each fills in each system's config (`Opt.systems`):
    #: the analytic sweep builds `SweepConfig` (with `AnalyticConfig`), --system substrate a
    #: `SubstrateSweepConfig` (with its `RoutingArms`, their cell and their `EvolutionConfig`:
    #: `sandbox.app.maps.substrate_sweep`). --router softmax|sigmoid is the substrate cell B3|R.
    shared = {
        "steps": ((AnalyticConfig, "steps"), (CellConfig, "steps")),
        "lr": ((AnalyticConfig, "lr"), (CellConfig, "lr")),
        "batch": ((AnalyticConfig, "batch"), (CellConfig, "batch")),
        "plasticity": ((AnalyticConfig, "plasticity"), (RoutingArms, "plasticity")),
        "reset_on_accept": ((AnalyticConfig, "reset_on_accept"), (RoutingArms, "reset_on_accept")),
        "acar": ((AnalyticConfig, "acar"), (RoutingArms, "acar")),
        "population": ((AnalyticConfig, "population"), (EvolutionConfig, "population")),
        "mutation_scale": ((AnalyticConfig, "mutation_scale"), (EvolutionConfig, "mutation_scale")),
        "evo": ((AnalyticConfig, "evo"), (EvolutionConfig, "method")),
        "search_every": ((AnalyticConfig, "interval"), (EvolutionConfig, "interval")),
        "router": ((AnalyticConfig, "router"), (CellConfig, "cell")),
        "points": ((SweepConfig, "points"), (SubstrateSweepConfig, "points")),
        "seeds": ((SweepConfig, "seeds"), (SubstrateSweepConfig, "seeds")),
        "eps": ((SweepConfig, "eps"), (SubstrateSweepConfig, "eps")),
        "alpha": ((SweepConfig, "alpha"), (SubstrateSweepConfig, "alpha")),
        "axis_points": ((SweepConfig, "axis_points"), (SubstrateSweepConfig, "axis_points")),
    }
    return per_system([
        own("alignment", str(Range(*sw.alignment)), "--alignment", help="Alignment range LO..HI in [0, 1], or one value."),
        *from_fields(SweepConfig, ("points",), auto=auto),
        own("axis", None, "--axis", help="Second regime axis NAME=LO..HI, e.g. plasticity=0..1."),
        *from_fields(SweepConfig, ("axis_points",)),
        own("seeds", None, "--seeds", help=f"A count (10 -> 0..9) or a comma list (42,137,2026) (default: "
            f"{len(sw.seeds)}; substrate: {len(CPU_DEFAULTS.seeds)} on a CPU, {len(GPU_DEFAULTS.seeds)} on CUDA)."),
        *from_fields(SweepConfig, ("eps", "alpha", "converged_frac")),
        *from_fields(SweepConfig, ("independent_seeds",), decls=switches),
        *from_fields(TuneConfig, ("mode",), rename={"mode": "tune"}),
        own("tune_lr", joined(tc.lrs), "--tune-lr", help=tdoc["lrs"] + " Comma list."),
        own("tune_adapter", joined(tc.adapter), "--tune-adapter", help=tdoc["adapter"] + " Comma list."),
        own("tune_beta2", joined(tc.beta2), "--tune-beta2", help=tdoc["beta2"]),
        own("tune_seeds", f"{tc.seeds[0]}..{tc.seeds[-1]}", "--tune-seeds", help=tdoc["seeds"] + " A comma list, or "
            "LO..HI (inclusive)."),
        *from_fields(TuneConfig, ("widen", "robust", "rule"),
                     rename={"widen": "tune_widen", "robust": "tune_robust", "rule": "tune_rule"}, decls=switches),
        own("out", None, "--out", help="Run folder (default runs/sweep-<config hash>; the same command resumes)."),
        own("overwrite", False, "--overwrite", help="Replace the --out folder whole (a run folder of this tool holding another configuration: its tables, figures, journal and checkpoints are removed). Without it a folder holding another configuration is refused; the same configuration resumes."),
        own("storage", None, "--storage", help="Optuna storage URL (default: a journal file in --out)."),
        own("study", None, "--study", help="Optuna study name (default: sweep; trials are keyed by a hash of each "
            "point's config)."),
        *from_fields(SweepConfig, ("search", "trials")),
        own("figures", True, "--figures/--no-figures", help="Draw the regime curve/heatmap."),
        *from_fields(TaskSpec, task_fields),
        *from_fields(AnalyticConfig, solver_fields, auto=auto, decls=switches, rename={"interval": "search_every"}),
        own("interval", None, "--interval", annotation=Optional[int], hidden=True,
            help="Deprecated: the old name of --search-every and (analytic) --lifecycle-every; sets both."),
        own("threads", 1, "--threads", help="torch CPU threads. 1 is fastest point by point and on a shared machine; a stacked map of "
                                           "hundreds of rows gains from more cores on a machine of your own (2: 21 x 21 x 16 map "
                                           "185 -> 127 s, BENCHMARKS.md)."),
        own("chunk_rows", CHUNK_ROWS, "--chunk-rows", help="Rows (point x seed) solved per stacked batch; 0 runs "
            "point by point."),
        own("system", "analytic", "--system", help="analytic (the closed-form sandbox) or substrate (the transformer)."),
        own("preset", None, "--preset", help=f"Model preset (default: {auto['preset']}).", annotation=Optional[str]),
        *from_fields(AnalyticConfig, ("batch",), auto=auto),
        *from_fields(CellConfig, ("data",)),
        own("cache", "runs/cache", "--cache", help="substrate: cache of corpus, pretrained base and specialists."),
        own("device", None, "--device", annotation=Optional[str], help="auto, cpu or cuda: where the solver's tensors "
            f"live, analytic and substrate (default: {auto['device']})."),
        *from_fields(RoutingArms, ("search_windows", "confirm"), decls=switches),
        own("enqueue_only", False, "--enqueue-only", help="Define step for `sandbox worker`: queue every (point, seed) "
            "trial in --study on a PostgreSQL --storage and exit."),
    ], {k: {"analytic": a, "substrate": b} for k, (a, b) in shared.items()})


def sweep(got) -> None:
    """Map the regime boundary: delta = rel_excess_grad - rel_excess_evo per seed (positive = evo better),
    each arm's final excess loss as a share of the start's, with grad's optimiser setting tuned per
    point on seeds disjoint from the evaluation seeds (--tune off: the fixed --lr).

    --acar adds sigma routing (ACAR) as a fifth arm on both systems, scored against grad on the same seeds: delta_acar = log loss_grad - log loss_acar, with its mode counts and compute saved."""
    from sandbox.errors import BadInput
    from sandbox.options import check_int, parse_axis, parse_range, parse_seeds

    rng = parse_range(got["alignment"], "--alignment", 0.0, 1.0)
    from sweeps.grid import SweepConfig

    points = SweepConfig.points if got["points"] is None else got["points"]   # the analytic defaults, declared once
    seeds = str(len(SweepConfig().seeds)) if got["seeds"] is None else got["seeds"]
    out, storage, study, system, overwrite = got["out"], got["storage"], got["study"], got["system"], got["overwrite"]
    check_int(points, "--points", 1, 1001)
    check_int(got["axis_points"], "--axis-points", 1, 1001)
    check_int(got["threads"], "--threads", 1, 256)
    check_int(got["chunk_rows"], "--chunk-rows", 0, 1_000_000)
    seed_list = parse_seeds(seeds, "--seeds")
    from sweeps.ledger import check_names

    check_names(study, out=out, storage=storage, cache=got["cache"], data=got["data"])   # empty, too long: one line
    axis_name, axis_rng = None, None
    from sweeps.grid import AXES

    if got["axis"]:
        axis_name, axis_rng = parse_axis(got["axis"], "--axis", {k: (lo, hi) for k, (lo, hi, _) in AXES.items()})
    if got["router"] == "acar":
        raise BadInput("--router", got["router"], "softmax or sigmoid (sigma routing is an extra arm of the map: add --acar)")
    for flag, v in (("--eps", got["eps"]), ("--alpha", got["alpha"])):
        if not math.isfinite(v):
            raise BadInput(flag, v, "a finite number")

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sandbox.analytic import AnalyticConfig
    from sandbox.app.maps import check_system_folder, print_summary, substrate_sweep
    from sandbox.results import default_out
    from sandbox.tasks import TaskSpec
    from sweeps.grid import run_sweep

    torch.set_num_threads(got["threads"])
    if system not in ("analytic", "substrate"):
        raise BadInput("--system", system, "analytic or substrate")
    _refuse_ignored(system)
    if got["lifecycle_every"] is not None and not got["lifecycle"]:
        raise BadInput("--lifecycle-every", got["lifecycle_every"], "no --lifecycle-every without --lifecycle (only the "
                       "lifecycle reads it): add --lifecycle or leave it out")
    search_every, lifecycle_every = _schedules(got["search_every"], got["lifecycle_every"], got["interval"], system)
    if not got["lifecycle"]:
        lifecycle_every = None          # --interval without --lifecycle: no lifecycle, no schedule of its own
    if system == "substrate":
        return substrate_sweep(got, (rng.lo, rng.hi), tuple(seed_list) if got["seeds"] is not None else None,
                               search_every)
    # options shared with --system substrate default to None: left out, the analytic value is the
    # dataclass's own default, declared once
    task = got.build(TaskSpec, alignment=rng.lo)
    solver = got.build(AnalyticConfig, lifecycle_every=lifecycle_every,
                       **({} if search_every is None else {"interval": search_every}))
    from sandbox.options import parse_numbers
    from sandbox.tuning import TuneConfig

    tcfg = got.build(TuneConfig, lrs=parse_numbers(got["tune_lr"], "--tune-lr"),
                     adapter=parse_numbers(got["tune_adapter"], "--tune-adapter"),
                     beta2=parse_numbers(got["tune_beta2"], "--tune-beta2"), seeds=_tune_seeds(got["tune_seeds"]))
    cfg = got.build(SweepConfig, task=task, solver=solver, tune=tcfg,
                    alignment=(rng.lo, rng.hi), points=points, axis=axis_name,
                    axis_range=(axis_rng.lo, axis_rng.hi) if axis_rng else None, seeds=tuple(seed_list))
    from pathlib import Path

    from substrate.defaults import resolve_device

    dev = resolve_device(got["device"])       # --device cuda without a GPU: one line, exit 2
    run_dir = Path(out) if out else default_out("sweep", cfg.folder_key())
    check_system_folder(run_dir, "analytic")
    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(width=200)
    from sandbox.app.plan import check_collect, define
    from sweeps.grid import DEFAULT_STUDY
    from sweeps.ledger import is_database
    from sweeps.systems import sweep_jobs

    enqueue_only = got["enqueue_only"]
    if enqueue_only or is_database(storage):
        jobs = sweep_jobs(cfg) if enqueue_only or cfg.search == "grid" else []
        if enqueue_only:
            from sweeps.ledger import METRICS

            return define(console, jobs, storage, study or DEFAULT_STUDY, "maximize", "sweep",
                          argv=recorded_argv(), metric=METRICS["analytic"])
        check_collect(storage, study or DEFAULT_STUDY, jobs)   # workers still running: refuse, not compute
    from sandbox.results import open_run_dir

    open_run_dir(run_dir, "sweep", cfg, overwrite)   # another configuration in --out: refused before computing
    from sandbox.results import replaced_note

    if replaced_note(run_dir):
        console.print(replaced_note(run_dir), highlight=False, soft_wrap=True)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("seed-points"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False) as bar:
        task_id = bar.add_task("", total=None)

        def progress(done: int, total: int, values: dict) -> None:
            bar.update(task_id, completed=done, total=total,
                       description=", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

        res = run_sweep(cfg, run_dir, storage=storage, study=study, progress=progress, figures=got["figures"],
                        chunk_rows=got["chunk_rows"], device=dev, overwrite=overwrite,
                        argv=recorded_argv())
    print_summary(console, res.summary, cfg.axes)
    console.print(f"{res.computed} seed-points computed, {res.reused} reused from the ledger, "
                  f"{time.perf_counter() - t0:.1f} s; folder {run_dir}", highlight=False)
    for f in res.figures:
        console.print(f"  {f}", highlight=False)


#: Flags only the analytic system reads (``--system substrate`` would silently ignore them).
_ANALYTIC_ONLY = ("converged_frac", "independent_seeds", "tune", "tune_lr", "tune_adapter", "tune_beta2", "tune_seeds",
                  "tune_widen", "tune_robust", "tune_rule", "search", "trials", "domains", "slots", "dim", "rank",
                  "true_rank", "context_dim", "context_noise", "overlap", "oracle", "lifecycle", "scope", "selection",
                  "crossover", "crossover_t", "mutation", "finetune_steps", "finetune_lr", "acar_tol", "budget", "draws",
                  "eval_draws", "fresh_noise", "loss_floor", "lora_alpha", "beta2", "control_beta2", "accept_tol",
                  "chunk_rows", "lifecycle_every")
#: Flags only the substrate system reads (the analytic sweep would silently ignore them).
_SUBSTRATE_ONLY = ("preset", "data", "cache", "search_windows", "confirm")


def _refuse_ignored(system: str) -> None:
    """Refuse (one line naming the flag and the system) a flag given on the command line that
    `system` does not read, instead of running without it."""
    from sandbox.errors import BadInput

    try:
        from typer._click.globals import get_current_context
    except ImportError:  # pragma: no cover - depends on the installed typer
        from click import get_current_context
    ctx = get_current_context(silent=True)
    if ctx is None:
        return
    ignored = _ANALYTIC_ONLY if system == "substrate" else _SUBSTRATE_ONLY
    for p in ctx.command.params:
        src = ctx.get_parameter_source(p.name) if p.name in ignored else None
        if src is not None and src.name in ("COMMANDLINE", "ENVIRONMENT"):
            flag = max((o for o in p.opts if o.startswith("--")), key=len, default=p.name)
            other = "analytic" if system == "substrate" else "substrate"
            raise BadInput(flag, ctx.params.get(p.name), f"no {flag} with --system {system} (the {system} system does "
                           f"not read it; it is a flag of --system {other}): leave it out")


def _schedules(search_every, lifecycle_every, interval, system: str) -> tuple:
    """``(search_every, lifecycle_every)`` from the options, None where left to the system's default.

    ``--interval`` is the old name: on the analytic system it sets both schedules (its meaning
    there before the split), on ``--system substrate`` the search's (the substrate map has no
    lifecycle). A new name given beside it wins for its own schedule (a replayed manifest's
    ``--interval`` with a ``--search-every`` override). A note on stderr says so once the command has
    finished (`sandbox.app.notes`: an error stays one line)."""
    from sandbox.app.notes import later
    from sandbox.options import check_int

    for flag, v in (("--search-every", search_every), ("--lifecycle-every", lifecycle_every), ("--interval", interval)):
        if v is not None:
            check_int(v, flag, 1, 1_000_000)
    if interval is not None:
        both = "--search-every and --lifecycle-every (it sets both)" if system == "analytic" else "--search-every"
        later(f"note: --interval is the old name of {both} on sweep --system {system}; use the new name")
        search_every = interval if search_every is None else search_every
        if system == "analytic" and lifecycle_every is None:
            lifecycle_every = interval
    return search_every, lifecycle_every


def _tune_seeds(text: str) -> tuple[int, ...]:
    """``--tune-seeds``: a comma list or an inclusive range ``LO..HI`` of seeds."""
    from sandbox.errors import BadInput
    from sandbox.options import parse_seeds

    t = str(text).strip()
    if ".." in t:
        lo, _, hi = t.partition("..")
        if not (lo.strip().isdigit() and hi.strip().isdigit()) or not 0 <= int(lo) <= int(hi) <= int(lo) + 10_000:
            raise BadInput("--tune-seeds", text, "LO..HI (inclusive, at most 10001 seeds) or a comma list of seeds")
        return tuple(range(int(lo), int(hi) + 1))
    return tuple(parse_seeds(t if "," in t else t + ",", "--tune-seeds"))


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def register(app: typer.Typer) -> None:
    from sandbox.app.declare import declared

    app.command("sweep")(declared(_sweep_options())(sweep))
