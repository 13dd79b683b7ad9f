"""`sandbox factorial`: cells x seeds on the transformer, each (cell, seed) a resumable ledger trial,
then the attribution of the effect to router, scope and lifecycle (named contrasts and the chain)."""

from __future__ import annotations

from typing import Optional

import typer

from sandbox.app.commands.full import KNOBS, O


def factorial(
    cells: str = typer.Option("partial", "--cells", help="Comma list of cells, 'partial' (B3,R,R+E,R+L,R+E+L) or 'all'."),
    seeds: str = typer.Option("42,137,2026", "--seeds", help="Seeds: a comma list or a count."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default runs/factorial-<hash>); rerun to resume."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL for the ledger (default OUT/ledger.journal)."),
    eps: float = typer.Option(0.01, "--eps", help="Equivalence margin (nats) for the paired statistics."),
    alpha_level: float = typer.Option(0.05, "--alpha", help="Test level."),
    seeds_to_resolve: Optional[int] = typer.Option(None, "--seeds-to-resolve", help="Add seeds in rounds until every "
                                                   "named contrast is classified or this many seeds are reached "
                                                   "(group-sequential, overall error alpha)."),
    round_seeds: Optional[int] = typer.Option(None, "--round-seeds", help="Seeds added per round with "
                                              "--seeds-to-resolve (default: as many as --seeds; >= 2)."),
    spending: str = typer.Option("obf", "--spending", help="Alpha spending of the sequential design: obf "
                                 "(Lan-DeMets O'Brien-Fleming type) or pocock."),
    preset: Optional[str] = O["preset"], steps: Optional[int] = O["steps"], alignment: float = O["alignment"],
    data: Optional[str] = O["data"], device: str = O["device"], batch: int = O["batch"], lr: float = O["lr"],
    eval_every: Optional[int] = O["eval_every"], checkpoint_every: Optional[int] = O["checkpoint_every"],
    interval: Optional[int] = O["interval"], n_die: int = O["n_die"], min_age: Optional[int] = O["min_age"],
    inherit_alpha: float = O["inherit_alpha"], inherit_mode: str = O["inherit_mode"],
    mutation_sigma: float = O["mutation_sigma"], per_domain_agg: str = O["per_domain_agg"],
    selection: str = O["selection"], crossover: str = O["crossover"], crossover_t: Optional[float] = O["crossover_t"],
    mutation: str = O["mutation"], finetune_steps: int = O["finetune_steps"], finetune_lr: float = O["finetune_lr"],
    fit_windows: int = O["fit_windows"], floor_max: float = O["floor_max"], tau_start: float = O["tau_start"],
    tau_end: float = O["tau_end"], tau_min: float = O["tau_min"], tau_max: float = O["tau_max"],
    anneal_steps: Optional[int] = O["anneal_steps"], router_init: str = O["router_init"], pooling: str = O["pooling"],
    router_kind: str = O["router_kind"],
    perturb_base: float = O["perturb_base"],
    slots: int = O["slots"], rank: int = O["rank"], context: Optional[int] = O["context"],
    pretrain_steps: Optional[int] = O["pretrain_steps"], eval_windows: Optional[int] = O["eval_windows"],
    cache: str = O["cache"], threads: Optional[int] = O["threads"], yes: bool = O["yes"],
    no_figures: bool = typer.Option(False, "--no-figures", help="Skip drawing figures (tables only)."),
    enqueue_only: bool = typer.Option(False, "--enqueue-only", help="Define step for `sandbox worker`: queue every (cell, seed) trial on a PostgreSQL --storage and exit."),
) -> None:
    """Run the factorial of cells x seeds and attribute the effect (probes: --inherit-alpha 0, --perturb-base S)."""
    kw = {k: v for k, v in locals().items() if k in KNOBS}
    from sandbox.app.commands.full import apply_threads

    apply_threads(threads)
    import sys
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sandbox.factors import parse_cells
    from sandbox.app.commands.full import cell_template
    from sandbox.options import parse_seeds
    from sandbox.results import config_hash
    from sweeps.factorial import FactorialConfig, run_factorial

    err = Console(stderr=True)
    chosen = [c.name for c in parse_cells(cells)]
    seed_list = parse_seeds(seeds)
    notes: list[str] = []
    template = cell_template(chosen[0], seed_list[0], kw, notes.append, yes=yes)
    fcfg = FactorialConfig(base=template, cells=tuple(chosen), seeds=tuple(seed_list), eps=eps, alpha=alpha_level,
                           seeds_to_resolve=seeds_to_resolve, round_seeds=round_seeds, spending=spending)
    for note in notes:  # printed only once every option is known to be valid
        err.print(note)
    root = Path(out) if out else Path("runs") / f"factorial-{config_hash(fcfg.settings())[:8]}"
    from sandbox.results import check_folder, claim_run_dir

    check_folder(cache, "--cache")
    if enqueue_only:   # workers write trials/<cell>_s<seed> under OUT; the collect run claims OUT later
        from sandbox.app.commands.worker import define
        from sweeps.factorial import study_name
        from sweeps.worker import factorial_jobs

        return define(err, factorial_jobs(fcfg, root, cache), storage, study_name(fcfg), "minimize", "factorial",
                      argv=["sandbox", *sys.argv[1:]])
    claim_run_dir(root, "factorial")   # refuse a held or foreign folder before printing anything
    err.print(f"factorial: {len(chosen)} cells x {len(seed_list)} seeds, preset {template.preset}, "
              f"{template.steps} steps each on {template.device} -> {root}")
    if seeds_to_resolve is not None:
        err.print(f"sequential: looks at {fcfg.looks()} seeds ({spending} alpha spending, alpha {alpha_level:g}, "
                  f"Holm over the contrasts)")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err) as bar:
        trials = bar.add_task("trials", total=len(chosen) * len(seed_list))
        grown = [len(seed_list)]

        def grow(n: int) -> None:   # a sequential run's next round adds trials to the bar
            if n > grown[0]:
                bar.update(trials, total=len(chosen) * n)
                grown[0] = n
        steps_task = bar.add_task("steps", total=template.steps, visible=False)

        pool = fcfg.seed_pool()

        def on_trial(cell, seed, computed):
            grow(pool.index(seed) + 1)
            bar.update(steps_task, description=f"{cell} s{seed}", completed=0, visible=computed)
            if not computed:
                bar.advance(trials)

        def progress(cell, seed, step, n, info):
            bar.update(steps_task, completed=step)
            if step == n:
                bar.advance(trials)

        res = run_factorial(fcfg, root, cache, storage=storage, figures=not no_figures,
                            argv=["sandbox", *sys.argv[1:]], on_trial=on_trial, progress=progress,
                            log=lambda m: err.print(m))
    err.print(f"trials: {res.computed} computed, {res.reused} reused from the ledger")
    print_attribution(res)


