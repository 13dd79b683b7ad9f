"""`sandbox sweep`: ledger resume (nothing computed twice, same summary), tables, bad input, CLI."""

import json
import math

import pandas as pd
import pytest

from sandbox.analytic import AnalyticConfig
from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.tasks import TaskSpec
from sweeps import grid, ledger

TASK = TaskSpec(domains=2, slots=3, dim=6, rank=2, true_rank=1, context_dim=4)
SOLVER = AnalyticConfig(steps=20, interval=5, population=4, plasticity=0.0)
SMALL = ["--domains", "2", "--slots", "3", "--dim", "6", "--rank", "2", "--true-rank", "1", "--context-dim", "4",
         "--steps", "20", "--interval", "5", "--population", "4", "--plasticity", "0"]




def _cfg(**kw):
    base = dict(task=TASK, solver=SOLVER, points=3, seeds=(0, 1, 2, 3))
    return grid.SweepConfig(**{**base, **kw})


class Counter:
    """Wraps `evaluate_point`, counting (point, seed) computations; can simulate a kill."""

    def __init__(self, die_after: int | None = None):
        self.seeds, self.calls, self.die_after = [], 0, die_after

    def __call__(self, spec, solver, seeds):
        if self.die_after is not None and self.calls >= self.die_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        self.seeds += [(spec.alignment, s) for s in seeds]
        return grid.evaluate_point(spec, solver, seeds)


def _strip(summary):
    return summary.drop(columns=[c for c in ("wall_s",) if c in summary]).reset_index(drop=True)


