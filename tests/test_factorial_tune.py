"""The factorial's router learning rate tuned per cell (--tune grid): refusals, the choice, resume,
the worker plan, and the convergence label."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch

from sandbox.app.cli import main
from sandbox.errors import BadInput
from substrate.cell import CellConfig
from sweeps import factorial as sfact
from sweeps.factorial import FactorialConfig, choose_router_lr

TINY_ARGS = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
             "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "2", "--bases", "1"]
TUNE_ARGS = ["--tune", "grid", "--tune-router-lr", "1,30", "--tune-seeds", "5,6"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, cache):
    """One tuned tiny factorial (B3,R x seeds 0,1; router lr 1x and 30x on tuning seeds 5,6)."""
    out = tmp_path_factory.mktemp("tuned") / "f"
    args = ["factorial", "--cells", "B3,R", "--seeds", "0,1", "--out", str(out), "--cache", cache, "--no-figures",
            *TINY_ARGS, *TUNE_ARGS]
    assert main(args) == 0
    return out, args


# ---------------------------------------------------------------------------------------------
# Refusals: one line naming the flag
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args,flag", [
    (["--seeds", "0,1", "--tune", "grid", "--tune-seeds", "1,5"], "--tune-seeds"),
    (["--tune", "sometimes"], "--tune"),
    (["--tune-router-lr", "0,3"], "--tune-router-lr"),
    (["--tune-router-lr", "3,3"], "--tune-router-lr"),
    (["--tune", "grid", "--tune-router-lr", "1000"], "--tune-router-lr"),   # 1000 x 3e-3 is a router lr above 1
    (["--tune-router-lr", "a,b"], "--tune-router-lr"),
    (["--tune-seeds", "x"], "--tune-seeds"),
    (["--tune", "grid", "--router-lr", "0.05"], "--router-lr"),
])
def test_bad_tuning_input_exits_2_with_one_line(args, flag, capsys):
    assert main(["factorial", "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:") and flag in err


def test_tuning_seeds_must_be_disjoint_from_the_evaluation_seeds_only_when_tuning():
    with pytest.raises(BadInput, match="both hold 1"):
        FactorialConfig(seeds=(0, 1), tune="grid", tune_seeds=(1, 5))
    FactorialConfig(seeds=(0, 1), tune="off", tune_seeds=(1, 5))   # off: the tuning seeds are never run
    FactorialConfig(base=CellConfig.of(lr=0.02), tune="off")       # nor the grid (300 x 0.02 would exceed 1)
    with pytest.raises(BadInput, match="largest gives 6"):
        FactorialConfig(base=CellConfig.of(lr=0.02), tune="grid")
    seq = FactorialConfig(base=CellConfig.of(bases=1), seeds=(0, 1), tune="grid", tune_seeds=(2, 3), seeds_to_resolve=6)
    assert seq.seed_pool() == (0, 1, 4, 5, 6, 7)                     # a sequential run's pool skips them


def test_tuning_off_keeps_the_factorial_identity():
    off = FactorialConfig(base=CellConfig.of(preset="tiny", steps=100))
    assert "tune" not in off.settings()
    grid = FactorialConfig(base=CellConfig.of(preset="tiny", steps=100), tune="grid")
    assert grid.settings()["tune"] == {"router_lr": [0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0], "seeds": [1000, 1001, 1002]}
    assert sfact.study_name(grid) != sfact.study_name(off)
    # another grid or other tuning seeds: another folder, the same study (the keys name candidate and seed)
    wider = FactorialConfig(base=CellConfig.of(preset="tiny", steps=100), tune="grid", tune_router_lr=(0.3, 1, 300),
                            tune_seeds=(7,))
    assert sfact.study_name(wider) == sfact.study_name(grid) and wider.settings() != grid.settings()
    # a folder written before the tuning fields existed is the same configuration with tuning off
    from sandbox.results import _defaults_of, config_difference, to_jsonable

    old = to_jsonable(off)
    for k in ("tune", "tune_router_lr", "tune_seeds"):
        old.pop(k)
    assert config_difference(old, off, defaults=_defaults_of(off)) is None
    assert config_difference(old, grid, defaults=_defaults_of(grid))[0] == "tune"


# ---------------------------------------------------------------------------------------------
# The choice
# ---------------------------------------------------------------------------------------------


def _by_loop(table: pd.DataFrame) -> dict:
    """The rule written as a plain loop: per cell, the multiple with the lowest mean loss among those
    with no diverged tuning run (ties to the smaller)."""
    best = {}
    for cell in table["cell"].unique():
        found = None
        for m in sorted(table["multiple"].unique()):
            rows = table[(table["cell"] == cell) & (table["multiple"] == m)]
            if rows["diverged"].any():
                continue
            score = sum(rows["loss"]) / len(rows)
            if found is None or score < found[1]:
                found = (m, score)
        best[cell] = found[0] if found else None
    return best


def test_choice_is_the_argmin_excluding_diverged_candidates():
    rows = []
    losses = {("A", 1): [3.0, 3.2], ("A", 3): [2.0, math.nan], ("A", 10): [2.5, 2.6], ("A", 30): [2.9, 2.4],
              ("B", 1): [1.0, 1.0], ("B", 3): [1.1, 1.1], ("B", 10): [1.2, 0.9], ("B", 30): [5.0, 5.0]}
    for (cell, m), ls in losses.items():
        for seed, loss in zip((7, 8), ls):
            rows.append({"cell": cell, "multiple": float(m), "router_lr": m * 3e-3, "seed": seed, "base": 0,
                         "loss": loss, "diverged": not math.isfinite(loss), "chosen": False})
    table = pd.DataFrame(rows)
    got = choose_router_lr(table, (1.0, 3.0, 10.0, 30.0))
    assert {c: v["multiple"] for c, v in got.items()} == _by_loop(table) == {"A": 10.0, "B": 1.0}
    assert got["A"]["excluded"] == [3.0] and got["A"]["edge"] == "" and got["B"]["edge"] == "low"
    assert got["A"]["router_lr"] == pytest.approx(0.03) and got["A"]["score"] == pytest.approx(2.55)
    everything_diverged = table.assign(diverged=True)
    assert choose_router_lr(everything_diverged, (1.0, 3.0, 10.0, 30.0))["A"]["multiple"] is None


def test_tuned_factorial_runs_each_cell_at_its_argmin(tuned, capsys):
    out, _ = tuned
    tuning = pd.read_csv(out / "tuning.csv")
    assert list(tuning.columns) == list(sfact.TUNING_COLUMNS)
    assert len(tuning) == 2 * 2 * 2 and set(tuning["seed"]) == {5, 6} and set(tuning["multiple"]) == {1.0, 30.0}
    assert tuning["drop_last_half"].notna().all()
    want = _by_loop(tuning)
    m = json.loads((out / "manifest.json").read_text())
    t = m["tuning"]
    assert t["mode"] == "grid" and (t["computed"], t["reused"]) == (8, 0)
    assert {c: v["multiple"] for c, v in t["chosen"].items()} == want
    cells = pd.read_csv(out / "cells.csv")
    for cell, mult in want.items():
        assert cells.loc[cells["cell"] == cell, "router_lr"].tolist() == pytest.approx([mult * 3e-3] * 2)
        assert tuning.loc[tuning["chosen"] & (tuning["cell"] == cell), "multiple"].unique().tolist() == [mult]
        assert (cells.loc[cells["cell"] == cell, "tune_edge"] == t["chosen"][cell]["edge"]).all()
    assert cells["router_lr_tuned"].all()
    att = pd.read_csv(out / "attribution.csv").set_index("contrast")
    assert att.loc["router", "treated_router_lr"] == pytest.approx(want["R"] * 3e-3)
    assert att.loc["router", "reference_router_lr"] == pytest.approx(want["B3"] * 3e-3)
    assert bool(att.loc["router", "router_lr_tuned"])
    # the convergence label: per row the drop over the last half, per cell the label
    assert cells["drop_last_half"].notna().all() and set(m["convergence"]["converged"]) == {"B3", "R"}
    for cell, part in cells.groupby("cell"):
        assert part["converged"].nunique() == 1
        assert bool(part["converged"].iloc[0]) == bool(part["drop_last_half"].mean() <= 0.5 * 0.01)


def test_resume_does_not_rerun_tuning(tuned, capsys):
    out, args = tuned
    assert main(args) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert (m["tuning"]["computed"], m["tuning"]["reused"]) == (0, 8) and (m["computed"], m["reused"]) == (0, 4)
    assert "router lr tuned per cell" in capsys.readouterr().out


def test_a_killed_tuning_resumes_where_it_stopped(tmp_path, cache, monkeypatch, capsys):
    calls = []
    real = sfact.run_cell

    def dies_on_the_third(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    out = tmp_path / "f"
    args = ["factorial", "--cells", "B3,R", "--seeds", "0,", "--out", str(out), "--cache", cache, "--no-figures",
            *TINY_ARGS, "--tune", "grid", "--tune-router-lr", "1,30", "--tune-seeds", "5,"]
    monkeypatch.setattr(sfact, "run_cell", dies_on_the_third)
    assert main(args) != 0
    monkeypatch.setattr(sfact, "run_cell", real)
    assert main(args) == 0
    t = json.loads((out / "manifest.json").read_text())["tuning"]
    assert (t["computed"], t["reused"]) == (2, 2)


def test_untuned_factorial_says_so(tmp_path, cache, capsys):
    out = tmp_path / "f"
    assert main(["factorial", "--cells", "B3,R", "--seeds", "0,", "--out", str(out), "--cache", cache,
                 "--no-figures", *TINY_ARGS]) == 0
    text = capsys.readouterr().out
    assert "router lr not tuned: every cell at 0.03" in text and "NOT tuned" in text
    assert not (out / "tuning.csv").exists()
    assert json.loads((out / "manifest.json").read_text())["tuning"]["mode"] == "off"
    assert not pd.read_csv(out / "cells.csv")["router_lr_tuned"].any()


# ---------------------------------------------------------------------------------------------
# Workers: the define step queues the tuning trials, then the evaluation trials at the choice
# ---------------------------------------------------------------------------------------------


def test_plan_queues_tuning_first_then_the_evaluation_at_the_choice(tuned, tmp_path):
    from sweeps.systems import factorial_plan

    out, _ = tuned
    fcfg = FactorialConfig(base=CellConfig.of(preset="tiny", steps=4, slots=4, rank=4, batch=2, eval_windows=2,
                                              fit_windows=1, pretrain_steps=20, eval_every=2, bases=1,
                                              checkpoint_every=2, min_age=10, interval=5),   # as the command resolved them
                           cells=("B3", "R"), seeds=(0, 1), tune="grid", tune_router_lr=(1.0, 30.0), tune_seeds=(5, 6))
    fresh = tmp_path / "empty.journal"
    jobs, what = factorial_plan(fcfg, out, "c", str(fresh))
    assert [j.key for j in jobs] == sfact.tuning_keys(fcfg) and "tuning first" in what
    assert all(j.payload["dir"].startswith("tuning/") for j in jobs)
    assert {j.payload["cell"]["router_lr"] for j in jobs} == {3e-3, 0.09}
    jobs, what = factorial_plan(fcfg, out, "c", str(out / "ledger.journal"))   # the tuned run's ledger
    chosen = json.loads((out / "manifest.json").read_text())["tuning"]["chosen"]
    assert [j.key for j in jobs] == [f"{c}/{s}/{chosen[c]['multiple']:g}x" for s in (0, 1) for c in ("B3", "R")]
    assert "dir" not in jobs[0].payload
    for j in jobs:
        assert j.payload["cell"]["router_lr"] == pytest.approx(chosen[j.attrs["cell"]]["router_lr"])


def test_worker_runs_a_tuning_trial_in_its_own_folder(tmp_path, cache):
    from sweeps.systems import factorial_jobs, run_factorial_trial
    from sweeps.worker import WorkerContext

    fcfg = FactorialConfig(base=CellConfig.of(preset="tiny", steps=2, slots=4, rank=4, batch=2, eval_windows=2,
                                              fit_windows=1, pretrain_steps=20, eval_every=2, bases=1),
                           cells=("R",), seeds=(0,), tune="grid", tune_router_lr=(3.0,), tune_seeds=(5,))
    [job] = factorial_jobs(fcfg, tmp_path, cache, tuning=True)
    res = run_factorial_trial(job.payload, WorkerContext())
    assert (tmp_path / "tuning" / "R_x3_s5" / "metrics.json").exists() and not (tmp_path / "trials").exists()
    assert res.attrs["result"]["router_lr"] == pytest.approx(9e-3)


def test_last_half_drop():
    curve = pd.DataFrame({"domain": ["balanced"] * 5 + ["d0"], "step": [0, 25, 50, 75, 100, 100],
                          "log_ppl": [5.0, 4.5, 4.2, 4.15, 4.1, 9.0]})
    assert sfact.last_half_drop(curve, 100) == pytest.approx(0.1)
    assert math.isnan(sfact.last_half_drop(curve[curve["step"] <= 50], 100))   # nothing after the midpoint


def test_tuned_factorial_through_workers_tunes_then_evaluates_then_collects(pg_url, tmp_path, capsys):
    from sweeps import systems, worker

    cache = str(tmp_path / "cache")
    args = ["factorial", "--cells", "B3,R", "--seeds", "1,", *TINY_ARGS, "--tune", "grid", "--tune-router-lr", "3,30",
            "--tune-seeds", "8,", "--cache", cache, "--out", str(tmp_path / "f"), "--storage", pg_url,
            "--device", "cpu", "--no-figures"]

    def work(n: int) -> str:
        err = capsys.readouterr().err
        study = err.split("study '")[1].split("'")[0]
        counts = worker.run_worker(worker.database(pg_url), study, heartbeat_s=1, grace_s=5, systems=systems.SYSTEMS,
                                   code=systems.code_identity())
        assert (counts.claimed, counts.completed) == (n, n)
        return err

    assert main([*args, "--enqueue-only"]) == 0
    assert "tuning first" in work(4)                                   # 2 cells x 2 candidates x 1 tuning seed
    assert main([*args, "--enqueue-only"]) == 0
    assert "evaluation trials at the chosen router lr" in work(2)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "trials: 0 computed, 2 reused" in err
    t = json.loads((tmp_path / "f" / "manifest.json").read_text())["tuning"]
    assert (t["computed"], t["reused"]) == (0, 4)
    cells = pd.read_csv(tmp_path / "f" / "cells.csv")
    for cell, c in t["chosen"].items():
        assert cells.loc[cells["cell"] == cell, "router_lr"].tolist() == pytest.approx([c["router_lr"]])
    assert (tmp_path / "f" / "tuning" / "R_x30_s8" / "metrics.json").exists()


def test_a_widened_grid_reuses_the_finished_candidates(tuned, tmp_path, capsys):
    out, args = tuned
    wider = [a if a != "1,30" else "1,30,100" for a in args]
    wider[wider.index("--out") + 1] = str(tmp_path / "wider")
    assert main([*wider, "--storage", str(out / "ledger.journal")]) == 0
    t = json.loads((tmp_path / "wider" / "manifest.json").read_text())["tuning"]
    assert (t["computed"], t["reused"]) == (4, 8)                      # only 100 x, for 2 cells x 2 tuning seeds
    assert len(pd.read_csv(tmp_path / "wider" / "tuning.csv")) == 12
    # the evaluation trials were reused from the other folder's ledger: their drop comes with the result
    assert pd.read_csv(tmp_path / "wider" / "cells.csv")["drop_last_half"].notna().all()


def test_tuned_factorial_draws_its_figures(tmp_path, cache):
    out = tmp_path / "f"
    assert main(["factorial", "--cells", "B3,R", "--seeds", "0,", "--out", str(out), "--cache", cache, *TINY_ARGS,
                 "--tune", "grid", "--tune-router-lr", "1,30", "--tune-seeds", "5,"]) == 0
    assert (out / "tuning.csv").exists() and (out / "figures" / "attribution.png").exists()
