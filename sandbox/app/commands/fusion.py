"""`sandbox fusion`: when does specialist fusion pay? The divergence-gain map (`sweeps.fusion`).

From one shared base, specialists are trained for each of ``--specialist-steps`` (the points; more
steps = more divergence), fused by the B3 (softmax) and R (sigmoid) routers trained alone for
``--router-steps``, and compared with the best single specialist, uniform averaging and
domain-oracle routing, per seed. Writes fusion.csv, fit.csv / fit.json and figures/fusion.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Optional

import typer

from sandbox.app.replay import recorded_argv


def _steps_list(text: str) -> tuple[int, ...]:
    from sandbox.errors import BadInput

    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d{1,7}", p) for p in parts):
        raise BadInput("--specialist-steps", text, "a comma list of distinct integers in 1..1000000 (e.g. 1,3,10,30,100)")
    vals = tuple(int(p) for p in parts)
    if min(vals) < 1 or len(set(vals)) != len(vals):
        raise BadInput("--specialist-steps", text, "a comma list of distinct integers in 1..1000000 (e.g. 1,3,10,30,100)")
    return vals


def _fusion_options() -> list:
    from sandbox.app.declare import from_fields, own
    from substrate.fusion import FusionConfig
    from sweeps.fusion import FusionSweepConfig

    sweep = FusionSweepConfig()
    return [own("specialist_steps", ",".join(map(str, sweep.specialist_steps)), "--specialist-steps",
                help="Points: specialist training steps (more steps = more divergence)."),
            own("seeds", str(len(sweep.seeds)), "--seeds", help="A count (3 -> 0..2) or a comma list (42,137,2026)."),
            *from_fields(FusionConfig, ("router_steps", "router_lr", "specialist_lr", "batch", "specialists", "preset",
                                        "device"),
                         auto={"specialist_lr": "1e-2 for lora, 1e-3 for full copies",
                               "device": "cuda when visible, else cpu"}),
            *from_fields(FusionSweepConfig, ("alpha", "cache")),
            own("out", None, "--out", help="Run folder (default runs/fusion-<config hash>; the same command resumes)."),
            own("overwrite", False, "--overwrite", help="Replace the --out folder whole (a run folder of this tool holding another configuration: its tables, figures, journal and checkpoints are removed). Without it a folder holding another configuration is refused; the same configuration resumes."),
            own("storage", None, "--storage", help="Optuna storage URL or journal path (default: a journal file in --out)."),
            own("study", None, "--study", help="Optuna study name (default fusion)."),
            own("threads", None, "--threads", annotation=Optional[int],
                help="torch CPU threads (default 1 on <= 2 cores)."),
            own("figures", True, "--figures/--no-figures", help="Draw figures/fusion.{png,svg}."),
            own("yes", False, "--yes", help="Run widened-1536 on a CPU anyway.")]


def fusion(got) -> None:
    """Gain of fusing specialists over the best one, against their divergence, with a line fit."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from sandbox.app.cellopts import apply_threads
    from sandbox.options import parse_seeds
    from sandbox.results import check_folder, default_out, open_run_dir
    from substrate.defaults import check_affordable, resolve_device

    out, storage, study, alpha, cache = got["out"], got["storage"], got["study"], got["alpha"], got["cache"]
    steps = _steps_list(got["specialist_steps"])
    seed_list = parse_seeds(got["seeds"], "--seeds")
    device = resolve_device(got["device"])
    from figures.fusion import draw
    from sweeps.fusion import PUBLISHED, FusionSweepConfig, run_fusion_map

    # validates every knob, naming its flag; an unset --specialist-lr is the config's pick for the kind
    cfg = got.build(FusionSweepConfig, base={"device": device}, specialist_steps=steps, seeds=tuple(seed_list))
    base = cfg.base
    check_affordable(base.cell(), got["yes"])
    check_folder(cache, "--cache")
    apply_threads(got["threads"])
    preset, specialists, router_steps, dev = base.preset, base.specialists, base.router_steps, base.device
    run_dir = Path(out) if out else default_out("fusion", cfg.folder_key())
    open_run_dir(run_dir, "fusion", cfg, got["overwrite"])   # another configuration in --out: refused before anything runs
    from sandbox.results import replaced_note
    err = Console(stderr=True)
    if replaced_note(run_dir):
        err.print(replaced_note(run_dir), highlight=False, soft_wrap=True)
    console = Console() if Console().is_terminal else Console(width=160)
    err.print(f"fusion map: preset {preset}, {specialists} specialists, specialist steps {','.join(map(str, steps))} x {len(seed_list)} seeds, "
              f"routers B3 and R for {router_steps} steps, on {dev} -> {run_dir}", highlight=False)
    t0 = time.perf_counter()
    with Progress(TextColumn("[bold]fusion"), BarColumn(), MofNCompleteColumn(), TextColumn("point-seeds"),
                  TimeElapsedColumn(), TextColumn("{task.description}"), console=err, transient=False) as bar:
        task_id = bar.add_task("", total=len(steps) * len(seed_list))

        def progress(done, total, values):
            bar.update(task_id, completed=done, total=total,
                       description=", ".join(f"{k}={v}" for k, v in values.items()))

        res = run_fusion_map(cfg, run_dir, storage=storage, study=study, progress=progress,
                             draw=draw if got["figures"] else None, argv=recorded_argv(),
                             log=lambda m: err.print(m, highlight=False), overwrite=got["overwrite"])
    wall = time.perf_counter() - t0
    means = (res.table.groupby(["specialist_steps", "method"], sort=False)[["divergence", "gain"]].mean()
             .reset_index())
    t = Table(title="mean over seeds: divergence and gain over the best specialist (%)")
    for c in ("specialist steps", "divergence", "base", "uniform", "oracle", "B3", "R"):
        t.add_column(c, justify="right")
    for s in steps:
        d = means[means["specialist_steps"] == s].set_index("method")
        g = lambda m: f"{d.loc[m, 'gain']:+.2f}" if m in d.index else "-"
        t.add_row(str(s), f"{d['divergence'].iloc[0]:.2f}", g("base"), g("uniform"), g("oracle"), g("B3"), g("R"))
    console.print(t)
    f = Table(title=f"fit gain = a x divergence + b ({100 * (1 - alpha):.0f}% CIs); published 0.82 / -2.72 and 0.83 / -2.80")
    for c in ("method", "level", "n", "a", "a CI", "b", "b CI", "R^2", "zero at", "LOO RMSE", "published in CIs (a, b)"):
        f.add_column(c, justify="right")
    for r in res.fit.to_dict("records"):
        f.add_row(r["method"], r["level"], str(r["n"]), f"{r['slope']:.3f}",
                  f"[{r['slope_ci_low']:.3f}, {r['slope_ci_high']:.3f}]", f"{r['intercept']:+.3f}",
                  f"[{r['intercept_ci_low']:+.3f}, {r['intercept_ci_high']:+.3f}]", f"{r['r2']:.3f}",
                  f"{r['threshold']:.2f}", f"{r['loo_rmse']:.3f}",
                  f"n6: {'y' if r['pub6_slope_in_ci'] else 'n'},{'y' if r['pub6_intercept_in_ci'] else 'n'}; "
                  f"n8: {'y' if r['pub8_slope_in_ci'] else 'n'},{'y' if r['pub8_intercept_in_ci'] else 'n'}")
    console.print(f)
    console.print(f"{res.computed} point-seeds computed, {res.reused} reused from the ledger, {wall:.1f} s; "
                  f"folder {run_dir}", highlight=False)
    for p in res.figures:
        console.print(f"  {p}", highlight=False)
    _ = PUBLISHED


def register(app: typer.Typer) -> None:
    from sandbox.app.declare import declared

    app.command("fusion")(declared(_fusion_options())(fusion))