def test_kill_and_resume_computes_nothing_twice_and_matches_uninterrupted(tmp_path):
    cfg = _cfg()
    dying = Counter(die_after=2)
    with pytest.raises(KeyboardInterrupt):
        grid.run_sweep(cfg, tmp_path / "a", evaluate=dying, figures=False)
    assert dying.calls == 2 and len(dying.seeds) == 8
    resumed = Counter()
    out = grid.run_sweep(cfg, tmp_path / "a", evaluate=resumed, figures=False)
    assert resumed.calls == 1 and out.computed == 4 and out.reused == 8
    assert not set(resumed.seeds) & set(dying.seeds)
    again = Counter()
    out2 = grid.run_sweep(cfg, tmp_path / "a", evaluate=again, figures=False)
    assert again.calls == 0 and out2.computed == 0 and out2.reused == 12
    fresh = grid.run_sweep(cfg, tmp_path / "b", figures=False)
    cols = [c for c in fresh.results.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(out.results[cols], fresh.results[cols])
    pd.testing.assert_frame_equal(_strip(out.summary), _strip(fresh.summary))
    # the files on disk are the tables returned
    disk = pd.read_csv(tmp_path / "a" / "summary.csv")
    assert list(disk["regime"]) == list(fresh.summary["regime"])


def test_lifecycle_kill_resume_with_more_seeds_matches_uninterrupted(tmp_path):
    """With `--lifecycle`, a sweep killed after two points and continued with more seeds (so points 0
    and 1 compute seeds 1 and 3 as their own batch) equals an uninterrupted run: each seed's
    lifecycle noise comes from its own generator, not from the batch it happens to share. More
    seeds are another configuration, so they go to a new folder sharing the first one's ledger."""
    import dataclasses

    life = dataclasses.replace(SOLVER, lifecycle=True)
    dying = Counter(die_after=2)
    with pytest.raises(KeyboardInterrupt):
        grid.run_sweep(_cfg(solver=life, seeds=(0, 2)), tmp_path / "a0", evaluate=dying, figures=False)
    assert dying.calls == 2 and len(dying.seeds) == 4
    resumed = Counter()
    out = grid.run_sweep(_cfg(solver=life), tmp_path / "a", storage=str(tmp_path / "a0" / "trials.journal"),
                         evaluate=resumed, figures=False)
    assert resumed.calls == 3 and out.computed == 8 and out.reused == 4
    assert not set(resumed.seeds) & set(dying.seeds)
    assert sorted(s for a, s in resumed.seeds if a == dying.seeds[0][0]) == [1, 3]
    fresh = grid.run_sweep(_cfg(solver=life), tmp_path / "b", figures=False)
    cols = [c for c in fresh.results.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(out.results[cols], fresh.results[cols], rtol=1e-12)
    pd.testing.assert_frame_equal(_strip(out.summary), _strip(fresh.summary), rtol=1e-9)
    man = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert man["config"]["solver"]["lifecycle"] is True
    # the lifecycle changes the evo arm (else this test would not exercise it)
    plain = grid.run_sweep(_cfg(points=1, alignment=(0.0, 0.0)), tmp_path / "c", figures=False).results
    with_life = fresh.results[fresh.results["alignment"] == 0.0].reset_index(drop=True)
    evo = lambda df: df.loc[df.arm == "evo", "final_loss"].to_numpy()  # noqa: E731
    assert (abs(evo(plain) - evo(with_life)) > 1e-6).any()


def test_more_seeds_and_subset_points_reuse_ledger(tmp_path):
    """A finer grid with more seeds (another configuration, so another folder) on the same ledger
    computes only what is missing."""
    first = Counter()
    ledger_file = str(tmp_path / "ledger.journal")
    grid.run_sweep(_cfg(seeds=(0, 1), alignment=(0.0, 1.0), points=2), tmp_path / "a", storage=ledger_file,
                   evaluate=first, figures=False)
    assert len(first.seeds) == 4
    second = Counter()
    out = grid.run_sweep(_cfg(seeds=(0, 1, 2), alignment=(0.0, 1.0), points=3), tmp_path / "b", storage=ledger_file,
                         evaluate=second, figures=False)
    # points 0 and 1 exist with seeds 0, 1: only seed 2 there, and the new middle point in full
    assert sorted(second.seeds) == sorted([(0.0, 2), (1.0, 2), (0.5, 0), (0.5, 1), (0.5, 2)])
    assert out.reused == 4 and len(out.results) == 3 * 3 * 5   # 3 points x 3 seeds x 5 arms


def test_tables_manifest_and_figure(tmp_path):
    out = grid.run_sweep(_cfg(axis="context_noise", axis_range=(0.0, 0.5), axis_points=2, points=2, seeds=(0, 1, 2)),
                         tmp_path, figures=True)
    res = pd.read_csv(tmp_path / "results.csv")
    assert list(res.columns) == ["point", "seed", "arm", "alignment", "context_noise", *grid.RESULT_COLUMNS]
    assert len(res) == 4 * 3 * 5 and set(res["arm"]) == {"grad", "evo", "restart", "beta2", "oracle"}
    assert (res["log_loss"] == res["final_loss"].map(math.log)).all()
    # rel_excess is the final excess over the start's, the floor taken out
    floor = SOLVER.loss_floor
    assert res["rel_excess"].to_numpy() == pytest.approx(((res["final_loss"] - floor) / res["initial_excess"]).to_numpy(),
                                                         rel=1e-9, abs=1e-12)
    evo_evals = res.loc[res.arm == "evo", "loss_evals"].unique().tolist()
    assert evo_evals == [20 + 4 * 4] and res.loc[res.arm == "grad", "loss_evals"].unique().tolist() == [20]
    summ = pd.read_csv(tmp_path / "summary.csv")
    assert len(summ) == 4 and {"mean_delta", "p_holm", "p_tost", "regime", "delta_restart", "room", "room_joint",
                               "delta_beta2", "grad_drop", "converged", "grad_lr", "accepted", "accepted_gain",
                               "restart_regime", "room_regime"} <= set(summ.columns)
    assert (summ["value"] == "rel_excess").all()
    # mean delta is the mean of per-seed grad - evo rel_excess
    wide = res.pivot_table(index=["point", "seed"], columns="arm", values="rel_excess")
    want = (wide["grad"] - wide["evo"]).groupby(level=0).mean()
    assert summ["mean_delta"].to_numpy() == pytest.approx(want.to_numpy(), abs=1e-12)
    # each decomposed contrast is the mean of its per-seed differences; the ceiling's room is grad's own
    for arm, col in (("restart", "delta_restart"), ("beta2", "delta_beta2"), ("oracle", "room")):
        want = (wide["grad"] - wide[arm]).groupby(level=0).mean()
        assert summ[col].to_numpy() == pytest.approx(want.to_numpy(), abs=1e-12)
    # frozen adapters (SOLVER: plasticity 0): the ceiling is the exact best routing of the shared adapters
    best = res[res.arm == "grad"].set_index(["point", "seed"])["rel_oracle"]
    assert summ["room_joint"].to_numpy() == pytest.approx((wide["grad"] - best).groupby(level=0).mean().to_numpy(),
                                                          abs=1e-12)
    # every arm ran at grad's tuned setting (the beta2 control at its own beta2)
    tuned = res[res.arm == "grad"].groupby("point")["lr"].first()
    for arm in ("evo", "restart", "beta2"):
        assert (res[res.arm == arm].groupby("point")["lr"].first() == tuned).all()
    assert (tmp_path / "tuning.csv").exists()
    acc = res[res.arm == "evo"].groupby("point")["accepted"].mean()
    assert summ["accepted"].to_numpy() == pytest.approx(acc.to_numpy())
    assert (res.loc[res.arm == "evo", "generations"] == 4).all()
    man = json.loads((tmp_path / "manifest.json").read_text())
    assert man["axes"] == ["alignment", "context_noise"] and man["config"]["solver"]["plasticity"] == 0.0
    assert man["ended"] is not None and man["eps"] == 0.01
    assert (tmp_path / "figures" / "regime_heatmap.png").is_file()
    assert (tmp_path / "trials.journal").is_file()


def test_diverged_pairs_are_finished_trials(tmp_path):
    def nan_eval(spec, solver, seeds):
        recs = grid.evaluate_point(spec, solver, seeds)
        seed, rows, _ = recs[0]
        rows = [dict(r, final_loss=float("nan"), log_loss=float("nan"), diverged=True, diverged_step=3)
                if r["arm"] == "evo" else r for r in rows]
        return [(seed, rows, float("nan"))] + recs[1:]

    cfg = _cfg(points=1, alignment=(1.0, 1.0), seeds=(0, 1, 2))
    out = grid.run_sweep(cfg, tmp_path, evaluate=nan_eval, figures=False)
    assert out.summary.loc[0, "n_diverged"] == 1 and out.summary.loc[0, "n"] == 2
    again = Counter()
    grid.run_sweep(cfg, tmp_path, evaluate=again, figures=False)
    assert again.calls == 0
    st = ledger.open_study(ledger.storage_for(tmp_path, None), grid.DEFAULT_STUDY)
    assert len(ledger.finished(st)) == 3


def test_boundary_search_resumes_through_the_ledger(tmp_path):
    cfg = _cfg(search="boundary", trials=5, seeds=(0, 1))
    c1 = Counter()
    out = grid.run_sweep(cfg, tmp_path, evaluate=c1, figures=False)
    assert out.results["point"].nunique() == 5 and c1.calls == 5
    assert out.computed == 10 and out.reused == 0
    c2 = Counter()
    out2 = grid.run_sweep(cfg, tmp_path, evaluate=c2, figures=False)
    assert c2.calls == 0 and out2.computed == 0 and out2.reused == 10
    # the sampler was told the distance of each point's mean delta to the edge of the +-eps band
    import optuna

    b = optuna.load_study(study_name=grid.DEFAULT_STUDY + "-boundary", storage=ledger.storage_for(tmp_path, None))
    summ = out.summary.set_index("alignment")
    for t in b.get_trials(states=(optuna.trial.TrialState.COMPLETE,)):
        a = t.user_attrs["values"]["alignment"]
        assert t.value == pytest.approx(abs(abs(summ.loc[a, "mean_delta"]) - cfg.eps), abs=1e-12)


def test_grid_values_and_integer_axes():
    cfg = _cfg(points=11, alignment=(0.0, 1.0), axis="population", axis_range=(2.0, 5.0), axis_points=7)
    pts = cfg.grid_points()
    assert pts[3 * 4]["alignment"] == 0.3
    assert sorted({p["population"] for p in pts}) == [2, 3, 4, 5]
    assert all(isinstance(p["population"], int) for p in pts)
    # the folder key ignores seeds and statistics settings, so more seeds resume in the same folder
    assert _cfg(seeds=(0,)).folder_key() == _cfg(seeds=(0, 1, 5), eps=0.2).folder_key()
    assert _cfg(points=4).folder_key() != _cfg(points=5).folder_key()


@pytest.mark.parametrize("kw, flag", [
    (dict(points=0), "--points"), (dict(alignment=(-1.0, 1.0)), "--alignment"), (dict(seeds=()), "--seeds"),
    (dict(axis="bogus", axis_range=(0, 1)), "--axis"), (dict(eps=0.0), "--eps"), (dict(search="random"), "--search"),
    (dict(axis="slots", axis_range=(1.0, 3.0)), "--slots"),
])
def test_config_validation(kw, flag):
    with pytest.raises(BadInput) as e:
        _cfg(**kw)
    assert e.value.flag == flag


@pytest.mark.parametrize("args, flag", [
    (["--points", "0"], "--points"), (["--alignment", "-1"], "--alignment"), (["--alignment", "0..2"], "--alignment"),
    (["--seeds", "0"], "--seeds"), (["--axis", "bogus=0..1"], "--axis"), (["--axis", "overlap=0..3"], "--axis overlap"),
    (["--plasticity", "-1"], "--plasticity"), (["--router", "tanh"], "--router"), (["--slots", "2"], "--slots"),
    (["--budget", "flops"], "--budget"), (["--steps", "x"], "--steps"),
])
def test_cli_bad_input_exits_2_with_one_line(args, flag, capsys, tmp_path):
    code = main(["sweep", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and flag in err and "Traceback" not in err
    assert not (tmp_path / "x" / "results.csv").exists()


def test_cli_runs_and_resumes(tmp_path, capsys):
    args = ["sweep", "--out", str(tmp_path), "--points", "2", "--seeds", "3", "--no-figures", *SMALL]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "6 seed-points computed, 0 reused" in first and "regimes" in first
    assert main(args) == 0
    assert "0 seed-points computed, 6 reused" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "results.csv")) == 2 * 3 * 5


def test_cli_defaults_match_dataclasses():
    """The typer defaults are literals; they must agree with the dataclass defaults."""
    import inspect

    from sandbox.app.cli import app

    sweep = next(c.callback for c in app.registered_commands if c.name == "sweep")   # the typer entry
    sig = inspect.signature(sweep).parameters
    shared = {"steps", "lr", "plasticity", "interval", "points", "batch"}   # None: resolved per --system
    for obj in (TaskSpec(), AnalyticConfig(), grid.SweepConfig()):
        for name, value in obj.__dict__.items():
            if name in sig and name not in ("alignment", "seeds", "axis", "tune"):
                assert sig[name].default.default == (None if name in shared else value), name
    from sandbox.tuning import TuneConfig

    tc = TuneConfig()
    assert sig["tune"].default.default == tc.mode and sig["tune_robust"].default.default == tc.robust
    assert [float(x) for x in sig["tune_lr"].default.default.split(",")] == list(tc.lrs)


def test_batched_sweep_matches_point_by_point_and_resumes_after_a_kill(tmp_path, monkeypatch):
    """The default engine stacks points into batches; its tables equal the point-by-point engine's
    (to float rounding), a kill between batches loses only the batch in flight, and the resumed
    sweep computes only what is missing."""
    cfg = _cfg(points=4, axis="plasticity", axis_range=(0.0, 0.2), axis_points=2)   # two shape groups
    by_point = grid.run_sweep(cfg, tmp_path / "one", figures=False, chunk_rows=0)
    batched = grid.run_sweep(cfg, tmp_path / "many", figures=False)
    cols = [c for c in by_point.results.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(batched.results[cols], by_point.results[cols], rtol=1e-10, atol=1e-12)
    assert batched.summary["regime"].tolist() == by_point.summary["regime"].tolist()
    real, calls = ledger.record, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(ledger, "record", dying)
    with pytest.raises(KeyboardInterrupt):
        grid.run_sweep(cfg, tmp_path / "killed", figures=False, chunk_rows=8)     # 2 points per batch
    monkeypatch.setattr(ledger, "record", real)
    resumed = grid.run_sweep(cfg, tmp_path / "killed", figures=False, chunk_rows=8)
    assert resumed.reused == 2 * 4 and resumed.computed == 6 * 4
    pd.testing.assert_frame_equal(resumed.results[cols], by_point.results[cols], rtol=1e-10, atol=1e-12)


def test_point_by_point_runs_each_points_own_independent_seeds(tmp_path):
    """With --independent-seeds the point-by-point engine (chunk_rows=0) computes every point at its
    own seeds, as the stacked engine does (it used to run point 0's seeds at every point, so the
    results of the other points were missing from results.csv)."""
    cfg = _cfg(seeds=(0, 1), independent_seeds=True)
    by_point = grid.run_sweep(cfg, tmp_path / "one", figures=False, chunk_rows=0)
    batched = grid.run_sweep(cfg, tmp_path / "many", figures=False)
    assert by_point.computed == batched.computed == 3 * 2
    assert sorted(set(by_point.results["seed"])) == [0, 1, 100_000, 100_001, 200_000, 200_001]
    cols = [c for c in batched.results.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(by_point.results[cols], batched.results[cols], rtol=1e-10, atol=1e-12)
