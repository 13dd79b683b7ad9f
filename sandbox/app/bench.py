"""Benchmarks behind `sandbox bench`: measured speed against the limits, as ratios from one run.

The machine this runs on is usually shared and noisy, so every comparison is timed *interleaved*:
the candidates of one comparison (e.g. Gram form and dense form) run in alternating rounds, each
sample repeats a call until it lasts at least `min_sample_s`, and a candidate's time is the median
of its per-call sample times. Noise that hits one round hits every candidate of that round, so the
ratios are far steadier than the absolute times.

Sections (each returns plain dicts, so `--json` is just `json.dumps` of `run_bench`):

1. `bench_sandbox_loss`: one expected-loss evaluation of the analytic sandbox (every seed, domain
   and feature draw, gates from the router) in Gram form (`sandbox.analytic.domain_losses`, no
   d x d matrix) against the dense form (`dense_domain_losses`: the d x d products
   ``P_k = s B_k A_k``, then ``W = sum_k g_k P_k`` and ``||W - D_m||_F^2`` per draw).
2. `bench_mixture`: the gated mixture ``y = sum_k g_k s B_k A_k x``, forward plus backward (grads
   of x, A, B and the gates), as the two-matmul bank (`sandbox.adapters.gated_mixture`), as a
   Python loop over the K adapters, and as a single rank-r LoRA (no gates); also inside a frozen
   D x D layer (``W x + mixture`` against ``W x + single LoRA``).
3. `substrate.bench.bench_adaptation`: one adaptation step of each substrate preset.
   `substrate.bench.bench_fitness` (section ``fitness``): the lifecycle's leave-one-out fitness
   pass and the routing search's population losses, batched against sequential reference
   implementations (same losses, checked), with one adaptation step and the reference matmul in
   the same interleaved run (tiny and small presets on CPU).
4. `bench_sweep`: the default `sandbox sweep` end to end, in-process, in a temporary folder.
5. `bench_grid`: the default map's 11 points x 10 seeds x 4 arms solved point by point
   (`run_arms` per point) and as stacked batches (`run_points`), interleaved; the ratio of
   seed-points per second.
6. `bench_heatmap` (on request): a 21 x 21 alignment x plasticity map with 16 seeds and all four
   arms through `run_points`, timed once.

`targets` turns the figures into the pass/miss lines of issue 9. Nothing here asserts on time.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
import time
from dataclasses import asdict
from typing import Callable

import torch
from torch import Tensor

from sandbox.timing import BenchConfig, interleaved, machine_info, matmul_case  # noqa: F401 (BenchConfig: re-exported)
# ---------------------------------------------------------------------------------------------
# 1. Sandbox loss: Gram form against dense form
# ---------------------------------------------------------------------------------------------


def dense_domain_losses(rcfg, params: dict[str, Tensor], A: Tensor, B: Tensor, U: Tensor, V: Tensor,
                        features: Tensor, step: int, scale: float, floor: float = 0.0) -> Tensor:
    """The sandbox loss per domain ``(S, M)`` with dense d x d matrices (the baseline of the Gram form).

    ``P_k = s B_k A_k`` ``(S, K, d, d)``, ``D_m = U_m V_m`` ``(S, M, d, d)``, and for every draw n
    of domain m: ``W = sum_k g_k P_k`` and ``||W - D_m||_F^2``; mean over draws plus `floor`.
    Shapes as in `sandbox.analytic.domain_losses`: bank ``(S, K, ...)``, features ``(S, M, N, F)``,
    router params with a leading ``S``. Draws are processed one at a time so memory stays
    ``O(S M d^2)``.
    """
    from sandbox.adapters import products
    from sandbox.router import router_gates

    S, M, N, F = features.shape
    K = A.shape[-3]
    gates = router_gates(rcfg, params, features.reshape(S, M * N, F), step)   # (S, M*N, K)
    gates = gates.reshape(S, M, N, K)                                          # (S, M, N, K)
    P = products(A, B, scale).flatten(-2)                                      # (S, K, d*d)
    Dm = (U @ V).flatten(-2)                                                   # (S, M, d*d)
    out = torch.empty(S, M, N, dtype=P.dtype)
    for n in range(N):
        W = gates[:, :, n, :] @ P                                              # (S, M, d*d)
        out[:, :, n] = ((W - Dm) ** 2).sum(-1)
    return out.mean(-1) + floor


def bench_sandbox_loss(d: int, cfg: BenchConfig) -> dict:
    """Loss evaluations per second at dimension d, Gram against dense form, and their agreement.

    The task is the sandbox default (`TaskSpec` with ``dim = d``, context noise 0.1) for
    ``cfg.loss_seeds`` seeds and ``cfg.loss_draws`` feature draws per domain; float64 as the solver.
    """
    from sandbox import analytic
    from sandbox.tasks import TaskSpec, make_task, noisy_contexts

    spec = TaskSpec(dim=d, context_noise=0.1)
    scfg = analytic.AnalyticConfig(draws=cfg.loss_draws)
    task = make_task(spec, list(range(cfg.seed, cfg.seed + cfg.loss_seeds)))
    st = analytic.initial_state(task, spec, scfg)
    rcfg = analytic.router_config(spec, scfg)
    feats = noisy_contexts(task, spec.context_noise, cfg.loss_draws, salt=1).to(analytic.DTYPE)  # (S, M, N, F)
    scale = scfg.scale(spec)
    U, V = task.U.to(analytic.DTYPE), task.V.to(analytic.DTYPE)

    def gram():
        with torch.no_grad():
            return analytic.domain_losses(rcfg, st.params, st.A, st.B, task, feats, 0, scale, scfg.loss_floor)

    def dense():
        with torch.no_grad():
            return dense_domain_losses(rcfg, st.params, st.A, st.B, U, V, feats, 0, scale, scfg.loss_floor)

    lg, ld = gram(), dense()
    rel = float(((lg - ld).abs() / ld.abs().clamp_min(1e-12)).max())
    t = interleaved({"gram": gram, "dense": dense}, cfg.repeats, cfg.min_sample_s)
    return {"d": d, "seeds": cfg.loss_seeds, "domains": spec.domains, "slots": spec.slots, "rank": spec.rank,
            "draws": cfg.loss_draws, "gram_s": t["gram"].median, "dense_s": t["dense"].median,
            "gram_evals_per_s": 1 / t["gram"].median, "dense_evals_per_s": 1 / t["dense"].median,
            "speedup": t["dense"].median / t["gram"].median, "max_rel_diff": rel}


# ---------------------------------------------------------------------------------------------
# 2. Gated mixture: bank against loop against a single LoRA
# ---------------------------------------------------------------------------------------------


def loop_mixture(x: Tensor, A: Tensor, B: Tensor, gates: Tensor, scale: float) -> Tensor:
    """The per-adapter Python loop: ``sum_k gates[:, k] * s * (x A_k^T) B_k^T`` -> ``(N, d_out)``."""
    y = None
    for k in range(A.shape[-3]):
        yk = gates[:, k:k + 1] * ((x @ A[k].T) @ B[k].T)                     # (N, 1) * (N, d_out)
        y = yk if y is None else y + yk
    return y * scale


def mixture_flops(N: int, K: int, r: int, d_in: int, d_out: int) -> float:
    """Matmul FLOPs of the bank's forward plus backward: 3 x forward, forward = ``2 N K r (d_in + d_out)``.

    (Backward = input grad + weight grad, each the forward's cost; the gate products are O(N K r).)
    """
    return 3 * 2 * N * K * r * (d_in + d_out)


MATMUL_N = 1024  # square fp32 matmul used as the machine's reference FLOP rate


def bench_mixture(D: int, cfg: BenchConfig) -> dict:
    """Forward + backward time of the gated mixture at width D, and inside a frozen D x D layer.

    Candidates (grads of every input that requires one; the output gradient is fixed):
    ``bank`` `gated_mixture`; ``loop`` `loop_mixture`; ``single`` one rank-r LoRA ``B (s A x)`` (the
    scale on the small ``(N, r)`` intermediate: the fastest way to write it);
    ``layer_bank`` ``W x + bank``; ``layer_single`` ``W x + single`` (W frozen, x needs its grad);
    and a dense fp32 ``MATMUL_N``-square matmul, so the bank's FLOP rate is also given as a
    fraction of what this machine's matmul reaches in the same run.
    """
    from sandbox.adapters import gated_mixture

    N, K, r, s = cfg.tokens, cfg.slots, cfg.rank, 2.0
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(N, D, generator=g).requires_grad_()
    A = (torch.randn(K, r, D, generator=g) / math.sqrt(D)).requires_grad_()
    B = (torch.randn(K, D, r, generator=g) / math.sqrt(r)).requires_grad_()
    gates = torch.softmax(torch.randn(N, K, generator=g), -1).requires_grad_()
    A1 = A[0].detach().clone().requires_grad_()
    B1 = B[0].detach().clone().requires_grad_()
    W = torch.randn(D, D, generator=g) / math.sqrt(D)
    go = torch.randn(N, D, generator=g)
    bank_in, single_in = [x, A, B, gates], [x, A1, B1]

    def run(y, inputs):
        return torch.autograd.grad(y, inputs, go)

    fns = {
        "bank": lambda: run(gated_mixture(x, A, B, gates, s), bank_in),
        "loop": lambda: run(loop_mixture(x, A, B, gates, s), bank_in),
        "single": lambda: run(((x @ A1.T) * s) @ B1.T, single_in),
        "layer_bank": lambda: run(x @ W.T + gated_mixture(x, A, B, gates, s), bank_in),
        "layer_single": lambda: run(x @ W.T + ((x @ A1.T) * s) @ B1.T, single_in),
        "matmul": matmul_case(MATMUL_N, seed=cfg.seed),
    }
    t = interleaved(fns, cfg.repeats, cfg.min_sample_s)
    m = {k: v.median for k, v in t.items()}
    mm = 2 * MATMUL_N ** 3 / m.pop("matmul")
    return {"D": D, "tokens": N, "slots": K, "rank": r, **{f"{k}_s": v for k, v in m.items()},
            "loop_over_bank": m["loop"] / m["bank"], "bank_over_single": m["bank"] / m["single"],
            "layer_bank_over_single": m["layer_bank"] / m["layer_single"],
            "bank_gflops": mixture_flops(N, K, r, D, D) / m["bank"] / 1e9,
            "single_gflops": mixture_flops(N, 1, r, D, D) / m["single"] / 1e9, "matmul_gflops": mm / 1e9,
            "bank_fraction_of_matmul": mixture_flops(N, K, r, D, D) / m["bank"] / mm,
            # the best bank / single ratio possible if the bank ran at the measured matmul rate
            "bank_over_single_floor": mixture_flops(N, K, r, D, D) / mm / m["single"]}


# ---------------------------------------------------------------------------------------------
# 4. End-to-end sweep
# ---------------------------------------------------------------------------------------------


QUICK_SWEEP_ARGS = ("--points", "2", "--seeds", "2", "--steps", "20")


def bench_sweep(cfg: BenchConfig) -> dict:
    """Wall time and seed-points per second of `sandbox sweep` with its defaults, run in-process.

    Runs ``sandbox sweep --out TMP`` (plus `QUICK_SWEEP_ARGS` in quick mode) through the command's
    typer entry in a temporary folder, then counts the (point, seed) pairs in its ``results.csv``.
    Returns a ``skipped`` reason instead when the command exits with an error.
    """
    import pandas as pd

    import typer

    from sandbox.app.commands import sweep as sweep_command

    # A one-command app with the real `sweep` command (the full CLI imports this runner, so
    # importing it here would close an import loop); the callback and its options are the same.
    app = typer.Typer(add_completion=False)
    sweep_command.register(app)
    app.command("_")(lambda: None)    # two commands keep typer from collapsing `sweep` into the root
    extra = list(QUICK_SWEEP_ARGS) if cfg.quick else []
    threads = torch.get_num_threads()
    log = io.StringIO()
    walls: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        # the untuned map first, then the tuned default, in one run: their ratio is the price of tuning
        for name, more in (("untuned", ["--tune", "off"]), ("tuned", [])):
            out = os.path.join(tmp, name)
            argv = ["sweep", "--out", out, *extra, *more]
            try:
                # the sweep's own progress bar and tables would corrupt `--json`: keep them in `log`
                with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                    t = time.perf_counter()
                    code = _invoke(app, argv, log)
                    walls[name] = time.perf_counter() - t
                sweep_threads = torch.get_num_threads()
            finally:
                torch.set_num_threads(threads)          # the sweep sets its own thread count
            if code != 0:
                tail = log.getvalue().strip().splitlines()[-1:] or [""]
                return {"skipped": f"`sandbox {' '.join(argv[:1] + extra + more)}` exited with code {code}: {tail[0]}"}
        wall = walls["tuned"]
        res = pd.read_csv(os.path.join(tmp, "tuned", "results.csv"))
    seed_points = int(res[["point", "seed"]].drop_duplicates().shape[0])
    return {"command": "sandbox sweep" + ("" if not extra else " " + " ".join(extra)), "wall_s": wall,
            "untuned_wall_s": walls["untuned"], "tuned_over_untuned": wall / walls["untuned"],
            "seed_points": seed_points, "rows": int(len(res)), "seed_points_per_s": seed_points / wall,
            "arms": sorted(res["arm"].astype(str).unique()),
            "torch_threads": sweep_threads,
            "target_s": 60.0}


# ---------------------------------------------------------------------------------------------
# 5-6. Stacked grid points


def _grid_points(n_align: int, n_axis: int, seeds: int, steps: int | None = None) -> list:
    """``(spec, cfg, seeds)`` of an alignment (x plasticity when ``n_axis > 1``) grid at the defaults."""
    import dataclasses

    import numpy as np

    from sandbox.analytic import AnalyticConfig
    from sandbox.tasks import TaskSpec

    base = AnalyticConfig() if steps is None else AnalyticConfig(steps=steps)
    plast = [base.plasticity] if n_axis == 1 else np.linspace(0.0, 0.2, n_axis).round(12).tolist()
    return [(TaskSpec(alignment=float(a)), dataclasses.replace(base, plasticity=float(p)), list(range(seeds)))
            for a in np.linspace(0, 1, n_align).round(12) for p in plast]


def bench_grid(cfg: BenchConfig) -> dict:
    """Seed-points per second of the default map solved point by point and stacked (interleaved),
    on ``cfg.device`` (``--device``; the analytic solver's tensors)."""
    from sandbox.analytic import run_points

    pts = _grid_points(11, 1, 4, steps=20) if cfg.quick else _grid_points(11, 1, 10)
    rows = sum(len(s) for _, _, s in pts)
    dev = cfg.device
    fns = {"per_point": lambda: [run_points([p], device=dev)[0] for p in pts],   # = run_arms per point
           "stacked": lambda: run_points(pts, device=dev)}
    rounds = 1 if cfg.quick else 2
    times = {k: [] for k in fns}
    for _ in range(rounds):                      # alternate, so load hits both candidates alike
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    best = {k: min(v) for k, v in times.items()}
    # What stacking can buy: a batch of n rows costs about f + b n, so point by point pays f + b s per
    # point of s seeds and no batch can beat it by more than (f + b s) / (b s), from these two timings.
    n_pts, s = len(pts), len(pts[0][2])
    per_point = best["per_point"] / n_pts                                  # f + b s
    marginal = max(best["stacked"] - per_point, 1e-12) / (rows - s)        # b
    return {"case": f"{n_pts} points x {s} seeds x 4 arms, {pts[0][1].steps} steps", "seed_points": rows,
            "per_point_s": best["per_point"], "stacked_s": best["stacked"],
            "per_point_sp_s": rows / best["per_point"], "stacked_sp_s": rows / best["stacked"],
            "ratio": best["per_point"] / best["stacked"], "rounds": rounds, "target_ratio": 5.0, "device": dev,
            "marginal_s_per_row": marginal, "fixed_s_per_batch": per_point - marginal * s,
            "ratio_bound": per_point / (marginal * s)}


def bench_heatmap(cfg: BenchConfig) -> dict:
    """Wall time of a 21 x 21 x 16-seed, four-arm alignment x plasticity map (5 x 5 x 4 when quick)."""
    from sandbox.analytic import run_points

    n, seeds = (5, 4) if cfg.quick else (21, 16)
    pts = _grid_points(n, n, seeds)
    t0 = time.perf_counter()
    run_points(pts, device=cfg.device)
    wall = time.perf_counter() - t0
    rows = sum(len(s) for _, _, s in pts)
    return {"case": f"{n} x {n} alignment x plasticity, {seeds} seeds, 4 arms", "device": cfg.device,
            "seed_points": rows, "wall_s": wall,
            "seed_points_per_s": rows / wall, "target_s": 300.0, "full_size": not cfg.quick}


def _invoke(app, argv: list[str], log: io.StringIO) -> int:
    """Run a command of the typer `app` in this process; its exit code (2 for a `BadInput`).

    Not `sandbox.app.cli.main`: that exits the process when it runs as the `sandbox` script.
    """
    from sandbox.errors import BadInput

    try:
        app(args=argv, standalone_mode=False, prog_name="sandbox")
    except BadInput as e:
        print(e.one_line(), file=log)
        return 2
    except SystemExit as e:
        return int(e.code or 0)
    return 0


# ---------------------------------------------------------------------------------------------
# Everything, and the targets
# ---------------------------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, progress: Callable[[str], None] | None = None) -> dict:
    """Run the chosen sections; returns ``{machine, config, loss, mixture, adaptation, sweep, targets}``."""
    say = progress or (lambda msg: None)
    out: dict = {"machine": machine_info(), "config": asdict(cfg)}
    t0 = time.perf_counter()
    if "loss" in cfg.sections:
        out["loss"] = []
        for d in cfg.loss_dims:
            say(f"sandbox loss, d={d}")
            out["loss"].append(bench_sandbox_loss(d, cfg))
    if "mixture" in cfg.sections:
        out["mixture"] = []
        for D in cfg.mixture_dims:
            say(f"gated mixture, D={D}")
            out["mixture"].append(bench_mixture(D, cfg))
    if "adaptation" in cfg.sections:
        from substrate.bench import bench_adaptation

        out["adaptation"] = []
        for name in cfg.presets:
            say(f"adaptation step, preset {name}")
            out["adaptation"].append(bench_adaptation(name, cfg, cfg.device))
    if "fitness" in cfg.sections:
        from substrate.bench import FITNESS_SHAPES, bench_fitness

        out["fitness"] = []
        for name in cfg.presets:
            if name in FITNESS_SHAPES or cfg.device == "cuda":
                say(f"fitness pass and population, batched vs sequential, preset {name}")
                out["fitness"].append(bench_fitness(name, cfg, cfg.device))
    if "sweep" in cfg.sections:
        say("default sweep, end to end")
        out["sweep"] = bench_sweep(cfg)
    if "grid" in cfg.sections:
        say("default map: point by point vs stacked")
        out["grid"] = bench_grid(cfg)
    if "heatmap" in cfg.sections:
        say("21 x 21 x 16-seed heatmap, four arms")
        out["heatmap"] = bench_heatmap(cfg)
    out["targets"] = targets(out)
    out["bench_wall_s"] = time.perf_counter() - t0
    out["machine"]["load_avg_after"] = machine_info()["load_avg_1_5_15"]
    return out


def targets(res: dict) -> list[dict]:
    """The issue-9 targets as rows ``{target, case, value, limit, met}`` (met None when not measured)."""
    rows = []

    def add(name, case, value, limit, ok):
        rows.append({"target": name, "case": case, "value": value, "limit": limit, "met": ok})

    for r in res.get("loss", []):
        add("Gram form >= 3x dense form", f"d={r['d']}", r["speedup"], ">= 3", r["speedup"] >= 3)
    for r in res.get("mixture", []):
        add("bank >= 5x faster than loop", f"D={r['D']}", r["loop_over_bank"], ">= 5", r["loop_over_bank"] >= 5)
        add("bank <= 1.5x single LoRA (adapter path alone)", f"D={r['D']}", r["bank_over_single"], "<= 1.5",
            r["bank_over_single"] <= 1.5)
        add("bank <= 1.5x single LoRA (in a frozen D x D layer)", f"D={r['D']}", r["layer_bank_over_single"], "<= 1.5",
            r["layer_bank_over_single"] <= 1.5)
    for r in res.get("adaptation", []):
        if r.get("preset") == "small" and "fraction_of_matmul" in r:
            add("small adaptation step >= 30% of matmul throughput (CPU)", "small", r["fraction_of_matmul"], ">= 0.30",
                r["fraction_of_matmul"] >= 0.30)
    for r in res.get("adaptation", []):
        if r.get("preset") == "widened-1536":
            if "mfu" in r:
                add("widened-1536 adaptation >= 35% of bf16 peak (CUDA MFU)", "widened-1536", r["mfu"], ">= 0.35",
                    r["mfu"] >= 0.35)
            else:
                add("widened-1536 adaptation >= 35% of bf16 peak (CUDA MFU)", "not measured (CPU run)", None, ">= 0.35",
                    None)
    for r in res.get("fitness", []):
        add("fitness pass: batched faster than K + 1 sequential forwards", r["preset"], r["fitness_speedup"], "> 1",
            r["fitness_speedup"] > 1)
        add("fitness pass: batched losses = sequential", r["preset"], r["fitness_max_abs_diff"], "<= 1e-4",
            r["fitness_max_abs_diff"] <= 1e-4)
        add("population: batched losses = sequential", r["preset"], r["population_max_abs_diff"], "<= 1e-4",
            r["population_max_abs_diff"] <= 1e-4)
    sw = res.get("sweep")
    if sw is not None:
        if "wall_s" in sw:
            arms = ", ".join(sw.get("arms", []))
            add("default sweep within 60 s", f"{sw['command']} ({arms})" if arms else sw["command"], sw["wall_s"],
                "<= 60 s", sw["wall_s"] <= 60)
            if "tuned_over_untuned" in sw:
                add("tuned map <= 3x the untuned map (--tune off), one run", sw["command"], sw["tuned_over_untuned"],
                    "<= 3", sw["tuned_over_untuned"] <= 3)
        else:
            add("default sweep within 60 s", "not measured", None, "<= 60 s", None)
    gr = res.get("grid")
    if gr is not None:
        add("stacked grid >= 5x point-by-point seed-points/s", gr["case"], gr["ratio"], ">= 5", gr["ratio"] >= 5)
    hm = res.get("heatmap")
    if hm is not None:
        add("21 x 21 x 16-seed four-arm heatmap within 5 min", hm["case"], hm["wall_s"], "<= 300 s",
            hm["wall_s"] <= 300 if hm["full_size"] else None)
    return rows
