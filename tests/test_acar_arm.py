"""The acar arm of the maps: the shared ACAR rule (`sandbox.acar`), the analytic
sandbox's sigma from the slots' predictions, the arm read off the grad trajectory, its counts,
its paired statistics, and `sandbox sweep --acar` leaving the default map untouched."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sandbox import acar
from sandbox import analytic as an
from sandbox.adapters import slot_gram
from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.stats import ACAR_SUMMARY, acar_summary
from sandbox.tasks import TaskSpec, make_task
from sweeps import grid

SPEC = TaskSpec(domains=3, slots=5, dim=10, rank=3, true_rank=2, context_dim=6, alignment=0.6)
FAST = dict(steps=30, interval=10, population=6)


# ---------------------------------------------------------------------------------------------
# The rule


def test_sigma_is_exactly_0_half_1_over_every_agreement_pattern():
    for ab, ac, bc in itertools.product([False, True], repeat=3):
        n = ab + ac + bc
        want = 0.0 if n == 3 else (1.0 if n == 0 else 0.5)       # two pairs (non-transitive): two agree
        got = acar.sigma_from_pairs(torch.tensor(ab), torch.tensor(ac), torch.tensor(bc))
        assert float(got) == want
    assert acar.modes(torch.tensor([0.0, 0.5, 1.0])).tolist() == [1, 2, 3]


def _bank_of(maps: list[torch.Tensor]):
    """Rank-r factors (r = d) whose products are the given d x d maps: A = I, B = map."""
    d = maps[0].shape[0]
    A = torch.eye(d, dtype=torch.float64).expand(len(maps), d, d).clone()
    B = torch.stack(maps).double()
    return A, B


def test_three_agreement_cases_on_hand_made_slots():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 6, generator=g, dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    E = [torch.outer(Q[:, i], Q[:, i]) for i in range(3)]          # mutually orthogonal, unit norm
    cases = {0.0: [W, 1.2 * W, 0.9 * W], 0.5: [W, 1.1 * W, W @ Q], 1.0: E}
    for sigma, maps in cases.items():
        A, B = _bank_of(maps + [torch.zeros(6, 6), torch.zeros(6, 6)])
        G = slot_gram(A, B)                                        # (K, K)
        score = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])         # candidates 0, 1, 2
        res = acar.analytic_gates(G, score, tol=0.5)
        assert float(res.sigma[0]) == sigma
        n = int(res.mode[0])
        assert n == {0.0: 1, 0.5: 2, 1.0: 3}[sigma]
        want = torch.zeros(5, dtype=torch.float64)
        want[:n] = 1.0 / n
        torch.testing.assert_close(res.gates[0], want, rtol=0, atol=0)


def test_tolerance_is_relative_to_the_larger_prediction():
    W = torch.eye(4, dtype=torch.float64)
    for c, tol, agree in [(1.4, 0.5, True), (3.0, 0.5, False), (3.0, 0.7, True), (1.0, 0.0, True), (1.01, 0.0, False)]:
        A, B = _bank_of([W, c * W, -W])
        ab, ac, bc = acar.slot_agreement(slot_gram(A, B), torch.tensor([[0, 1, 2]]), tol)
        assert bool(ab[0]) is agree           # ||W - cW|| / ||cW|| = |c - 1| / c
        assert not bool(ac[0]) or tol >= 2    # W and -W differ by twice their size


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(3, 7), st.floats(0.0, 2.5))
def test_gates_sum_to_one_on_exactly_n_equal_top_slots(seed, K, tol):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(2, K, 2, 5, generator=g, dtype=torch.float64)
    B = torch.randn(2, K, 5, 2, generator=g, dtype=torch.float64)
    if seed % 3 == 0:
        A[:, 1], B[:, 1] = A[:, 0], B[:, 0]                         # some identical slots, so agreement occurs
    score = torch.randn(2, 6, K, generator=g, dtype=torch.float64)
    res = acar.analytic_gates(slot_gram(A, B), score, tol)
    torch.testing.assert_close(res.gates.sum(-1), torch.ones(2, 6, dtype=torch.float64))
    assert set(res.sigma.unique().tolist()) <= {0.0, 0.5, 1.0}
    order = score.argsort(-1, descending=True)
    for s, i in itertools.product(range(2), range(6)):
        n = int(res.mode[s, i])
        on = res.gates[s, i].nonzero().flatten().tolist()
        assert sorted(on) == sorted(order[s, i, :n].tolist())     # the best n of the score
        assert torch.all(res.gates[s, i, on] == 1.0 / n)
    assert res.counts().sum(-1).tolist() == [6, 6]
    if tol >= 2:                                                    # any two maps are within 2x the larger
        assert bool((res.mode == 1).all())


def test_no_gradient_reaches_acar():
    A = torch.randn(1, 4, 2, 5, dtype=torch.float64, requires_grad=True)
    B = torch.randn(1, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    W = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    res = acar.analytic_gates(slot_gram(A, B), torch.randn(1, 2, 3, dtype=torch.float64) @ W)
    assert not res.gates.requires_grad and res.gates.grad_fn is None


def test_usage_counts_and_saving():
    u = acar.usage({1: 6, 2: 3, 3: 1})
    assert (u["mode1"], u["mode2"], u["mode3"]) == (6, 3, 1)
    assert u["mean_slots"] == pytest.approx(1.5) and u["saved_vs_always3"] == pytest.approx(0.5)
    assert math.isnan(acar.usage({1: 0, 2: 0, 3: 0})["mean_slots"])


# ---------------------------------------------------------------------------------------------
# The analytic arm


def test_acar_arm_is_read_off_grad_and_equals_it_solved_alone():
    cfg = an.AnalyticConfig(**FAST, acar=True)
    res = an.run_arms(SPEC, cfg, [4, 5])
    assert set(res) == set(an.ALL_ARMS)
    task = make_task(SPEC, [4, 5])
    alone = an.solve_rows(an.stack_rows([(SPEC, cfg, task.seeds)], tasks=[task]), "acar",
                          an.initial_state(task, SPEC, cfg))
    for name in ("final_loss", "domain_loss", "initial_loss", "curve", "diverged_step", "modes"):
        torch.testing.assert_close(getattr(res["acar"], name), getattr(alone, name), rtol=0, atol=0)
    # the grad arm is the same with or without the acar arm (common random numbers), and so is every arm
    plain = an.run_arms(SPEC, an.AnalyticConfig(**FAST), [4, 5])
    for arm in an.ARMS:
        torch.testing.assert_close(res[arm].final_loss, plain[arm].final_loss, rtol=0, atol=0)
    # deterministic, and the modes count every (domain, draw): noise-free, one draw per domain
    again = an.run_arms(SPEC, cfg, [4, 5])
    torch.testing.assert_close(again["acar"].final_loss, res["acar"].final_loss, rtol=0, atol=0)
    assert res["acar"].modes.sum(-1).tolist() == [SPEC.domains] * 2


def test_acar_arm_loss_is_the_closed_form_under_its_gates_and_counts_noisy_draws():
    spec = TaskSpec(**{**SPEC.__dict__, "context_noise": 0.3})
    cfg = an.AnalyticConfig(**FAST, acar=True, eval_draws=16, acar_tol=2.0)   # tol 2: always one slot
    res = an.run_arms(spec, cfg, [7], arms=("grad", "acar"))
    assert res["acar"].modes.tolist() == [[spec.domains * 16, 0, 0]]
    rows = an.result_rows(res, [7])
    r = next(r for r in rows if r["arm"] == "acar")
    assert (r["mode1"], r["mode2"], r["mode3"], r["mean_slots"], r["saved_vs_always3"]) == (48, 0, 0, 1.0, pytest.approx(2 / 3))
    assert "mode1" not in next(r for r in rows if r["arm"] == "grad")
    zero = an.run_arms(spec, an.AnalyticConfig(**FAST, acar=True, eval_draws=16, acar_tol=0.0), [7], arms=("acar",))
    assert int(zero["acar"].modes[0, 0]) == 0          # distinct slots never agree at tol 0


def test_config_identity_leaves_acar_out_while_off():
    off, on = an.AnalyticConfig(), an.AnalyticConfig(acar=True)
    assert "acar" not in off.identity() and "acar_tol" not in off.identity()
    assert on.identity()["acar"] is True and on.arms == an.ALL_ARMS and off.arms == an.ARMS
    assert grid.point_key(SPEC, off) == grid.point_key(SPEC, an.AnalyticConfig(acar_tol=0.9))
    assert grid.point_key(SPEC, off) != grid.point_key(SPEC, on)
    with pytest.raises(BadInput, match="--acar-tol"):
        an.AnalyticConfig(acar=True, acar_tol=-1.0)
    with pytest.raises(BadInput, match="--slots"):
        grid.SweepConfig(task=TaskSpec(domains=2, slots=2), solver=on, points=1)


def test_acar_losses_are_the_closed_form_of_its_gates(gen):
    """tol 2 gates the router's top-1 slot alone; tol 0 (distinct slots) the top 3 equally: the arm's
    loss is the quadratic loss of exactly those gates."""
    task = make_task(SPEC, [1, 2])
    cfg = an.AnalyticConfig()
    st0 = an.initial_state(task, SPEC, cfg)
    A = st0.A + 0.1 * torch.randn(st0.A.shape, generator=gen, dtype=torch.float64)
    feats = torch.randn(2, SPEC.domains, 5, SPEC.context_dim, generator=gen, dtype=torch.float64)
    G, c, e = an.gram_terms(A, st0.B, task.U.double(), task.V.double(), 0.5)
    logits = (feats @ st0.params["W"][:, None] + st0.params["bias"][:, None, None])      # (S, M, N, K)
    top = logits.topk(3, -1).indices
    for tol, n in ((2.0, 1), (0.0, 3)):
        dom, modes = an._acar_losses(st0.params, A, st0.B, task, feats, 0.5, tol)   # excess: no floor
        gates = torch.zeros_like(logits).scatter_(-1, top[..., :n], 1.0 / n)
        torch.testing.assert_close(dom, an.quadratic_loss(gates, G, c, e).mean(-1))
        assert modes[:, n - 1].tolist() == [SPEC.domains * 5] * 2


# ---------------------------------------------------------------------------------------------
# Statistics and the sweep


def test_acar_summary_pairs_against_grad_and_pools_modes():
    rows = []
    for seed in range(6):
        rows.append({"point": 0, "seed": seed, "arm": "grad", "log_loss": 1.0 + 0.01 * seed})
        rows.append({"point": 0, "seed": seed, "arm": "acar", "log_loss": 1.5 + 0.011 * seed,
                     "mode1": 2, "mode2": 1, "mode3": 1})
    s = acar_summary(pd.DataFrame(rows), ["point"], eps=0.01, alpha=0.05)
    assert list(s.columns) == ["point", *ACAR_SUMMARY]
    r = s.iloc[0]
    assert r["delta_acar"] == pytest.approx(-0.5 - 0.001 * 2.5) and r["acar_regime"] == "degrades"
    assert (r["acar_share1"], r["acar_share2"], r["acar_share3"]) == (0.5, 0.25, 0.25)
    assert r["acar_mean_slots"] == pytest.approx(1.75) and r["acar_saved"] == pytest.approx(1 - 1.75 / 3)


def test_sweep_with_acar_adds_the_arm_its_counts_and_statistics(tmp_path):
    task = TaskSpec(domains=2, slots=3, dim=6, rank=2, true_rank=1, context_dim=4)
    solver = an.AnalyticConfig(steps=20, interval=5, population=4, plasticity=0.0)
    base = dict(task=task, points=2, seeds=(0, 1, 2))
    plain = grid.run_sweep(grid.SweepConfig(solver=solver, **base), tmp_path / "plain", figures=False)
    cfg = grid.SweepConfig(solver=an.AnalyticConfig(**{**solver.__dict__, "acar": True}), **base)
    with_acar = grid.run_sweep(cfg, tmp_path / "acar", figures=False)
    assert "mode1" not in plain.results and "delta_acar" not in plain.summary
    res = with_acar.results
    assert set(res["arm"]) == set(an.ALL_ARMS) and list(res.columns[-5:]) == list(acar.USAGE_COLUMNS)
    a = res[res["arm"] == "acar"]
    assert (a[["mode1", "mode2", "mode3"]].sum(axis=1) == task.domains).all()
    assert res[res["arm"] != "acar"]["mode1"].isna().all()
    # the four arms are the plain map's, and so are its statistics
    keep = [c for c in plain.results.columns if c != "wall_s"]
    pd.testing.assert_frame_equal(res[res["arm"] != "acar"][keep].reset_index(drop=True), plain.results[keep])
    pd.testing.assert_frame_equal(with_acar.summary[plain.summary.columns], plain.summary)
    assert set(ACAR_SUMMARY) <= set(with_acar.summary.columns)
    again = grid.run_sweep(cfg, tmp_path / "acar", figures=False)          # resumes: nothing recomputed
    assert again.computed == 0
    pd.testing.assert_frame_equal(again.results.drop(columns="wall_s"), res.drop(columns="wall_s"))


@pytest.mark.parametrize("args, flag", [(["--router", "acar"], "--router"), (["--acar", "--acar-tol", "nan"], "--acar-tol"),
                                        (["--acar", "--slots", "2", "--domains", "2"], "--slots")])
def test_cli_bad_acar_input_is_one_line_exit_2(args, flag, capsys, tmp_path):
    code = main(["sweep", "--out", str(tmp_path / "x"), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and flag in err and "Traceback" not in err
