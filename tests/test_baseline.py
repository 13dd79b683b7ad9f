"""A baseline worth beating: the tuner, the floor-free units, the ceiling and the convergence gate.

Oracles: the tuner's batched choice against a loop that runs every candidate on its own; the
choice rule against gradient descent on a quadratic whose best step is known; the ceiling against
every arm's final loss; the labels against the same sweep at other loss floors.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sandbox import analytic as an
from sandbox import tuning
from sandbox.errors import BadInput
from sandbox.stats import decompose, label_point
from sandbox.tasks import TaskSpec
from sweeps import grid

SPEC = TaskSpec(alignment=0.6)
SMALL = tuning.TuneConfig(lrs=(0.05, 0.2, 0.8), adapter=(1.0,), seeds=(1000, 1001, 1002))


def _sweep(tmp_path, name, **kw):
    base = dict(solver=an.AnalyticConfig(steps=40, interval=5), alignment=(0.0, 1.0), points=3, seeds=tuple(range(4)),
                tune=SMALL)
    base.update(kw)
    return grid.run_sweep(grid.SweepConfig(**base), tmp_path / name, figures=False)


def test_choice_rule_finds_the_known_best_step_of_a_quadratic():
    """Gradient descent on f(x) = x^2 from x0: x_T = (1 - 2 lr)^T x0, exactly 0 at lr = 1/2, diverging
    beyond lr = 1. The rule picks 0.5 and never a diverging candidate, even with a lucky seed."""
    lrs = [0.05, 0.1, 0.2, 0.5, 0.9, 1.2]
    cands = [an.AnalyticConfig(lr=lr) for lr in lrs]
    x0 = np.array([1.0, -2.0, 0.5])
    scored = []
    for lr in lrs:
        xT = (1 - 2 * lr) ** 30 * x0
        rel = xT ** 2 / x0 ** 2
        diverged = int((rel > 1e6).sum())
        scored.append((float(rel[rel <= 1e6].mean()) if diverged < 3 else np.inf, diverged, 0.0))
    best, table = tuning._choose(cands, scored)
    assert lrs[best] == 0.5 and table[best]["chosen"] and sum(r["chosen"] for r in table) == 1
    scored[-1] = (0.0, 1, 0.0)          # the best mean, but one seed diverged: excluded
    assert lrs[tuning._choose(cands, scored)[0]] == 0.5


def test_tuner_batched_choice_equals_a_loop_over_candidates():
    """Every candidate stacked in one batch scores exactly as that candidate run alone."""
    base = an.AnalyticConfig(steps=40, interval=5)
    [out] = tuning.tune_points([(SPEC, base)], SMALL)
    loop = []
    for cand in SMALL.candidates(base):
        res = an.run_arms(SPEC, cand, SMALL.seeds, arms=("grad",))["grad"]
        loop.append(float((res.excess / res.initial_excess).mean()))
    assert [r["score"] for r in out.table] == pytest.approx(loop, rel=1e-12, abs=1e-15)
    assert out.chosen.lr == SMALL.lrs[int(np.argmin(loop))]
    assert out.chosen.beta2 == 0.999 and out.chosen.lr * out.chosen.plasticity == pytest.approx(base.lr * base.plasticity)


@given(st.lists(st.integers(0, 50), min_size=1, max_size=6, unique=True),
       st.lists(st.integers(0, 50), min_size=1, max_size=6, unique=True))
def test_tuning_and_evaluation_seeds_never_overlap(evals, tunes):
    tc = tuning.TuneConfig(seeds=tuple(tunes))
    overlap = set(evals) & set(tunes)
    if overlap:
        with pytest.raises(BadInput, match="--tune-seeds"):
            grid.SweepConfig(seeds=tuple(evals), tune=tc, points=2)
    else:
        cfg = grid.SweepConfig(seeds=tuple(evals), tune=tc, points=2)
        assert not set(cfg.point_seeds(0)) & set(tunes)
    off = dataclasses.replace(tc, mode="off")          # tuning off: no tuning seeds to protect
    grid.SweepConfig(seeds=tuple(evals), tune=off, points=2)


def test_independent_seeds_differ_per_point_and_stay_disjoint_from_tuning(tmp_path):
    out = _sweep(tmp_path, "ind", independent_seeds=True)
    seeds = out.results.groupby("point")["seed"].apply(lambda s: frozenset(s))
    assert len(set(seeds)) == 3 and not set().union(*seeds) & set(SMALL.seeds)
    shared = grid.SweepConfig(points=3).point_seeds(2)
    assert shared == grid.SweepConfig(points=3).seeds


def test_labels_and_units_do_not_depend_on_the_loss_floor(tmp_path):
    """The floor is a constant: trajectories, rel_excess and every label are identical at any floor
    (the log-loss column alone moves)."""
    outs = [_sweep(tmp_path, f"f{f}", solver=an.AnalyticConfig(steps=40, interval=5, loss_floor=f))
            for f in (0.0, 0.001, 0.03)]
    ref = outs[0]
    for o in outs[1:]:
        assert o.results["rel_excess"].tolist() == ref.results["rel_excess"].tolist()
        assert o.summary["regime"].tolist() == ref.summary["regime"].tolist()
        assert o.summary["mean_delta"].tolist() == ref.summary["mean_delta"].tolist()
        assert [p.solver.lr for p in o.plans] == [p.solver.lr for p in ref.plans]
    assert not np.allclose(outs[1].results["log_loss"], outs[2].results["log_loss"])


@pytest.mark.parametrize("kw", [dict(), dict(plasticity=0.0), dict(router="sigmoid"), dict(lifecycle=True)])
def test_no_arm_ends_below_the_ceiling_its_label_uses(kw):
    """The ceiling of ``no-room`` is the joint optimum (the floor): rel_excess >= 0 for every arm and
    seed, so delta <= room_joint per seed; each arm's own best routing is no worse than its router."""
    cfg = an.AnalyticConfig(steps=40, interval=5, **kw)
    res = an.run_arms(TaskSpec(alignment=0.7, context_noise=0.3), cfg, range(6))
    tidy = pd.DataFrame(an.result_rows(res, range(6)))
    assert (tidy["rel_excess"] >= -1e-12).all()
    assert (tidy["rel_oracle"] <= tidy["rel_excess"] + 1e-12).all()
    wide = tidy.pivot(index="seed", columns="arm", values="rel_excess")
    ceiling = tidy[tidy.arm == "grad"].set_index("seed")["rel_oracle"] if cfg.plasticity == 0 else 0.0
    for arm in ("evo", "restart", "beta2", "oracle"):
        assert (wide[arm] >= ceiling - 1e-12).all()            # frozen: every arm shares grad's adapters
    summ = decompose(tidy.assign(point=0, adapter_lr=cfg.lr * cfg.plasticity), by=["point"])
    per_seed = wide["grad"] - ceiling
    assert summ["room_joint"].iloc[0] == pytest.approx(per_seed.mean(), abs=1e-12)
    assert (wide["grad"] - wide["evo"] <= per_seed + 1e-12).all()     # no delta above the ceiling's room


