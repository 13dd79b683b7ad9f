"""The (cell, seed) ledger, a smoke factorial on tiny through the CLI, and the exit-2 contract."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from sandbox import stats
from sandbox.app.cli import main
from sweeps.factorial import TrialLedger, cells_row

TINY_ARGS = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
             "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)
    return str(tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------------------------------------
# Ledger
# ---------------------------------------------------------------------------------------------


def test_ledger_never_computes_a_key_twice(tmp_path):
    calls = []
    led = TrialLedger(tmp_path / "l.journal", "t")
    fn = lambda: calls.append(1) or {"v": 1.5, "x": [1, 2]}
    assert led.run("a/1", fn, "v") == ({"v": 1.5, "x": [1, 2]}, True)
    assert led.run("a/1", fn, "v") == ({"v": 1.5, "x": [1, 2]}, False)
    again = TrialLedger(tmp_path / "l.journal", "t")            # a new process reading the same journal
    assert again.run("a/1", fn, "v")[1] is False and len(calls) == 1
    assert again.results() == {"a/1": {"v": 1.5, "x": [1, 2]}}


def test_ledger_records_divergence_and_retries_failures(tmp_path):
    import optuna

    led = TrialLedger(tmp_path / "l.journal", "t")
    res, _ = led.run("d/1", lambda: {"v": math.nan, "diverged": True}, "v")
    trial = led.study.get_trials()[-1]
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == math.inf
    assert led.run("d/1", lambda: pytest.fail("recomputed"), "v")[1] is False
    with pytest.raises(RuntimeError):
        led.run("e/1", lambda: (_ for _ in ()).throw(RuntimeError("boom")), "v")
    assert led.study.get_trials()[-1].state == optuna.trial.TrialState.FAIL
    assert led.run("e/1", lambda: {"v": 2.0}, "v") == ({"v": 2.0}, True)


def test_ledger_marks_a_killed_trial_failed_and_reruns_it(tmp_path):
    import optuna

    led = TrialLedger(tmp_path / "l.journal", "t")
    stale = led.study.ask()                                          # a process died inside this trial
    stale.set_user_attr("key", "k/1")
    led2 = TrialLedger(tmp_path / "l.journal", "t")
    assert led2.run("k/1", lambda: {"v": 3.0}, "v") == ({"v": 3.0}, True)
    states = [t.state for t in led2.study.get_trials()]
    assert states == [optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE]


def test_cells_row_blanks_diverged_runs():
    row = cells_row("R", 1, {"balanced_log_ppl": 4.0, "diverged": True, "log_ppl": {"d0": None}})
    assert math.isnan(row["balanced_log_ppl"]) and math.isnan(row["log_ppl_d0"])
    from sandbox.gatestats import COLUMNS

    assert all(math.isnan(row[c]) for c in COLUMNS)             # metrics.json from before the diagnostics


# ---------------------------------------------------------------------------------------------
# Smoke factorial through the CLI
# ---------------------------------------------------------------------------------------------


def test_smoke_factorial_on_tiny(tmp_path, cache, capsys):
    out = tmp_path / "fact"
    args = ["factorial", "--seeds", "1,2", "--out", str(out), "--cache", cache, "--no-figures", *TINY_ARGS]
    assert main(args) == 0
    cells = pd.read_csv(out / "cells.csv")
    assert len(cells) == 10 and set(cells["cell"]) == {"B3", "R", "R+E", "R+L", "R+E+L"}
    assert cells["balanced_log_ppl"].notna().all() and not cells["diverged"].any()
    assert set(cells.loc[cells["cell"].str.contains("R"), "router"]) == {"sigmoid"}
    assert set(cells.loc[cells["cell"] == "B3", "router"]) == {"softmax"}
    assert (cells.loc[cells["cell"].str.contains("L"), "lifecycle_events"] > 0).all()
    assert (cells.loc[~cells["cell"].str.contains("L"), "lifecycle_events"] == 0).all()
    from sandbox.gatestats import COLUMNS

    assert set(COLUMNS) <= set(cells.columns) and cells[list(COLUMNS)].notna().all().all()
    b3 = cells[cells["cell"] == "B3"]
    assert (b3["gate_mass_after"] - 1).abs().max() < 1e-6 and (b3["gate_open_after"] == b3["gate_mass_after"]).all()
    assert (cells["router_lr"] > 0).all()
    att = pd.read_csv(out / "attribution.csv")
    assert set(att.loc[att["kind"] == "named", "contrast"]) == {"router", "scope", "lifecycle", "lifecycle_global", "system"}
    expect = stats.attribution(cells)
    pd.testing.assert_series_equal(att["mean_delta"], expect["mean_delta"], check_names=False)
    # the router contrast is the paired difference B3 - R, by seed
    wide = cells.pivot(index="seed", columns="cell", values="balanced_log_ppl")
    router = att.set_index("contrast").loc["router"]
    assert router["mean_delta"] == pytest.approx((wide["B3"] - wide["R"]).mean(), abs=1e-12)
    assert att.set_index("contrast").loc["scope", "mean_delta"] == 0           # E without L changes nothing
    text = capsys.readouterr().out
    assert "router" in text and "chain router + scope + lifecycle" in text
    # a rerun computes nothing; adding a seed (another configuration: a new folder on the same ledger)
    # computes only that seed's trials
    assert main(args) == 0
    assert json.loads((out / "manifest.json").read_text())["reused"] == 10
    more = ["factorial", "--seeds", "1,2,3", "--out", str(tmp_path / "more"), "--cache", cache, "--no-figures",
            *TINY_ARGS, "--cells", "B3,R", "--storage", str(out / "ledger.journal")]
    assert main(more) == 0
    m = json.loads((tmp_path / "more" / "manifest.json").read_text())
    assert (m["computed"], m["reused"]) == (2, 4)


def test_resolve_setting_fills_only_what_the_command_line_leaves():
    from sweeps.factorial import SETTINGS, resolve_setting

    assert SETTINGS["mechanism"] == dict(preset="small", steps=200, router_lr=0.9, cells="B3,R", seeds="0,1,2,3,4,5",
                                         bases=3)
    kw = {"preset": None, "steps": 50, "router_lr": None, "cells": "partial", "seeds": "42,137,2026", "bases": None,
          "lr": 0.003}
    rec = resolve_setting("mechanism", kw, given={"steps"})
    assert kw == {"preset": "small", "steps": 50, "router_lr": 0.9, "cells": "B3,R", "seeds": "0,1,2,3,4,5", "bases": 3,
                  "lr": 0.003}
    assert rec["overridden"] == {"steps": 50} and "steps" not in rec["applied"] and rec["applied"]["router_lr"] == 0.9
    from sandbox.errors import BadInput

    with pytest.raises(BadInput, match="--setting"):
        resolve_setting("Mechanism", {}, set())


def test_setting_mechanism_runs_as_its_values_written_out(tmp_path, cache, capsys):
    """--setting mechanism on a tiny shape: its values fill the options not given (router lr 0.9 = 300 x lr,
    cells B3,R, 3 bases), the manifest records it, and the same command with the values written out is the
    same configuration (it resumes the folder and computes nothing)."""
    out = tmp_path / "mech"
    small = [a for a in TINY_ARGS]   # --preset tiny and --steps 4 given: they win over the setting's
    assert main(["factorial", "--setting", "mechanism", "--seeds", "0,1", "--out", str(out), "--cache", cache,
                 "--no-figures", *small]) == 0
    assert "setting mechanism: --router-lr 0.9 --cells B3,R --bases 3" in capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert m["setting"]["name"] == "mechanism" and m["setting"]["values"]["steps"] == 200
    assert m["setting"]["overridden"] == {"preset": "tiny", "steps": 4, "seeds": "0,1"}
    assert m["config"]["base"]["router_lr"] == 0.9 and m["config"]["base"]["bases"] == 3
    assert m["config"]["base"]["steps"] == 4 and m["config"]["cells"] == ["B3", "R"]
    cells = pd.read_csv(out / "cells.csv")
    assert set(cells["cell"]) == {"B3", "R"} and sorted(set(cells["base"])) == [0, 1]
    assert (cells["router_lr"] == 0.9).all()
    written = ["factorial", "--router-lr", "0.9", "--cells", "B3,R", "--bases", "3", "--seeds", "0,1", "--out", str(out),
               "--cache", cache, "--no-figures", *small]
    assert main(written) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["computed"], m["reused"]) == (0, 4) and "setting" not in m


def test_full_command_writes_a_run_folder_per_seed(tmp_path, cache):
    out = tmp_path / "full"
    assert main(["full", "--cell", "l+r", "--seeds", "5,6", "--out", str(out), "--cache", cache, *TINY_ARGS]) == 0
    assert (out / "seed-5" / "figures" / "lineage.png").exists()
    for s in (5, 6):
        m = json.loads((out / f"seed-{s}" / "metrics.json").read_text())
        assert m["cell"] == "R+L" and m["seed"] == s and m["steps"] == 4 and m["lifecycle_events"] == 2
        for f in ("curves.csv", "gates.csv", "lifecycle.csv", "fitness.csv", "figures/curves.png",
                  "figures/gates.png", "manifest.json"):
            assert (out / f"seed-{s}" / f).exists(), f


# ---------------------------------------------------------------------------------------------
# Exit 2, one line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, flag", [
    (["factorial", "--cells", "B3,X"], "--cells"),
    (["factorial", "--cells", "R,R"], "--cells"),
    (["factorial", "--seeds", "a,b"], "--seeds"),
    (["factorial", "--inherit-alpha", "2"], "--inherit-alpha"),
    (["factorial", "--perturb-base", "-1"], "--perturb-base"),
    (["factorial", "--eps", "0"], "--eps"),
    (["factorial", "--setting", "nope"], "--setting"),
    (["full", "--cell", "Q"], "--cell"),
    (["full", "--cell", "R", "--tau-min", "5", "--tau-max", "1"], "--tau-min"),
    (["full", "--cell", "R", "--pooling", "mean"], "--pooling"),
    (["full", "--cell", "R", "--preset", "huge"], "--preset"),
    (["full", "--cell", "R", "--steps", "0"], "--steps"),
    (["full", "--cell", "R", "--interval", "0"], "--interval"),
    (["full", "--cell", "R", "--floor-max", "1.5"], "--floor-max"),
    (["full", "--cell", "R", "--device", "tpu"], "--device"),
    (["full", "--cell", "R", "--data", "/nonexistent/folder"], "--data"),
])
def test_bad_input_exits_2_with_one_line(args, flag, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and flag in err


def test_factorial_refuses_other_settings_in_the_same_folder(tmp_path, cache, capsys):
    out = tmp_path / "f"
    base = ["factorial", "--cells", "B3", "--seeds", "1,", "--out", str(out), "--cache", cache, "--no-figures"]
    assert main(base + TINY_ARGS) == 0
    capsys.readouterr()
    assert main(base + TINY_ARGS + ["--lr", "0.01"]) == 2
    assert "--out" in capsys.readouterr().err


def test_scope_under_lifecycle_matches_scipy():
    from scipy import stats as ss

    from sweeps.factorial import scope_under_lifecycle

    rl, rel = [4.10, 4.22, 4.05, 4.31], [4.08, 4.25, 4.01, 4.27]
    cells = pd.DataFrame({"cell": ["R+L"] * 4 + ["R+E+L"] * 4, "seed": [1, 2, 3, 4] * 2, "balanced_log_ppl": rl + rel})
    r = scope_under_lifecycle(cells)
    ref = ss.ttest_rel(rl, rel)
    assert r.n == 4 and r.mean == pytest.approx(sum(a - b for a, b in zip(rl, rel)) / 4)
    assert r.t == pytest.approx(ref.statistic) and r.p == pytest.approx(ref.pvalue)
    assert scope_under_lifecycle(cells[cells["cell"] == "R+L"]) is None


def test_cpu_defaults_are_said_plainly():
    from sandbox.app.cellopts import cell_options, cell_template
    from sandbox.app.declare import Received
    from substrate.defaults import schedule

    said = []
    opts = cell_options()
    kw = {o.name: o.default for o in opts}
    kw["device"] = "cpu"
    cfg = cell_template("L+R", 42, Received(opts, kw), said.append)
    assert (cfg.preset, cfg.steps, cfg.cell, cfg.device) == ("small", 200, "R+L", "cpu")
    assert said == ["no CUDA: running preset small for 200 steps instead of widened-1536 x 25000"]
    assert (cfg.lifecycle.interval, cfg.lifecycle.min_age, cfg.eval_every) == (40, 80, 40)
    assert schedule(25_000, None, None, None, None) == {"interval": 250, "min_age": 500, "eval_every": 1000,
                                                       "checkpoint_every": 1000}


# ---------------------------------------------------------------------------------------------
# Issue 20: all eight cells, seeds_needed, the sequential run
# ---------------------------------------------------------------------------------------------


def _synthetic_cells(seeds, effect=None, sd=0.01, seed=0):
    """A cells table for all 8 cells: value = 5 - effect[cell] + noise (lower is better)."""
    import numpy as np

    from sandbox.factors import all_cells

    rng = np.random.default_rng(seed)
    effect = effect or {}
    rows = []
    for s in seeds:
        base = 5 + rng.normal(0, 0.05)                                       # per-seed level, cancels in pairs
        for c in all_cells():
            rows.append({"cell": c.name, "seed": s, "balanced_log_ppl": base - effect.get(c.name, 0.0) + rng.normal(0, sd)})
    return pd.DataFrame(rows)


def test_attribution_with_all_cells_adds_contrasts_interactions_and_seeds_needed():
    import numpy as np

    eff = {"R": 0.05, "R+E": 0.05, "R+L": 0.08, "R+E+L": 0.08, "L": 0.0, "E+L": 0.0}   # router helps more with L
    cells = _synthetic_cells(range(6), eff)
    att = stats.attribution(cells).set_index("contrast")
    for name in ("lifecycle_softmax", "scope_alone", "router_under_lifecycle", "RxL", "RxExL"):
        assert name in att.index
    assert att.loc["RxL", "kind"] == "interaction"
    wide = cells.pivot(index="seed", columns="cell", values="balanced_log_ppl")
    rxl = 0.5 * ((wide["L"] - wide["R+L"]) - (wide["B3"] - wide["R"]) + (wide["E+L"] - wide["R+E+L"]) - (wide["E"] - wide["R+E"]))
    assert att.loc["RxL", "mean_delta"] == pytest.approx(rxl.mean(), abs=1e-12)
    assert att.loc["chain_sum - system", "mean_delta"] == pytest.approx(0, abs=1e-12)            # chain kept
    tested = att[att["kind"].isin(["named", "interaction"])]
    assert tested["p_holm"].notna().all() and (tested["p_holm"] >= tested["p"] - 1e-15).all()
    assert att.loc["router", "regime"] == "beats"
    # seeds_needed: every tested row; consistent with stats.seeds_needed at the family's Bonferroni level
    m = int(np.isfinite(tested["p"]).sum())
    r = att.loc["lifecycle"]
    pr = stats.paired(wide["R+E"], wide["R+E+L"])
    assert r["seeds_needed"] == stats.seeds_needed(pr.mean, pr.sd, 0.01, 0.05, n_tests=m)[0]
    assert att[att["kind"] == "chain_sum"]["seeds_needed"].isna().all()
    deltas = stats.contrast_deltas(cells)
    assert list(deltas.index) == list(range(6)) and set(deltas.columns) == set(tested.index)
    assert deltas["router"].to_numpy() == pytest.approx((wide["B3"] - wide["R"]).to_numpy())


def test_sequential_factorial_adds_seeds_in_rounds(tmp_path, cache, capsys):
    out = tmp_path / "seq"
    args = ["factorial", "--cells", "B3,R", "--seeds", "1,2", "--seeds-to-resolve", "4", "--round-seeds", "2",
            "--eps", "5", "--out", str(out), "--cache", cache, "--no-figures", *TINY_ARGS]
    assert main(args) == 0
    seq = pd.read_csv(out / "sequential.csv")
    m = json.loads((out / "manifest.json").read_text())
    assert m["looks"][0] == 2 and set(seq["look"]) == set(range(1, len(m["looks"]) + 1))
    att = pd.read_csv(out / "attribution.csv").set_index("contrast")
    # a huge margin: the router contrast ties (equivalence) as soon as the design allows, else runs to 4 seeds
    assert att.loc["router", "sequential_regime"] in ("ties", "inconclusive")
    if att.loc["router", "sequential_regime"] == "inconclusive":
        assert m["looks"] == [2, 4]
    cells = pd.read_csv(out / "cells.csv")
    assert sorted(cells["seed"].unique()) == sorted(m["seeds_run"]) and len(m["seeds_run"]) == m["looks"][-1]
    assert "sequential design" in capsys.readouterr().out


def test_gate_figures_name_their_cell(tmp_path):
    from sweeps.factorial import _gate_figures

    rows = [dict(phase=p, domain=f"d{m}", slot=k, mean_gate=0.25, cell=c, seed=s)
            for c in ("B3", "R+L") for s in (4, 2) for p in ("before", "after") for m in range(2) for k in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "gates.csv", index=False)
    paths = _gate_figures(tmp_path)
    assert sorted(p.name for p in paths) == ["gates_B3.png", "gates_B3.svg", "gates_R+L.png", "gates_R+L.svg"]
    assert "cell R+L, seed 4 (1 of 2 seeds)" in (tmp_path / "figures" / "gates_R+L.svg").read_text()


def test_sweeps_factorial_re_exports_every_name_of_its_modules():
    """The factorial is four modules (design, tuning, tables, the run loop); every name the other three
    define at their top level is the same object under `sweeps.factorial`, so imports written against
    the one module it was keep working."""
    import ast
    import inspect

    import sweeps.factorial as run
    from sweeps import factorial_config, factorial_tables, factorial_tuning

    names = {}
    for mod in (factorial_config, factorial_tables, factorial_tuning):
        for node in ast.parse(inspect.getsource(mod)).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names[node.name] = mod
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                    names[t.id] = mod
    assert {"FactorialConfig", "SETTINGS", "study_name", "choose_router_lr", "chosen_from_ledger", "TUNING_COLUMNS",
            "cells_row", "convergence", "FactorialResult", "_gate_figures"} <= set(names)   # the walk sees them
    missing = sorted(n for n, mod in names.items() if getattr(run, n, None) is not getattr(mod, n))
    assert not missing, f"not re-exported by sweeps.factorial: {missing}"
