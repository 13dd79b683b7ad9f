"""`sandbox bench`: measured speed against the limits, as a rich table or JSON."""

from __future__ import annotations

import json
from typing import Optional

import typer


def _bench_options() -> list:
    from sandbox.app.declare import from_fields, own
    from sandbox.timing import DEFAULT_SECTIONS, SECTIONS, BenchConfig

    on_request = ", ".join(s for s in SECTIONS if s not in DEFAULT_SECTIONS)
    return [*from_fields(BenchConfig, ("quick",)),
            own("as_json", False, "--json", help="Print every figure as JSON instead of tables."),
            own("only", ",".join(DEFAULT_SECTIONS), "--only", help=f"Comma list of sections: {', '.join(SECTIONS)} "
                f"({on_request} on request: a 21 x 21 x 16-seed map, minutes)."),
            *from_fields(BenchConfig, ("repeats",), auto={"repeats": f"{BenchConfig.repeats}, quick "
                                                          f"{BenchConfig.quick_config().repeats}"}),
            own("presets", None, "--presets", help="Comma list of substrate presets to time (default: "
                f"{','.join(BenchConfig.presets)})."),
            *from_fields(BenchConfig, ("device",)),
            own("threads", None, "--threads", annotation=Optional[int],
                help="torch intra-op threads (default: torch's choice)."),
            own("out", None, "--out", help="Also write the JSON to this file (atomically).")]


def _check_writable(out: str) -> None:
    """Refuse (one line naming --out) a file that cannot be written: an empty or too long name, a
    folder, a read-only place (permissions or a read-only filesystem: probed with a real file)."""
    import os
    import tempfile
    from pathlib import Path

    from sandbox.errors import BadInput
    from sweeps.ledger import check_names

    check_names(out=out)
    path = Path(out)
    if path.is_dir():
        raise BadInput("--out", out, "a file path (this is a folder)")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=".probe.", dir=parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise BadInput("--out", out, f"a file in a place this user can write to ({e.strerror or e})") from None


def bench(got) -> None:
    """Time the sandbox loss, the gated mixture, one adaptation step per preset and the default sweep."""
    import sys

    import torch
    from rich.console import Console

    from sandbox.app.bench import BenchConfig, run_bench
    from sandbox.timing import SECTIONS
    from sandbox.errors import BadInput
    from sandbox.options import check_int
    from sandbox.results import atomic_write_json, to_jsonable

    only, device, threads, out, as_json = got["only"], got["device"], got["threads"], got["out"], got["as_json"]
    sections = tuple(s.strip() for s in only.split(",") if s.strip())
    bad = [s for s in sections if s not in SECTIONS]
    if bad or not sections:
        raise BadInput("--only", only, "a comma list of " + ", ".join(SECTIONS))
    if device == "cuda" and not torch.cuda.is_available():
        raise BadInput("--device", device, "cpu (no CUDA device is visible)")
    if threads is not None:
        torch.set_num_threads(check_int(threads, "--threads", 1, 1024))
    overrides: dict = {"sections": sections}
    if got["repeats"] is not None:
        check_int(got["repeats"], "--repeats", 1, 1000)
    if got["presets"] is not None:
        from substrate.model import PRESETS

        names = tuple(p.strip() for p in got["presets"].split(",") if p.strip())
        if not names or any(p not in PRESETS for p in names):
            raise BadInput("--presets", got["presets"], "a comma list of " + ", ".join(PRESETS))
        overrides["presets"] = names
    fields = got.fields(BenchConfig)           # device, and repeats when given (else the mode's own)
    quick = fields.pop("quick")
    cfg = BenchConfig.quick_config(**fields, **overrides) if quick else BenchConfig(**fields, **overrides)
    if out is not None:
        _check_writable(out)   # before the minutes of timing, not after

    err = Console(stderr=True)
    res = run_bench(cfg, progress=(lambda m: err.log(m)) if not as_json else None)
    res["command"] = "sandbox " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("sandbox") else None
    if out:
        atomic_write_json(out, res)
    if as_json:
        typer.echo(json.dumps(to_jsonable(res), indent=2))
        return
    console = Console()
    if not console.is_terminal:  # piped into a file (e.g. BENCHMARKS.md): do not wrap at 80 columns
        console = Console(width=140)
    print_tables(res, console)


