"""`sandbox factorial`: cells x seeds on the transformer, each (cell, seed) a resumable ledger trial,
then the attribution of the effect to router, scope and lifecycle (named contrasts and the chain)."""

from __future__ import annotations


from typing import Optional

import typer

from sandbox.app.replay import recorded_argv

from sandbox.app.cellopts import apply_threads, cell_options, cell_template, run_options


def _factorial_options() -> list:
    from sandbox.app.declare import field_docs, from_fields, own
    from sweeps.factorial import FactorialConfig

    fc, doc = FactorialConfig(), field_docs(FactorialConfig)

    return [own("cells", "partial", "--cells", help="Comma list of cells, 'partial' (B3,R,R+E,R+L,R+E+L) or 'all'."),
            own("seeds", "42,137,2026", "--seeds", help="Seeds: a comma list or a count."),
            own("out", None, "--out", help="Output folder (default runs/factorial-<hash>); rerun to resume."),
            own("overwrite", False, "--overwrite", help="Replace the --out folder whole (a run folder of this tool holding another configuration: its tables, figures, journal and checkpoints are removed). Without it a folder holding another configuration is refused; the same configuration resumes."),
            own("storage", None, "--storage", help="Optuna storage URL for the ledger (default OUT/ledger.journal)."),
            own("setting", None, "--setting", annotation=Optional[str], help=_setting_help()),
            *from_fields(FactorialConfig, ("eps", "alpha", "seeds_to_resolve", "round_seeds", "spending", "tune")),
            own("tune_router_lr", ",".join(f"{m:g}" for m in fc.tune_router_lr), "--tune-router-lr",
                help=doc["tune_router_lr"] + " Comma list."),
            own("tune_seeds", ",".join(map(str, fc.tune_seeds)), "--tune-seeds", help=doc["tune_seeds"] + " Comma list."),
            *cell_options(), *run_options(),
            own("no_figures", False, "--no-figures", help="Skip drawing figures (tables only)."),
            own("enqueue_only", False, "--enqueue-only", help="Define step for `sandbox worker`: queue every (cell, "
                "seed) trial on a PostgreSQL --storage and exit (with --tune grid: the tuning trials, then, once they "
                "have finished, the evaluation trials at each cell's chosen router lr).")]


def _setting_help() -> str:
    from sweeps.factorial import SETTINGS

    named = "; ".join(f"{name}: " + " ".join(_as_flags(values)) for name, values in SETTINGS.items())
    return (f"A named bundle of option values ({named}); options given on the command line win. The run is the same "
            "as with the values written out; the manifest records the setting.")


def _as_flags(values: dict) -> list[str]:
    return [f"--{k.replace('_', '-')} {v}" for k, v in values.items()]


def _given(kw: dict) -> set[str]:
    """The options of this invocation given on the command line (click's parameter source); without a
    click context (a direct call), those that differ from their declared defaults."""
    import click

    ctx = click.get_current_context(silent=True)
    if ctx is not None:
        from click.core import ParameterSource

        return {k for k in kw if ctx.get_parameter_source(k) not in (None, ParameterSource.DEFAULT,
                                                                    ParameterSource.DEFAULT_MAP)}
    defaults = {o.name: o.default for o in _factorial_options()}
    return {k for k, v in kw.items() if k in defaults and v != defaults[k]}