def print_attribution(res) -> None:
    """Rich tables: balanced log-PPL per cell and every named contrast, then the chain vs direct."""
    import math

    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        console = Console(width=200)
    c = res.cells
    t = Table(title="cells: balanced held-out log-PPL (nats/token), per seed")
    t.add_column("cell")
    seeds = sorted(c["seed"].unique())
    for s in seeds:
        t.add_column(f"seed {s}")
    for cell in dict.fromkeys(c["cell"]):
        vals = c[c["cell"] == cell].set_index("seed")["balanced_log_ppl"]
        t.add_row(cell, *(f"{vals[s]:.4f}" if s in vals.index and math.isfinite(vals[s]) else "diverged" for s in seeds))
    console.print(t)
    a = res.attribution
    if not len(a):
        console.print("attribution: needs at least two cells of a named contrast")
        return
    t = Table(title="attribution: delta = log PPL(reference) - log PPL(treated), > 0 = treated better")
    for col in ("contrast", "cells", "n", "mean delta", "95% CI", "t", "p", "p Holm", "regime", "seeds needed"):
        t.add_column(col)
    fmt = lambda v, f: "" if v is None or not math.isfinite(v) else format(v, f)
    for _, r in a.iterrows():
        ci = "" if not math.isfinite(r["ci_low"]) else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        cells = f"{r['treated']} vs {r['reference']}" if r["kind"] != "interaction" else "8 cells"
        need = r.get("seeds_needed")
        need = "" if need is None or need != need else str(int(need))
        regime = r.get("regime") if isinstance(r.get("regime"), str) else ""
        t.add_row(str(r["contrast"]), cells, str(int(r["n"])), fmt(r["mean_delta"], "+.4f"),
                  ci, fmt(r["t"], ".2f"), fmt(r["p"], ".3g"), fmt(r.get("p_holm", math.nan), ".3g"), regime, need)
    console.print(t)
    by = {r["contrast"]: r for _, r in a.iterrows()}
    if "chain_sum" in by and "full" in by:
        console.print(f"chain router + scope + lifecycle = {by['chain_sum']['mean_delta']:+.4f} vs direct full - B3 = "
                      f"{by['full']['mean_delta']:+.4f} (gap {by['chain_sum']['mean_delta'] - by['full']['mean_delta']:+.2g})")
    from sweeps.factorial import scope_under_lifecycle

    extra = scope_under_lifecycle(c)
    if extra is not None and extra.n:
        console.print(f"scope under lifecycle (R+E+L vs R+L, not a named contrast): n={extra.n} mean delta "
                      f"{extra.mean:+.4f} [{extra.ci_low:+.4f}, {extra.ci_high:+.4f}] t={extra.t:.2f} p={extra.p:.3g}")
    if res.sequential:
        t = Table(title=f"sequential design: looks at {res.looks} seeds; a verdict holds the overall error at alpha")
        for col in ("contrast", "verdict", "look", "seeds", "why"):
            t.add_column(col, overflow="fold")
        for d in res.sequential:
            t.add_row(d.contrast, d.regime, str(d.look or ""), str(d.seeds), d.reason)
        console.print(t)
    console.print(f"tables and figures in {res.out}")


def register(app: typer.Typer) -> None:
    app.command("factorial")(factorial)
