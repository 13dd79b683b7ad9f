"""`sandbox report DIR` end to end on temporary run folders, through `sandbox.app.cli.main`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from figures.report import TABLES, build_report
from sandbox import stats
from sandbox.app.cli import main

SEEDS = (42, 137, 2026)


def write(folder, name, df):
    folder.mkdir(parents=True, exist_ok=True)
    df.to_csv(folder / name, index=False)


def results_table(alignments=(0.0, 0.5, 1.0), noises=(0.0,), seed=0):
    """results.csv: evo worse than grad at low alignment, better at high."""
    rng = np.random.default_rng(seed)
    rows = []
    point = 0
    for c in noises:
        for a in alignments:
            for s in SEEDS:
                g = 0.5 + 0.1 * rng.random()
                e = g - 0.08 * (a - 0.5) + 0.004 * rng.normal()
                for arm, v in (("grad", g), ("evo", e)):
                    rows.append(dict(point=point, seed=s, arm=arm, alignment=a, context_noise=c, final_loss=np.exp(v),
                                     log_loss=v, loss_evals=100, grad_steps=50, diverged=False, diverged_step=np.nan,
                                     wall_s=0.1))
            point += 1
    return pd.DataFrame(rows)


def cells_table(seed=0):
    rng = np.random.default_rng(seed)
    effect = {"B3": 0.0, "R": -0.0426, "R+E": -0.0426, "R+L": -0.02, "R+E+L": -0.015}
    rows = []
    for s in SEEDS:
        base = 3.0 + 0.05 * rng.normal()
        for c, e in effect.items():
            rows.append(dict(cell=c, seed=s, balanced_log_ppl=base + e + 0.003 * rng.normal(), diverged=False,
                             diverged_step=np.nan))
    return pd.DataFrame(rows)


def gates_table(cells=("B3", "R+E+L"), M=3, K=4):
    rows = []
    for cell in cells:
        for phase in ("before", "after"):
            for m in range(M):
                g = np.full(K, 1 / K) if phase == "before" else np.eye(K)[m % 2] * 0.7 + 0.3 / K
                rows += [dict(phase=phase, domain=f"d{m}", slot=k, mean_gate=g[k], cell=cell, seed=42) for k in range(K)]
    return pd.DataFrame(rows)


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sweep_folder_two_axes_gives_a_heatmap_and_prints_the_summary(tmp_path, capsys):
    res = results_table(noises=(0.0, 0.5))
    summary = stats.summarize(res, by=["point", "alignment", "context_noise"], eps=0.01, n_boot=200)
    write(tmp_path, "results.csv", res)
    write(tmp_path, "summary.csv", summary)
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "sweep", "axes": ["alignment", "context_noise"]}))
    code, out, err = run(["report", str(tmp_path)], capsys)
    assert code == 0, err
    figs = tmp_path / "figures"
    assert (figs / "regime_heatmap.png").stat().st_size > 0 and (figs / "regime_heatmap.svg").exists()
    assert not (figs / "regime_curve.png").exists()
    assert "regime summary" in out
    for r in summary["regime"].unique():
        assert r in out


def test_one_axis_sweep_regenerates_a_missing_summary_with_the_manifest_eps(tmp_path, capsys):
    res = results_table(alignments=(0.0, 0.25, 0.5, 0.75, 1.0))
    write(tmp_path, "results.csv", res)
    (tmp_path / "manifest.json").write_text(json.dumps({"command": "sweep", "axes": ["alignment", "context_noise"],
                                                        "config": {"eps": 0.02, "alpha": 0.05}}))
    code, out, err = run(["report", str(tmp_path)], capsys)
    assert code == 0, err
    assert (tmp_path / "figures" / "regime_curve.png").exists()
    got = pd.read_csv(tmp_path / "summary.csv")
    want = stats.summarize(res, by=["point", "alignment", "context_noise"], eps=0.02, alpha=0.05)
    assert (got["eps"] == 0.02).all()
    np.testing.assert_allclose(got["mean_delta"], want["mean_delta"])
    assert list(got["regime"]) == list(want["regime"])
    assert "summary.csv regenerated" in out


def test_factorial_folder_rebuilds_attribution_and_every_figure(tmp_path, capsys):
    cells = cells_table()
    write(tmp_path, "cells.csv", cells)
    write(tmp_path, "gates.csv", gates_table())
    lc = pd.DataFrame([dict(step=100, event="death", slot=2, slot_id=2, parent_id=-1, neighbour_id=-1, cell="R+E+L"),
                       dict(step=100, event="birth", slot=2, slot_id=4, parent_id=0, neighbour_id=-1, cell="R+E+L")])
    write(tmp_path, "lifecycle.csv", lc)
    curves = pd.DataFrame([dict(step=st, domain=d, nll=2.0 + 1 / (1 + st), log_ppl=2.0 + 1 / (1 + st), floor=2.0)
                           for st in (0, 10, 20) for d in ("a", "b", "balanced")])
    write(tmp_path, "curves.csv", curves)
    code, out, err = run(["report", str(tmp_path), "--study"], capsys)
    assert code == 0, err
    assert "attribution" in out and "router" in out and "final held-out log-PPL" in out
    names = {p.name for p in (tmp_path / "figures").iterdir()}
    want_png = {"attribution", "cells", "gates_B3", "gates_R+E+L", "lineage", "curves"}
    assert {f"{n}.{ext}" for n in want_png for ext in ("png", "svg")} <= names
    att = pd.read_csv(tmp_path / "attribution.csv")
    want = stats.attribution(cells)
    assert list(att["contrast"]) == list(want["contrast"])
    np.testing.assert_allclose(att["mean_delta"], want["mean_delta"])


def test_build_report_returns_the_written_files_and_the_summary(tmp_path):
    att = stats.attribution(cells_table(), n_boot=200)
    write(tmp_path, "attribution.csv", att)
    rep = build_report(tmp_path)
    assert [p.name for p in rep] == ["attribution.png", "attribution.svg"]
    assert all(p.exists() for p in rep)
    assert list(rep.summary["contrast"]) == list(att["contrast"])


@pytest.mark.parametrize("make", ["missing", "empty", "unknown_files"])
def test_a_folder_without_tables_exits_2_with_one_line_naming_it(tmp_path, capsys, make):
    folder = tmp_path / "run"
    if make != "missing":
        folder.mkdir()
    if make == "unknown_files":
        (folder / "notes.txt").write_text("hello")
    code, out, err = run(["report", str(folder)], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "DIR" in lines[0] and str(folder) in lines[0]
    assert "Traceback" not in err


def test_a_table_missing_columns_exits_2_naming_the_file(tmp_path, capsys):
    write(tmp_path, "gates.csv", pd.DataFrame({"phase": ["before"], "domain": ["a"]}))
    code, out, err = run(["report", str(tmp_path)], capsys)
    assert code == 2
    assert "gates.csv" in err and "slot" in err and len(err.strip().splitlines()) == 1


def test_known_tables_match_the_architecture_contract():
    text = (Path(__file__).resolve().parents[1] / "ARCHITECTURE.md").read_text()
    for name in TABLES:
        assert f"`{name}`" in text


def test_gate_tables_split_by_arm_and_say_what_they_pool(tmp_path):
    g = pd.concat([gates_table(cells=("B3",)).drop(columns="cell").assign(arm=arm, point=p)
                   for arm in ("grad", "evo") for p in (0, 1)])
    write(tmp_path, "gates.csv", g)
    rep = build_report(tmp_path)
    assert sorted(p.name for p in rep if p.suffix == ".png") == ["gates_evo.png", "gates_grad.png"]
    assert any("gates.csv" in n and "point" in n for n in rep.notes)


def test_factorial_recompute_keeps_the_base_as_unit_and_the_router_lr_columns(tmp_path, capsys):
    """A rebuilt attribution.csv is the one the factorial wrote: across bases when the cells span
    several (not across seeds), with the router lr each side ran and whether it was tuned."""
    from sandbox import replicates

    cells = cells_table()
    cells = cells[cells["cell"].isin(["B3", "R"])].copy()
    cells["base"] = cells["seed"] % 3
    cells["router_lr"] = cells["cell"].map({"B3": 0.09, "R": 0.003})
    cells["router_lr_tuned"] = True
    cells["converged"] = False
    write(tmp_path, "cells.csv", cells)
    code, out, err = run(["report", str(tmp_path), "--recompute"], capsys)
    assert code == 0, err
    att = pd.read_csv(tmp_path / "attribution.csv")
    want = replicates.attribution(cells)
    assert (att["unit"] == "base").all() and (att["bases"] == 3).all()
    np.testing.assert_allclose(att["mean_delta"], want["mean_delta"])
    np.testing.assert_allclose(att["ci_high"], want["ci_high"])
    row = att.set_index("contrast").loc["router"]
    assert (row["treated_router_lr"], row["reference_router_lr"]) == (0.003, 0.09)
    assert bool(row["router_lr_tuned"]) and not bool(row["treated_converged"])
    # a seed-unit table from before the base column: across seeds, no router-lr columns invented
    old = cells.drop(columns=["base", "router_lr", "router_lr_tuned", "converged"])
    write(tmp_path, "cells.csv", old)
    assert run(["report", str(tmp_path), "--recompute"], capsys)[0] == 0
    att = pd.read_csv(tmp_path / "attribution.csv")
    assert (att["unit"] == "seed").all() and "treated_router_lr" not in att