def test_a_slow_baseline_makes_search_look_good_and_tuning_removes_it(tmp_path):
    """Frozen aligned adapters, a router lr of 0.002: grad barely moves the router in 40 steps, the
    search (steps in logit units, not in lr) assigns the slots and `beats`. Tuned, grad assigns them
    itself and the search has nothing left to win."""
    solver = an.AnalyticConfig(steps=40, interval=5, lr=0.002, plasticity=0.0)
    kw = dict(solver=solver, alignment=(1.0, 1.0), points=1, seeds=tuple(range(6)))
    slow = _sweep(tmp_path, "slow", tune=dataclasses.replace(SMALL, mode="off"), converged_frac=1e9, **kw)
    assert slow.summary["regime"].iloc[0] == "beats"
    assert slow.summary["mean_delta"].iloc[0] >= 0.01
    tuned = _sweep(tmp_path, "tuned", tune=tuning.TuneConfig(lrs=(0.002, 0.02, 0.2, 2.0), adapter=(1.0,),
                                                            seeds=(1000, 1001, 1002)), **kw)
    assert tuned.plans[0].solver.lr > 0.002
    assert tuned.summary["regime"].iloc[0] != "beats"
    assert tuned.summary["mean_delta"].iloc[0] < 0.01
    # and the convergence gate flags the slow baseline when it is not switched off
    gated = _sweep(tmp_path, "gated", tune=dataclasses.replace(SMALL, mode="off"), **kw)
    assert gated.summary["regime"].iloc[0] == "unconverged"
    assert gated.summary["converged"].iloc[0] is False or gated.summary["converged"].iloc[0] == False  # noqa: E712


