"""`sandbox full --cell CELL`: one factorial cell on the transformer substrate, one run folder per seed.

The knob options are shared with `sandbox factorial` (`cell_template` builds the `CellConfig`).
Defaults that depend on the machine: with CUDA the preset is widened-1536 for 25,000 steps; on a
CPU it is `small` for `CPU_STEPS` steps, and the command says so. Lifecycle interval, minimum age,
evaluation and checkpoint intervals default to values scaled to the step count (`schedule`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

GPU_PRESET, GPU_STEPS = "widened-1536", 25_000
CPU_PRESET, CPU_STEPS = "small", 200
PRESET_STEPS = {"tiny": 100, "small": CPU_STEPS}

# Shared option declarations (used by `full` and `factorial`).
O = dict(
    preset=typer.Option(None, "--preset", help="tiny, small or widened-1536 (default: widened-1536 with CUDA, small on CPU)."),
    steps=typer.Option(None, "--steps", help="Adaptation steps (default: 25000 for widened-1536, 200 for small, 100 "
                       "for tiny; with no --preset, widened-1536 on CUDA and small on CPU)."),
    alignment=typer.Option(0.5, "--alignment", help="Starting adapters: 0 random .. 1 the per-domain specialists."),
    data=typer.Option(None, "--data", help="Real text folder (one subfolder of .txt files per domain)."),
    device=typer.Option("auto", "--device", help="auto, cpu or cuda."),
    batch=typer.Option(8, "--batch", help="Training windows per step."),
    lr=typer.Option(3e-3, "--lr", help="Peak Adam learning rate."),
    eval_every=typer.Option(None, "--eval-every", help="Steps between held-out evaluations (default steps/5, at most 1000)."),
    checkpoint_every=typer.Option(None, "--checkpoint-every", help="Steps between checkpoints (default = --eval-every)."),
    interval=typer.Option(None, "--interval", help="Steps between lifecycle events / fitness measurements (default steps/5, at most 250)."),
    n_die=typer.Option(1, "--n-die", help="Slots that die per lifecycle event."),
    min_age=typer.Option(None, "--min-age", help="Minimum age (steps) before a slot may die (default 2 x interval, at most 500)."),
    inherit_alpha=typer.Option(0.5, "--inherit-alpha", help="Inheritance alpha in [0, 1]; 0 = the no-inheritance counterfactual."),
    inherit_mode=typer.Option("blend", "--inherit-mode", help="blend (into nearest neighbour) or child (into the newborn)."),
    mutation_sigma=typer.Option(0.1, "--mutation-sigma", help="Log-normal SVD mutation scale on singular values."),
    per_domain_agg=typer.Option("max", "--per-domain-agg", help="Per-domain fitness aggregator (E): max, mean or median."),
    selection=typer.Option("tournament", "--selection", help="Lifecycle parent selection: tournament or roulette (EvoMerge, fitness-proportional)."),
    crossover=typer.Option("none", "--crossover", help="Lifecycle crossover: none or slerp (EvoMerge: newborn = SLERP of two fit parents)."),
    crossover_t=typer.Option(None, "--crossover-t", help="SLERP weight of the second parent in [0, 1] (default: drawn U(0, 1) per newborn)."),
    mutation=typer.Option("svd", "--mutation", help="Newborn mutation: svd, finetune (EvoMerge: gradient steps on its target domain, other slots frozen) or svd+finetune."),
    finetune_steps=typer.Option(1, "--finetune-steps", help="Gradient steps of --mutation finetune (each on --batch fresh windows)."),
    finetune_lr=typer.Option(0.01, "--finetune-lr", help="Step length (factor space) of --mutation finetune."),
    fit_windows=typer.Option(4, "--fit-windows", help="Selection-batch windows per domain for leave-one-out fitness."),
    floor_max=typer.Option(0.1, "--floor-max", help="Upper bound of the sigmoid router's per-slot floor."),
    tau_start=typer.Option(2.0, "--tau-start", help="Sigmoid temperature at step 0."),
    tau_end=typer.Option(0.5, "--tau-end", help="Sigmoid temperature at the end of the anneal."),
    tau_min=typer.Option(0.25, "--tau-min", help="Lower temperature bound."),
    tau_max=typer.Option(4.0, "--tau-max", help="Upper temperature bound."),
    anneal_steps=typer.Option(None, "--anneal-steps", help="Temperature anneal length (default: all steps)."),
    router_init=typer.Option("mass", "--router-init", help="Sigmoid router start: mass (fair: expected total gate "
                             "weight per token at step 0 = the softmax's 1) or zero (bias 0, total about K(1+floor)/2)."),
    router_kind=typer.Option("auto", "--router", help="Router kind: auto (the cell's: softmax for B3, sigmoid with R) or "
                             "acar (sigma routing: top-3 slots by held-in loss, 1/2/3 gated equally by their agreement)."),
    pooling=typer.Option("causal", "--pooling", help="Routing-feature pooling: causal, or sequence (leaks the future)."),
    perturb_base=typer.Option(0.0, "--perturb-base", help="Probe: relative Gaussian noise on the frozen base weights."),
    slots=typer.Option(16, "--slots", help="K adapter slots."),
    rank=typer.Option(8, "--rank", help="Adapter rank r."),
    context=typer.Option(None, "--context", help="Window length T (default per preset)."),
    pretrain_steps=typer.Option(None, "--pretrain-steps", help="Base pretraining steps (default per preset; cached)."),
    eval_windows=typer.Option(None, "--eval-windows", help="Held-out windows per domain per evaluation (default all)."),
    cache=typer.Option("runs/cache", "--cache", help="Cache folder for corpora, pretrained bases and specialists."),
    threads=typer.Option(None, "--threads", help="torch CPU threads (default: 1 on machines with <= 2 cores, else torch's default)."),
    yes=typer.Option(False, "--yes", help="Run widened-1536 on a CPU anyway (it takes weeks there; refused without it)."),
)
#: The options that become `CellConfig` fields (all of `O` except the execution settings).
KNOBS = tuple(k for k in O if k not in ("cache", "threads", "yes"))
#: Throughput of widened-1536 measured on 2 CPU cores (README, "Speed on this machine"): tokens/s.
CPU_TOKENS_PER_S = {"adapt": 40.0, "pretrain": 16.0}


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


def resolve_device(device: str) -> str:
    import torch

    from sandbox.errors import BadInput

    if device not in ("auto", "cpu", "cuda"):
        raise BadInput("--device", device, "auto, cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device", device, "auto or cpu (no CUDA device is visible)")
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def schedule(steps: int, interval: int | None, min_age: int | None, eval_every: int | None,
             checkpoint_every: int | None) -> dict:
    """Step-scaled defaults: interval steps/5 (<= 250), min age 2 x interval (<= 500), eval steps/5 (<= 1000)."""
    iv = interval if interval is not None else min(250, max(5, steps // 5))
    ev = eval_every if eval_every is not None else min(1000, max(1, steps // 5))
    return {"interval": iv, "min_age": min_age if min_age is not None else min(500, 2 * iv), "eval_every": ev,
            "checkpoint_every": checkpoint_every if checkpoint_every is not None else ev}


def cpu_hours(cfg) -> float:
    """Rough CPU hours of one run of `cfg` (adaptation plus, if not cached yet, pretraining), from
    the throughput measured for widened-1536 on 2 cores (`CPU_TOKENS_PER_S`)."""
    s = cfg.substrate()
    adapt = cfg.steps * cfg.batch * s["context"] / CPU_TOKENS_PER_S["adapt"]
    pre = s["pretrain_steps"] * s["pretrain_batch"] * s["context"] / CPU_TOKENS_PER_S["pretrain"]
    return (adapt + pre) / 3600


def check_affordable(cfg, yes: bool) -> None:
    """Refuse widened-1536 on a CPU unless `yes`: it would silently start weeks of work."""
    from sandbox.errors import BadInput

    if cfg.device == "cpu" and cfg.preset == GPU_PRESET and not yes:
        s = cfg.substrate()
        raise BadInput("--preset", cfg.preset, f"tiny or small on a CPU ({GPU_PRESET} here means {cfg.steps} steps plus "
                       f"{s['pretrain_steps']} pretraining steps, roughly {cpu_hours(cfg):,.0f} CPU hours at the "
                       f"throughput measured on 2 cores; add --yes to run it anyway)")


def cell_template(cell: str, seed: int, kw: dict, say, yes: bool = False) -> "CellConfig":
    """A validated `CellConfig` from the command's options (`kw`), resolving device and defaults.
    widened-1536 on a CPU is refused unless `yes` (`check_affordable`)."""
    from sandbox.errors import BadInput
    from substrate.cell import CellConfig

    device = resolve_device(kw.pop("device"))
    preset, steps = kw.pop("preset"), kw.pop("steps")
    note = None
    if preset is None and steps is None:
        if device == "cuda":
            preset, steps = GPU_PRESET, GPU_STEPS
        else:
            preset, steps = CPU_PRESET, CPU_STEPS
            note = f"no CUDA: running preset {CPU_PRESET} for {CPU_STEPS} steps instead of {GPU_PRESET} x {GPU_STEPS}"
    elif preset is None:
        preset = GPU_PRESET if device == "cuda" else CPU_PRESET
    elif steps is None:
        steps = GPU_STEPS if (preset == GPU_PRESET and device == "cuda") else PRESET_STEPS.get(preset, GPU_STEPS)
    if not isinstance(steps, int) or steps < 1:
        raise BadInput("--steps", steps, "an integer >= 1")
    for k in ("interval", "min_age", "eval_every", "checkpoint_every"):
        v = kw.get(k)
        if v is not None and v < (1 if k in ("interval", "eval_every") else 0):
            raise BadInput("--" + k.replace("_", "-"), v, "an integer >= " + ("1" if k in ("interval", "eval_every") else "0"))
    kw.update(schedule(steps, kw.pop("interval"), kw.pop("min_age"), kw.pop("eval_every"), kw.pop("checkpoint_every")))
    if kw.get("data") is not None and not Path(kw["data"]).is_dir():
        raise BadInput("--data", kw["data"], "a folder with one subfolder of .txt files per domain")
    cfg = CellConfig(cell=cell, seed=seed, preset=preset, steps=steps, device=device, **kw)   # validates every knob
    check_affordable(cfg, yes)
    if note:
        say(note)
    return cfg


def full(
    cell: str = typer.Option(..., "--cell", help="Factors: B3, R, E, L, R+E, L+R, E+L, R+E+L (full); order and case free."),
    seeds: str = typer.Option("42,", "--seeds", help="Seeds: a comma list (42,137,2026) or a count; one run folder per seed."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default runs/full-<cell>-<hash>); seed s goes to OUT/seed-s."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", hidden=True, help="Stop each run after this many steps in this invocation."),
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
) -> None:
    """Run one factorial cell (R: sigmoid router on hidden states; E: per-domain fitness; L: lifecycle)."""
    kw = {k: v for k, v in locals().items() if k in KNOBS}
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
    template = cell_template(name, seed_list[0], kw, lambda m: console.print(m), yes=yes)
    root = Path(out) if out else Path("runs") / f"full-{name.replace('+', '')}-{config_hash(template.identity())[:8]}"
    from sandbox.results import check_folder, claim_run_dir, release_run_dir

    check_folder(cache, "--cache")
    claim_run_dir(root, "full")   # the seeds' parent: never another command's folder, one run at a time
    rows = []
    for seed in seed_list:
        cfg = replace(template, seed=seed)
        folder = root / f"seed-{seed}"
        metrics = _run_one(cfg, folder, cache, stop_after, console)
        rows.append((seed, folder, metrics))
    release_run_dir(root)
    _print_summary(name, rows)


def _run_one(cfg, folder: Path, cache: str, stop_after, console):
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from figures.report import build_report
    from substrate.cell import run_cell

    console.print(f"cell {cfg.cell} seed {cfg.seed}: preset {cfg.preset}, {cfg.steps} steps on {cfg.device} -> {folder}")
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(f"{cfg.cell} s{cfg.seed}", total=cfg.steps, loss="-")

        def progress(step, steps, info):
            bar.update(task, completed=step, loss=f"{info['loss']:.4f}")

        res = run_cell(cfg, folder, cache, stop_after=stop_after, argv=["sandbox", *sys.argv[1:]], progress=progress,
                       log=lambda m: console.print(m), draw_figures=build_report)
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
    app.command("full")(full)