def _f(v, fmt="{:.3g}") -> str:
    return "-" if v is None else fmt.format(v)


def print_tables(res: dict, console) -> None:
    """Render a `run_bench` result as rich tables."""
    from rich.table import Table

    m = res["machine"]
    console.print(f"[bold]machine[/] {m['cpu']}, {m['cores']} cores, torch {m['torch']} with {m['torch_threads']} "
                  f"threads, load {m['load_avg_1_5_15']} -> {m.get('load_avg_after')}, {m['date']}")
    if "loss" in res:
        t = Table(title="1. sandbox loss evaluations/s (S seeds x M domains x N draws per evaluation), Gram vs dense")
        for c in ("d", "S x M x N", "Gram evals/s", "dense evals/s", "Gram / dense", "max rel diff"):
            t.add_column(c, justify="right")
        for r in res["loss"]:
            t.add_row(str(r["d"]), f"{r['seeds']} x {r['domains']} x {r['draws']}", _f(r["gram_evals_per_s"], "{:,.0f}"),
                      _f(r["dense_evals_per_s"], "{:,.1f}"), _f(r["speedup"], "{:,.1f}x"), _f(r["max_rel_diff"], "{:.1e}"))
        console.print(t)
    if "mixture" in res:
        t = Table(title="2. gated mixture forward+backward (ms), K slots of rank r over N tokens")
        for c in ("D", "N, K, r", "bank", "loop", "single LoRA", "loop / bank", "bank / single",
                  "floor at matmul rate", "layer: bank / single", "bank GFLOP/s (of matmul)"):
            t.add_column(c, justify="right")
        for r in res["mixture"]:
            t.add_row(str(r["D"]), f"{r['tokens']}, {r['slots']}, {r['rank']}", _f(r["bank_s"] * 1e3, "{:.2f}"),
                      _f(r["loop_s"] * 1e3, "{:.2f}"), _f(r["single_s"] * 1e3, "{:.2f}"), _f(r["loop_over_bank"], "{:.1f}x"),
                      _f(r["bank_over_single"], "{:.2f}x"), _f(r["bank_over_single_floor"], "{:.2f}x"),
                      _f(r["layer_bank_over_single"], "{:.2f}x"),
                      f"{r['bank_gflops']:.1f} ({r['bank_fraction_of_matmul']:.0%})")
        console.print(t)
    if "adaptation" in res:
        t = Table(title="3. one adaptation step (hidden-state features, sigmoid router, fwd+bwd+Adam)")
        for c in ("preset", "base params", "B x T", "step ms", "tokens/s", "MFLOP/token", "GFLOP/s", "ref GFLOP/s",
                  "fraction"):
            t.add_column(c, justify="right")
        notes = []
        for r in res["adaptation"]:
            if "skipped" in r:
                t.add_row(r["preset"], f"{r['base_params'] / 1e6:.2f}M", *["-"] * 6, "skipped")
                notes.append(f"{r['preset']}: skipped, {r['skipped']}")
                continue
            cpu = "matmul_flops" in r
            ref = r["matmul_flops"] if cpu else r["peak_flops"]
            frac = r["fraction_of_matmul"] if cpu else r["mfu"]
            t.add_row(r["preset"], f"{r['base_params'] / 1e6:.2f}M", f"{r['batch']} x {r['seq_len']}",
                      _f(r["step_s"] * 1e3, "{:.1f}"), _f(r["tokens_per_s"], "{:,.0f}"),
                      _f(r["flops_per_token"] / 1e6, "{:,.2f}"), _f(r["achieved_flops"] / 1e9, "{:.1f}"),
                      _f(ref / 1e9, "{:.1f}"), _f(frac, "{:.1%}"))
            notes.append(f"{r['preset']}: reference = " + (f"fp32 {r['matmul_n']}^2 matmul measured in this run"
                                                          if cpu else "the device's dense bf16 peak (MFU)"))
        console.print(t)
        for n in notes:
            console.print("  " + n)
    if res.get("fitness"):
        t = Table(title="3b. lifecycle fitness pass (K + 1 gate variants) and search population (P routers): "
                        "batched vs sequential forwards (ms)")
        for c in ("preset", "windows x T", "fitness batched", "sequential", "speedup", "event in steps (before -> after)",
                  "population batched", "sequential", "speedup", "max |diff|", "step share of matmul"):
            t.add_column(c, justify="right")
        for r in res["fitness"]:
            t.add_row(r["preset"], f"{r['domains'] * r['fit_windows']} x {r['seq_len']}",
                      _f(r["fitness_batched_s"] * 1e3, "{:.1f}"), _f(r["fitness_sequential_s"] * 1e3, "{:.1f}"),
                      _f(r["fitness_speedup"], "{:.2f}x"),
                      f"{r['event_steps_sequential']:.1f} -> {r['event_steps_batched']:.1f}",
                      _f(r["population_batched_s"] * 1e3, "{:.1f}"), _f(r["population_sequential_s"] * 1e3, "{:.1f}"),
                      _f(r["population_speedup"], "{:.2f}x"),
                      _f(max(r["fitness_max_abs_diff"], r["population_max_abs_diff"]), "{:.1e}"),
                      _f(r["step_fraction_of_matmul"], "{:.1%}"))
        console.print(t)
    if "sweep" in res:
        sw = res["sweep"]
        t = Table(title="4. default sweep, end to end")
        for c in ("command", "wall s", "seed-points", "seed-points/s", "target"):
            t.add_column(c, justify="right")
        if "skipped" in sw:
            t.add_row("sandbox sweep", "-", "-", "-", "skipped: " + sw["skipped"])
        else:
            t.add_row(sw["command"], _f(sw["wall_s"], "{:.1f}"), str(sw["seed_points"]), _f(sw["seed_points_per_s"], "{:.2f}"),
                      "<= 60 s")
        console.print(t)
    if "grid" in res:
        g = res["grid"]
        t = Table(title="5. default map: point by point vs stacked batches (best of interleaved rounds)")
        for c in ("case", "per point s", "stacked s", "per point sp/s", "stacked sp/s", "ratio", "bound", "target"):
            t.add_column(c, justify="right")
        t.add_row(g["case"], _f(g["per_point_s"], "{:.1f}"), _f(g["stacked_s"], "{:.1f}"),
                  _f(g["per_point_sp_s"], "{:.1f}"), _f(g["stacked_sp_s"], "{:.1f}"), _f(g["ratio"], "{:.2f}"),
                  _f(g["ratio_bound"], "{:.2f}"), ">= 5")
        console.print(t)
        console.print(f"bound: a batch of n rows costs about {g['fixed_s_per_batch']:.3f} s + n x "
                      f"{1000 * g['marginal_s_per_row']:.1f} ms here, so no stacking beats point by point by more "
                      f"than {g['ratio_bound']:.2f}x at this problem size (per-point time / its marginal part)")
    if "heatmap" in res:
        h = res["heatmap"]
        t = Table(title="6. heatmap, four arms, stacked")
        for c in ("case", "seed-points", "wall s", "seed-points/s", "target"):
            t.add_column(c, justify="right")
        t.add_row(h["case"], str(h["seed_points"]), _f(h["wall_s"], "{:.1f}"), _f(h["seed_points_per_s"], "{:.1f}"),
                  "<= 300 s" if h["full_size"] else "(quick size)")
        console.print(t)
    t = Table(title="targets (each a ratio from this run)")
    for c in ("target", "case", "value", "limit", "met"):
        t.add_column(c)
    for r in res["targets"]:
        met = "-" if r["met"] is None else ("[green]yes[/]" if r["met"] else "[red]no[/]")
        t.add_row(r["target"], r["case"], _f(r["value"], "{:.3g}"), r["limit"], met)
    console.print(t)


def register(app: typer.Typer) -> None:
    from sandbox.app.declare import declared

    app.command("bench")(declared(_bench_options())(bench))