def test_accept_threshold_makes_a_search_of_tiny_gains_inert():
    """accept_tol near 1: no child is good enough, so the es router never changes: evo equals grad
    bit for bit, every generation counts 0, and the point is labelled inert."""
    cfg = an.AnalyticConfig(steps=30, interval=5, accept_tol=0.999)
    res = an.run_arms(SPEC, cfg, range(4), arms=("grad", "evo"))
    assert torch.equal(res["grad"].excess, res["evo"].excess)
    assert res["evo"].accepted.sum() == 0 and torch.equal(res["evo"].search_gain, torch.zeros(4, dtype=torch.float64))
    tidy = pd.DataFrame(an.result_rows(res, range(4))).assign(point=0)
    assert decompose(tidy, by=["point"])["regime"].iloc[0] == "inert"


def test_beta2_control_at_grads_own_beta2_is_grad():
    cfg = an.AnalyticConfig(steps=30, interval=5, control_beta2=0.999)
    res = an.run_arms(SPEC, cfg, range(3), arms=("grad", "beta2"))
    assert torch.equal(res["grad"].excess, res["beta2"].excess)
    other = an.run_arms(SPEC, dataclasses.replace(cfg, control_beta2=0.9), range(3), arms=("beta2",))["beta2"]
    assert not torch.equal(res["grad"].excess, other.excess)


def test_beats_means_better_by_at_least_eps_and_no_room_never_hides_a_degradation():
    assert label_point("beats<eps", "r", acted=True, room_high=0.001, eps=0.01)[0] == "no-room"
    assert label_point("degrades<eps", "r", acted=True, room_high=0.001, eps=0.01)[0] == "degrades<eps"
    assert label_point("beats", "r", acted=True, room_high=1.0, eps=0.01, unconverged="still falling")[0] == "unconverged"
    assert label_point("beats", "r", acted=False, room_high=1.0, eps=0.01, unconverged="x")[0] == "inert"
    # significant, CI beyond eps on one side, mean below eps: beats<eps, not beats
    rng = np.random.default_rng(0)
    d = 0.0095 + 0.004 * rng.standard_normal(12)
    tidy = pd.DataFrame([{"point": 0, "seed": i, "arm": a, "rel_excess": v}
                         for i in range(12) for a, v in (("grad", 0.5 + d[i]), ("evo", 0.5))])
    s = decompose(tidy, by=["point"])
    assert s["p_holm"].iloc[0] < 0.05 and s["ci_high"].iloc[0] > 0.01 and s["mean_delta"].iloc[0] < 0.01
    assert s["regime"].iloc[0] == "beats<eps"