def factorial(got) -> None:
    """Run the factorial of cells x seeds and attribute the effect (probes: --inherit-alpha 0, --perturb-base S)."""
    setting, record = got["setting"], None
    if setting is not None:   # fills the options not given on the command line, before anything reads them
        from sweeps.factorial import resolve_setting

        record = resolve_setting(setting, got.values, _given(got.values))
    out, storage, cache = got["out"], got["storage"], got["cache"]
    from sweeps.ledger import check_names

    check_names(out=out, storage=storage, cache=cache)   # empty, too long: one line
    apply_threads(got["threads"])
    from pathlib import Path

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sandbox.factors import parse_cells
    from sandbox.options import parse_seeds
    from sandbox.results import config_hash
    from sweeps.factorial import FactorialConfig, run_factorial

    err = Console(stderr=True)
    chosen = [c.name for c in parse_cells(got["cells"])]
    seed_list = parse_seeds(got["seeds"])
    notes: list[str] = []
    template = cell_template(chosen[0], seed_list[0], got, notes.append, yes=got["yes"],
                             one_base=got["seeds_to_resolve"] is not None)
    from sandbox.options import parse_numbers

    ts = str(got["tune_seeds"]).strip()
    fcfg = got.build(FactorialConfig, base=template, cells=tuple(chosen), seeds=tuple(seed_list),
                     tune_router_lr=parse_numbers(got["tune_router_lr"], "--tune-router-lr"),
                     tune_seeds=tuple(parse_seeds(ts if "," in ts else ts + ",", "--tune-seeds")))
    if record is not None:
        kept = record["overridden"]
        notes.insert(0, f"setting {record['name']}: " + " ".join(_as_flags(record["applied"]))
                     + (f" (given on the command line instead: {' '.join(_as_flags(kept))})" if kept else ""))
    for note in notes:  # printed only once every option is known to be valid
        err.print(note, highlight=False, soft_wrap=True)
    root = Path(out) if out else Path("runs") / f"factorial-{config_hash(fcfg.settings())[:8]}"
    from sandbox.results import check_folder, open_run_dir

    check_folder(cache, "--cache")
    enqueue_only = got["enqueue_only"]
    if enqueue_only and fcfg.seeds_to_resolve is not None:   # later rounds depend on each look's test
        from sandbox.errors import BadInput

        raise BadInput("--enqueue-only", f"with --seeds-to-resolve {fcfg.seeds_to_resolve}",
                       "a fixed-seed factorial (a sequential run's later rounds depend on each look's test, so "
                       "only its first round could be queued ahead): queue a fixed --seeds list, or run the "
                       "sequential factorial without --enqueue-only")
    if enqueue_only:   # workers write trials/<cell>_s<seed> under OUT; the collect run claims OUT later
        from sandbox.app.plan import define
        from sweeps.factorial import study_name
        from sweeps.systems import factorial_plan

        from sweeps.ledger import METRICS

        if fcfg.tuning:   # the plan reads the study's finished tuning trials: the PostgreSQL storage first
            from sweeps.worker import database

            database(storage, "--storage")
        jobs, what = factorial_plan(fcfg, root, cache, storage)
        if what:
            err.print(what, highlight=False, soft_wrap=True)
        return define(err, jobs, storage, study_name(fcfg), "minimize", "factorial",
                      argv=recorded_argv(), metric=METRICS["factorial"])
    open_run_dir(root, "factorial", fcfg, got["overwrite"])   # a held, foreign or other-config folder: refused before printing
    from sandbox.results import replaced_note

    if replaced_note(root):
        err.print(replaced_note(root), highlight=False, soft_wrap=True)
    err.print(f"factorial: {len(chosen)} cells x {len(seed_list)} seeds on {template.bases} base(s) (seed s adapts base "
              f"s mod {template.bases}), preset {template.preset}, {template.steps} steps each on {template.device} -> {root}")
    if fcfg.seeds_to_resolve is not None:
        err.print(f"sequential: looks at {fcfg.looks()} seeds ({fcfg.spending} alpha spending, alpha {fcfg.alpha:g}, "
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
        from sandbox.app.progress import stage_callback   # pretraining and specialists, when not cached

        def on_trial(cell, seed, computed):
            grow(pool.index(seed) + 1)
            bar.update(steps_task, description=f"{cell} s{seed}", completed=0, visible=computed)
            if not computed:
                bar.advance(trials)

        def progress(cell, seed, step, n, info):
            bar.update(steps_task, completed=step)
            if step == n:
                bar.advance(trials)

        res = run_factorial(fcfg, root, cache, storage=storage, figures=not got["no_figures"], overwrite=got["overwrite"],
                            argv=recorded_argv(), setting=record, on_trial=on_trial, progress=progress,
                            log=lambda m: err.print(m), stage=stage_callback(bar))
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
    unit = a["unit"].iloc[0] if "unit" in a else "seed"
    where = (f"CIs across {int(a['bases'].iloc[0])} bases, seeds averaged within base" if unit == "base" else
             "CIs across seeds, conditional on one base")
    t = Table(title="attribution: delta = log PPL(reference) - log PPL(treated), > 0 = treated better")
    lr_title = "router lr tuned (treated / ref)" if bool(a.get("router_lr_tuned", [False])[0]) else \
        "router lr NOT tuned (treated / ref)"
    for col in ("contrast", "cells", f"n ({unit}s)", "mean delta", "95% CI", "t", "p", "p Holm", "regime", f"{unit}s needed",
                lr_title):
        t.add_column(col)
    fmt = lambda v, f: "" if v is None or not math.isfinite(v) else format(v, f)
    for _, r in a.iterrows():
        ci = "" if not math.isfinite(r["ci_low"]) else f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"
        cells = f"{r['treated']} vs {r['reference']}" if r["kind"] != "interaction" else "8 cells"
        need = r.get("seeds_needed")
        need = "" if need is None or need != need else str(int(need))
        regime = r.get("regime") if isinstance(r.get("regime"), str) else ""
        lrs = " / ".join(fmt(r.get(f"{side}_router_lr", math.nan), ".4g") for side in ("treated", "reference"))
        t.add_row(str(r["contrast"]), cells, str(int(r["n"])), fmt(r["mean_delta"], "+.4f"),
                  ci, fmt(r["t"], ".2f"), fmt(r["p"], ".3g"), fmt(r.get("p_holm", math.nan), ".3g"), regime, need,
                  lrs if lrs != " / " else "")
    console.print(t)
    console.print(f"unit of replication: {where}", highlight=False, soft_wrap=True)
    from sweeps.factorial import tuning_lines

    for line in tuning_lines(res):
        console.print(line, highlight=False, soft_wrap=True)
    by = {r["contrast"]: r for _, r in a.iterrows()}
    if "chain_sum" in by and "system" in by:
        console.print(f"chain router + scope + lifecycle = {by['chain_sum']['mean_delta']:+.4f} vs direct R+E+L - B3 = "
                      f"{by['system']['mean_delta']:+.4f} (gap {by['chain_sum']['mean_delta'] - by['system']['mean_delta']:+.2g})")
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
    from sandbox.app.declare import declared

    app.command("factorial")(declared(_factorial_options())(factorial))
