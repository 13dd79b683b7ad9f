"""`sandbox sweep`: map where evolutionary routing search beats, ties with or degrades the gradient
solution on the analytic sandbox, over alignment and one more regime axis."""

from __future__ import annotations

import math
import sys
import time
from typing import Optional

import typer

from sandbox.stats import DEFAULT_EPS


def sweep(
    alignment: str = typer.Option("0..1", "--alignment", help="Alignment range LO..HI in [0, 1], or one value."),
    points: Optional[int] = typer.Option(None, "--points", help="Alignment grid points (default 11; substrate 5 on a CPU)."),
    axis: str = typer.Option(None, "--axis", help="Second regime axis NAME=LO..HI, e.g. plasticity=0..1."),
    axis_points: int = typer.Option(5, "--axis-points", help="Grid points of the second axis."),
    seeds: Optional[str] = typer.Option(None, "--seeds", help="A count (10 -> 0..9) or a comma list (42,137,2026); default 10 (substrate: 5 on a CPU, 3 on CUDA)."),
    eps: float = typer.Option(DEFAULT_EPS, "--eps", help="Equivalence margin for TOST (nats of log loss), fixed in advance."),
    alpha: float = typer.Option(0.05, "--alpha", help="Test level (Holm over the sweep's points)."),
    out: str = typer.Option(None, "--out", help="Run folder (default runs/sweep-<config hash>; the same command resumes)."),
    storage: str = typer.Option(None, "--storage", help="Optuna storage URL (default: a journal file in --out)."),
    study: str = typer.Option(None, "--study", help="Optuna study name (default: sweep; trials are keyed by a hash of each point's config)."),
    search: str = typer.Option("grid", "--search", help="grid, or boundary (Optuna proposes points where delta changes sign)."),
    trials: int = typer.Option(12, "--trials", help="Points proposed by --search boundary."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Draw the regime curve/heatmap."),
    # task
    domains: int = typer.Option(4, "--domains", help="M: domains."),
    slots: int = typer.Option(8, "--slots", help="K: adapter slots (>= domains)."),
    dim: int = typer.Option(32, "--dim", help="d: dimension of the adapted map."),
    rank: int = typer.Option(4, "--rank", help="r: adapter rank."),
    true_rank: int = typer.Option(2, "--true-rank", help="r*: rank of each domain's true update."),
    context_dim: int = typer.Option(16, "--context-dim", help="F: routing feature width."),
    context_noise: float = typer.Option(0.0, "--context-noise", help="Noise on routing features."),
    overlap: float = typer.Option(0.0, "--overlap", help="Shared component between domains' updates, in [0, 1]."),
    # solver
    steps: Optional[int] = typer.Option(None, "--steps", help="Gradient steps per arm (default 150; substrate: per preset, tiny 100, small 200)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Adam learning rate of the router (default 0.05; substrate 3e-3)."),
    plasticity: Optional[float] = typer.Option(None, "--plasticity", help="Adapter lr multiplier; 0 freezes the adapters (default 0.1; substrate 1)."),
    router: str = typer.Option("softmax", "--router", help="softmax (B3 baseline) or sigmoid (the rewrite); sigma routing is the --acar arm."),
    evo: str = typer.Option("es", "--evo", help="Routing search: es ((1+lambda)-ES, 1/5th rule), cma (CMA-ES) or fixed."),
    population: int = typer.Option(16, "--population", help="Evolution population (member 0 = current router)."),
    mutation_scale: float = typer.Option(0.1, "--mutation-scale", help="Step in logit units: initial sigma (es, cma) or the fixed step (fixed)."),
    interval: Optional[int] = typer.Option(None, "--interval", help="Gradient steps between generations and restarts (default 10; substrate steps/10)."),
    reset_on_accept: bool = typer.Option(False, "--reset-on-accept/--keep-state", help="Reset the router's Adam state when the search replaces it."),
    oracle: str = typer.Option("ceiling", "--oracle", help="Oracle arm: ceiling (best gates for grad's final adapters) or replace."),
    lifecycle: bool = typer.Option(False, "--lifecycle/--no-lifecycle", help="Adapter lifecycle in the evo arm."),
    scope: str = typer.Option("per-domain", "--scope", help="Lifecycle fitness scope: per-domain or global."),
    selection: str = typer.Option("tournament", "--selection", help="Lifecycle parent selection: tournament or roulette (EvoMerge, fitness-proportional)."),
    crossover: str = typer.Option("none", "--crossover", help="Lifecycle crossover: none or slerp (EvoMerge: newborn = SLERP of two fit parents)."),
    crossover_t: Optional[float] = typer.Option(None, "--crossover-t", help="SLERP weight of the second parent in [0, 1] (default: drawn U(0, 1) per newborn)."),
    mutation: str = typer.Option("svd", "--mutation", help="Newborn mutation: svd, finetune (EvoMerge: gradient steps on its target domain) or svd+finetune."),
    finetune_steps: int = typer.Option(1, "--finetune-steps", help="Gradient steps of --mutation finetune."),
    finetune_lr: float = typer.Option(0.01, "--finetune-lr", help="Step length (factor space) of --mutation finetune."),
    acar: bool = typer.Option(False, "--acar/--no-acar", help="Add the acar arm (ACAR sigma routing, issue 18): on the grad arm's final router and adapters, each input's top-3 slots by router logits, sigma from their predictions' agreement, 1/2/3 of them gated equally; paired against grad (delta_acar) with its mode counts and compute saved."),
    acar_tol: float = typer.Option(0.5, "--acar-tol", help="analytic --acar: two slots' predictions agree when their RMS difference is at most this times the larger RMS prediction."),
    budget: str = typer.Option("steps", "--budget", help="steps (equal gradient steps) or evals (equal loss evaluations)."),
    draws: int = typer.Option(8, "--draws", help="Routing-noise draws per domain (training objective)."),
    eval_draws: int = typer.Option(64, "--eval-draws", help="Fresh noise draws per domain for the final loss."),
    fresh_noise: bool = typer.Option(False, "--fresh-noise/--fixed-noise", help="New noise draws every step."),
    loss_floor: float = typer.Option(0.01, "--loss-floor", help="Irreducible loss added to every loss (log-loss floor)."),
    lora_alpha: float = typer.Option(4.0, "--lora-alpha", help="LoRA alpha (scale = alpha / rank)."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (small tensors: 1 is fastest)."),
    chunk_rows: int = typer.Option(512, "--chunk-rows", help="Rows (point x seed) solved per stacked batch; 0 runs point by point."),
    system: str = typer.Option("analytic", "--system", help="analytic (the closed-form sandbox) or substrate (the transformer)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="substrate: tiny or small on a CPU (default tiny), widened-1536 on CUDA."),
    batch: int = typer.Option(8, "--batch", help="substrate: training windows per step."),
    data: Optional[str] = typer.Option(None, "--data", help="substrate: real text folder (one subfolder per domain)."),
    cache: str = typer.Option("runs/cache", "--cache", help="substrate: cache of corpus, pretrained base and specialists."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda: where the solver's tensors live (analytic and substrate)."),
    search_windows: int = typer.Option(2, "--search-windows", help="substrate: fresh training windows per domain in one generation's search objective."),
    confirm: bool = typer.Option(False, "--confirm/--no-confirm", help="substrate: keep an accepted child only if it also beats its parent on a second fresh batch."),
    enqueue_only: bool = typer.Option(False, "--enqueue-only", help="Define step for `sandbox worker`: queue every (point, seed) trial in --study on a PostgreSQL --storage and exit."),
) -> None:
    """Map the regime boundary: delta = log loss_grad - log loss_evo per seed (positive = evo better).

    --acar adds sigma routing (ACAR) as a fifth arm on both systems, scored against grad on the same seeds: delta_acar = log loss_grad - log loss_acar, with its mode counts and compute saved."""
    from sandbox.errors import BadInput
    from sandbox.options import check_int, parse_axis, parse_range, parse_seeds

    rng = parse_range(alignment, "--alignment", 0.0, 1.0)
    points_given, seeds_given = points is not None, seeds is not None
    points = 11 if points is None else points          # the analytic defaults (SweepConfig: 11 points, 10 seeds)
    seeds = "10" if seeds is None else seeds
    check_int(points, "--points", 1, 1001)
    check_int(axis_points, "--axis-points", 1, 1001)
    check_int(threads, "--threads", 1, 256)
    check_int(chunk_rows, "--chunk-rows", 0, 1_000_000)
    seed_list = parse_seeds(seeds, "--seeds")
    axis_name, axis_rng = None, None
    from sweeps.grid import AXES

    if axis:
        axis_name, axis_rng = parse_axis(axis, "--axis", {k: (lo, hi) for k, (lo, hi, _) in AXES.items()})
    if router == "acar":
        raise BadInput("--router", router, "softmax or sigmoid (sigma routing is an extra arm of the map: add --acar)")
    for flag, v in (("--eps", eps), ("--alpha", alpha)):
        if not math.isfinite(v):
            raise BadInput(flag, v, "a finite number")

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sandbox.analytic import AnalyticConfig
    from sandbox.results import default_out
    from sandbox.tasks import TaskSpec
    from sweeps.grid import SweepConfig, run_sweep

    torch.set_num_threads(threads)
    if system not in ("analytic", "substrate"):
        raise BadInput("--system", system, "analytic or substrate")
    if system == "substrate":
        from sandbox.app.commands.sweep_substrate import substrate_sweep

        return substrate_sweep(alignment=(rng.lo, rng.hi), points=points, axis=axis, axis_points=axis_points,
                               seeds=tuple(seed_list), eps=eps, alpha=alpha, out=out, storage=storage, study=study,
                               figures=figures, steps=steps, lr=lr, plasticity=plasticity, router=router, evo=evo,
                               population=population, mutation_scale=mutation_scale, interval=interval,
                               reset_on_accept=reset_on_accept, preset=preset, batch=batch, data=data, cache=cache,
                               device=device, point_count_given=points_given, seeds_given=seeds_given,
                               print_summary=_print_summary, enqueue_only=enqueue_only, search_windows=search_windows,
                               confirm=confirm, acar=acar)
    defaults = AnalyticConfig()          # options shared with --system substrate default to None: the
    steps = defaults.steps if steps is None else steps                  # analytic value is declared once,
    lr = defaults.lr if lr is None else lr                              # in the dataclass
    plasticity = defaults.plasticity if plasticity is None else plasticity
    interval = defaults.interval if interval is None else interval
    task = TaskSpec(domains=domains, slots=slots, dim=dim, rank=rank, true_rank=true_rank, alignment=rng.lo,
                    context_dim=context_dim, context_noise=context_noise, overlap=overlap)
    solver = AnalyticConfig(steps=steps, lr=lr, plasticity=plasticity, router=router, population=population,
                           mutation_scale=mutation_scale, interval=interval, lifecycle=lifecycle, scope=scope,
                           evo=evo, reset_on_accept=reset_on_accept, oracle=oracle,
                           budget=budget, draws=draws, eval_draws=eval_draws, fresh_noise=fresh_noise,
                           loss_floor=loss_floor, lora_alpha=lora_alpha, selection=selection, crossover=crossover,
                           crossover_t=crossover_t, mutation=mutation, finetune_steps=finetune_steps,
                           finetune_lr=finetune_lr, acar=acar, acar_tol=acar_tol)
    cfg = SweepConfig(task=task, solver=solver, alignment=(rng.lo, rng.hi), points=points, axis=axis_name,
                      axis_range=(axis_rng.lo, axis_rng.hi) if axis_rng else None, axis_points=axis_points,
                      seeds=tuple(seed_list), eps=eps, alpha=alpha, search=search, trials=trials)
    from pathlib import Path

    from substrate.defaults import resolve_device

    dev = resolve_device(device)       # --device cuda without a GPU: one line, exit 2
    run_dir = Path(out) if out else default_out("sweep", cfg.folder_key())
    console = Console(stderr=False)
    if not console.is_terminal:
        console = Console(width=150)
    from sandbox.app.commands.worker import check_collect, define
    from sweeps.grid import DEFAULT_STUDY
    from sweeps.worker import is_database, sweep_jobs

    if enqueue_only or is_database(storage):
        jobs = sweep_jobs(cfg) if enqueue_only or cfg.search == "grid" else []
        if enqueue_only:
            return define(console, jobs, storage, study or DEFAULT_STUDY, "maximize", "sweep",
                          argv=["sandbox", *sys.argv[1:]])
        check_collect(storage, study or DEFAULT_STUDY, jobs)   # workers still running: refuse, not compute
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]sweep"), BarColumn(), MofNCompleteColumn(), TextColumn("seed-points"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=console, transient=False) as bar:
        task_id = bar.add_task("", total=None)

        def progress(done: int, total: int, values: dict) -> None:
            bar.update(task_id, completed=done, total=total,
                       description=", ".join(f"{k}={_fmt(v)}" for k, v in values.items()))

        res = run_sweep(cfg, run_dir, storage=storage, study=study, progress=progress, figures=figures,
                        chunk_rows=chunk_rows, device=dev,
                        argv=["sandbox", "sweep", *sys.argv[2:]] if sys.argv[1:2] == ["sweep"] else None)
    _print_summary(console, res.summary, cfg.axes)
    console.print(f"{res.computed} seed-points computed, {res.reused} reused from the ledger, "
                  f"{time.perf_counter() - t0:.1f} s; folder {run_dir}", highlight=False)
    for f in res.figures:
        console.print(f"  {f}", highlight=False)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _print_summary(console, summary, axes: list[str]) -> None:
    import pandas as pd
    from rich.table import Table

    colours = {"beats": "green", "degrades": "red", "ties": "cyan", "inconclusive": "yellow", "inert": "bright_black",
               "no-room": "magenta", "beats<eps": "green", "degrades<eps": "red"}
    acar = "delta_acar" in summary.columns          # the acar arm (--acar): its delta, label and mean slots
    t = Table(title="regimes (delta = log loss_grad - log loss_evo; positive = evolution better; "
              "restart = optimiser restart only; room = oracle ceiling"
              + ("; acar = log loss_grad - log loss_acar, acar slots = mean slots gated" if acar else "") + ")",
              title_justify="left")
    for c in ["point", *axes, "n", "delta", "95% CI", "p (Holm)", "regime", "restart", "room", "accepted",
              "seeds needed", *(["acar", "acar regime", "acar slots"] if acar else [])]:
        t.add_column(c, justify="left" if c.endswith("regime") else "right")

    def num(v, fmt="+.4f") -> str:
        return "" if v is None or pd.isna(v) else format(v, fmt)

    for r in summary.to_dict("records"):
        need = r.get("seeds_needed")
        t.add_row(str(r["point"]), *(_fmt(r[a]) for a in axes), str(r["n"]), num(r["mean_delta"]),
                  f"[{num(r['ci_low'])}, {num(r['ci_high'])}]", num(r["p_holm"], ".3g"),
                  f"[{colours.get(r['regime'], 'white')}]{r['regime']}[/]",
                  num(r.get("delta_restart")), num(r.get("room")), num(r.get("accepted"), ".2f"),
                  "" if need is None or pd.isna(need) else str(need),
                  *([num(r["delta_acar"]), f"[{colours.get(r['acar_regime'], 'white')}]{r['acar_regime']}[/]",
                     num(r["acar_mean_slots"], ".2f")] if acar else []))
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("sweep")(sweep)