def test_finite_batch_terms_average_to_the_exact_gram_terms():
    """Monte Carlo: with x ~ N(0, I_d), E[(1/n) X X^T] = I, so the batch terms' mean over many draws
    converges on `gram_terms` (within 5 standard errors, entry by entry)."""
    task = an.make_task(SPEC, [1, 2])
    st0 = an.initial_state(task, SPEC, an.AnalyticConfig())
    gen = torch.Generator().manual_seed(0)
    draws = [an.batch_terms(st0.A, st0.B, task, 1.0,
                            torch.randn(2, SPEC.domains, SPEC.dim, 16, generator=gen, dtype=torch.float64))
             for _ in range(400)]
    G0, c0, e0 = an.gram_terms(st0.A, st0.B, task.U.double(), task.V.double(), 1.0)
    for j, exact in enumerate((G0.unsqueeze(1).expand(-1, SPEC.domains, -1, -1), c0, e0)):
        vals = torch.stack([d[j] for d in draws])
        se = vals.std(0) / len(draws) ** 0.5
        assert ((vals.mean(0) - exact).abs() <= 5 * se + 1e-12).all()


def test_batch_training_is_noisy_but_reported_losses_stay_exact():
    cfg = an.AnalyticConfig(steps=20, interval=5, batch=4, lr=0.2)
    a = an.run_arms(SPEC, cfg, range(3), arms=("grad",))["grad"]
    b = an.run_arms(SPEC, cfg, range(3), arms=("grad",))["grad"]
    exact = an.run_arms(SPEC, dataclasses.replace(cfg, batch=0), range(3), arms=("grad",))["grad"]
    assert torch.equal(a.final_loss, b.final_loss)               # seeded: the same draws every run
    assert not torch.equal(a.final_loss, exact.final_loss)      # but other steps than the exact loss's
    assert torch.equal(a.initial_loss, exact.initial_loss)      # and the same exact measure of the start


def test_finite_batch_terms_equal_the_dense_form():
    """The block form against ``(1/n) ||(W_k - ...) X||`` built from d x d matrices, per-row scales."""
    task = an.make_task(SPEC, [1, 2])
    st0 = an.initial_state(task, SPEC, an.AnalyticConfig())
    X = torch.randn(2, SPEC.domains, SPEC.dim, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sc = torch.tensor([0.7, 1.3], dtype=torch.float64)
    G, c, e = an.batch_terms(st0.A, st0.B, task, sc, X)
    W = sc.view(2, 1, 1, 1) * torch.einsum("skdr,skre->skde", st0.B, st0.A)          # (S, K, d, d)
    D = torch.einsum("smdr,smre->smde", task.U.double(), task.V.double())            # (S, M, d, d)
    WX = torch.einsum("skde,smen->smkdn", W, X / 5 ** 0.5)
    DX = torch.einsum("smde,smen->smdn", D, X / 5 ** 0.5)
    torch.testing.assert_close(G, torch.einsum("smkdn,smldn->smkl", WX, WX), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c, torch.einsum("smkdn,smdn->smk", WX, DX), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(e, DX.pow(2).sum((-1, -2)), rtol=1e-12, atol=1e-12)


def test_report_rebuilds_the_tuned_summary_from_the_tables_alone(tmp_path):
    """`sandbox report DIR` recomputes summary.csv from results.csv, tuning.csv and the manifest's
    stats section: the same labels, numbers and tuning columns as the sweep wrote."""
    from figures.report import build_report

    out = _sweep(tmp_path, "rep", converged_frac=0.25)
    wrote = pd.read_csv(tmp_path / "rep" / "summary.csv")
    (tmp_path / "rep" / "summary.csv").unlink()
    build_report(tmp_path / "rep")
    again = pd.read_csv(tmp_path / "rep" / "summary.csv")
    assert list(again.columns) == list(wrote.columns)
    pd.testing.assert_frame_equal(again, wrote)
    assert len(out.summary) == 3


def test_independent_seeds_need_the_grid_search():
    with pytest.raises(BadInput, match="--independent-seeds"):
        grid.SweepConfig(independent_seeds=True, search="boundary")
