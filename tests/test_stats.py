"""The statistics module against scipy/statsmodels, Monte Carlo, loops, and its own edge-case rules."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestPower
from statsmodels.stats.weightstats import ttost_paired

from sandbox.errors import BadInput
from sandbox.stats import (
    ATTRIBUTION_COLUMNS,
    SUMMARY_STATS,
    attribution,
    balanced_log_ppl,
    bootstrap_ci,
    classify,
    decompose,
    holm,
    label_point,
    paired,
    power_tost,
    seeds_needed,
    summarize,
    t_to_p,
)
from sandbox.stats import _power_t_integral

TOL = 1e-10


def _random_pairs(rng, n):
    ref = rng.normal(rng.uniform(-1, 1), rng.uniform(0.01, 2), size=n)
    test = ref - rng.normal(rng.uniform(-0.5, 0.5), rng.uniform(0.01, 1), size=n)
    return ref, test


# ---------------------------------------------------------------------------------------------
# paired t, CI, TOST, d_z against scipy / statsmodels


@pytest.mark.parametrize("case", range(40))
def test_paired_matches_scipy_and_statsmodels(case):
    rng = np.random.default_rng(case)
    n = int(rng.integers(2, 40))
    ref, test = _random_pairs(rng, n)
    eps = float(rng.uniform(0.01, 1.0))
    pr = paired(ref, test, eps=eps, alpha=0.05, n_boot=200, seed=case)

    res = sps.ttest_rel(ref, test)
    ci = res.confidence_interval(0.95)
    assert pr.n == n and pr.n_diverged == 0 and pr.df == n - 1
    assert pr.t == pytest.approx(res.statistic, rel=TOL, abs=TOL)
    assert abs(pr.p - res.pvalue) < TOL
    assert abs(pr.ci_low - ci.low) < TOL and abs(pr.ci_high - ci.high) < TOL
    d = ref - test
    assert abs(pr.mean - d.mean()) < TOL and abs(pr.se - sps.sem(d)) < TOL
    assert pr.d_z == pytest.approx(d.mean() / d.std(ddof=1), rel=TOL)

    p_tost, (_, p1, _), (_, p2, _) = ttost_paired(ref, test, -eps, eps)
    assert abs(pr.p_tost - p_tost) < TOL
    assert abs(pr.p_tost - max(p1, p2)) < TOL


@given(st.lists(st.floats(-5, 5), min_size=3, max_size=12), st.floats(0.05, 0.5), st.floats(0.01, 2))
def test_paired_tost_hypothesis(deltas, alpha, eps):
    d = np.asarray(deltas)
    if np.ptp(d) < 1e-6:  # zero-variance inputs have their own rule (tested below)
        return
    ref = np.linspace(0, 1, d.size)
    test = ref - d
    pr = paired(ref, test, eps=eps, alpha=alpha, n_boot=50)
    p_tost = ttost_paired(ref, test, -eps, eps)[0]
    assert abs(pr.p_tost - p_tost) < TOL
    assert abs(pr.p - sps.ttest_rel(ref, test).pvalue) < TOL
    # TOST at alpha <=> the (1 - 2 alpha) CI lies inside the margin
    half = sps.t.isf(alpha, d.size - 1) * pr.se
    assert (pr.p_tost < alpha) == (-eps < pr.mean - half and pr.mean + half < eps)


@pytest.mark.parametrize("deltas", [
    [0.0, 4.885e-230],            # found by hypothesis: the squared spread underflows to 0
    [0.0, 5e-324],                # the smallest subnormal
    [1e-200, -1e-200, 3e-200],
    [2e-160, 2.5e-160, 1e-160, 4e-160],
])
def test_paired_tiny_deltas_never_divide_by_zero(deltas):
    d = np.asarray(deltas)
    pr = paired(d, np.zeros(d.size), eps=1.0, n_boot=50)
    assert math.isfinite(pr.t) and math.isfinite(pr.d_z) and 0 <= pr.p <= 1 and 0 <= pr.p_tost <= 1
    # every ratio is scale-free: the same deltas times 1e200 (or the smallest case rescaled) agree
    unit = d / np.abs(d).max()
    big = paired(unit, np.zeros(d.size), eps=1e300, n_boot=50)
    assert pr.t == pytest.approx(big.t, rel=1e-12) and pr.d_z == pytest.approx(big.d_z, rel=1e-12)
    assert pr.t == pytest.approx(sps.ttest_1samp(unit, 0).statistic, rel=1e-12)
    assert pr.p_tost < 0.05  # all of them lie far inside the margin


def test_t_to_p_reproduces_the_study_n3():
    # n = 3 seeds, df = 2: router, full-vs-B3 and lifecycle as reported (rounded as reported)
    assert round(float(t_to_p(12.86, 2)), 3) == 0.006
    assert round(float(t_to_p(1.94, 2)), 2) == 0.19
    assert round(float(t_to_p(-4.46, 2)), 3) == 0.047
    # the path `paired` takes: a 3-seed delta with t = 12.86 gets the same p
    d = np.array([0.0400, 0.0426, 0.0452])
    d = d.mean() + (d - d.mean()) * (d.mean() / (12.86 * d.std(ddof=1) / math.sqrt(3)))
    pr = paired(d, np.zeros(3), eps=0.01)
    assert pr.t == pytest.approx(12.86, rel=1e-12) and round(pr.p, 3) == 0.006


def test_diverged_pairs_are_counted_and_dropped():
    ref = np.array([1.0, 2.0, np.nan, 4.0, 5.0, np.inf])
    test = np.array([0.5, np.nan, 3.0, 3.1, 4.7, 1.0])
    pr = paired(ref, test, eps=0.1)
    ok = [0, 3, 4]
    clean = paired(ref[ok], test[ok], eps=0.1)
    assert (pr.n, pr.n_diverged, pr.diverged_reference, pr.diverged_test) == (3, 3, 2, 1)
    assert pr.mean == clean.mean and pr.p == clean.p and pr.ci_low == clean.ci_low


def test_bad_margin_and_alpha_name_the_flag():
    with pytest.raises(BadInput, match="--eps"):
        paired([1, 2], [1, 2], eps=0.0)
    with pytest.raises(BadInput, match="--alpha"):
        paired([1, 2], [1, 2], eps=0.1, alpha=1.5)


# ---------------------------------------------------------------------------------------------
# bootstrap, Holm


def test_bootstrap_matches_a_loop_and_scipy():
    rng = np.random.default_rng(7)
    d = rng.normal(0.1, 0.3, size=15)
    low, high = bootstrap_ci(d, 0.05, n_boot=2000, seed=3)
    g = np.random.default_rng(3)
    means = [d[g.integers(0, d.size, size=d.size)].mean() for _ in range(2000)]  # loop oracle
    assert (low, high) == tuple(np.quantile(means, [0.025, 0.975]))
    assert bootstrap_ci(d, 0.05, 2000, seed=3) == (low, high)  # seeded: reproducible
    ref = sps.bootstrap((d,), np.mean, method="percentile", n_resamples=20000, rng=np.random.default_rng(0))
    big = bootstrap_ci(d, 0.05, 20000, seed=1)
    assert abs(big[0] - ref.confidence_interval.low) < 0.02
    assert abs(big[1] - ref.confidence_interval.high) < 0.02


@pytest.mark.parametrize("case", range(25))
def test_holm_matches_statsmodels_with_nan(case):
    rng = np.random.default_rng(100 + case)
    m = int(rng.integers(1, 30))
    p = rng.uniform(0, 1, size=m) ** rng.uniform(1, 6)
    if m > 3:
        p[rng.integers(0, m, size=2)] = p[0]  # ties
    nan_at = rng.random(m) < 0.2
    p_in = np.where(nan_at, np.nan, p)
    out = holm(p_in)
    assert out.shape == p_in.shape and np.array_equal(np.isnan(out), nan_at)
    if (~nan_at).any():
        ref = multipletests(p[~nan_at], method="holm")[1]
        np.testing.assert_allclose(out[~nan_at], ref, rtol=0, atol=TOL)
    assert holm(p_in.reshape(1, -1)).shape == (1, m)


# ---------------------------------------------------------------------------------------------
# power and seeds needed


@pytest.mark.parametrize("d", [0.1, 0.3, 0.5, 0.8, 1.2, 2.5, -0.7, 7.47])
def test_paired_t_power_matches_statsmodels(d):
    """The power `seeds_needed` uses (an integral over the sample SD) against statsmodels' noncentral t."""
    ns = np.arange(2, 60)
    ours = np.array([_power_t_integral(d, 1.0, int(n), 0.05) for n in ns])
    ref = TTestPower().power(effect_size=d, nobs=ns, alpha=0.05, alternative="two-sided")
    ok = np.isfinite(ref)  # scipy's nct gives NaN for some large nc at small df; statsmodels inherits it
    np.testing.assert_allclose(ours[ok], ref[ok], rtol=0, atol=TOL)
    assert np.isfinite(ours).all()


def test_paired_t_power_where_scipy_fails_against_monte_carlo():
    rng = np.random.default_rng(2)
    x = rng.normal(7.47, 1.0, size=(100000, 2))  # (R, n)
    t = x.mean(1) / (x.std(1, ddof=1) / math.sqrt(2))
    mc = (np.abs(t) > sps.t.isf(0.025, 1)).mean()
    exact = _power_t_integral(7.47, 1.0, 2, 0.05)
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / 1e5)


# statsmodels' solver fails to converge (NaN) at the study's router effect size, d = 7.5
@pytest.mark.parametrize("mean,sd,statsmodels_solves", [(0.05, 0.1, True), (0.03, 0.02, True), (-0.2, 0.5, True),
                                                         (0.015, 0.0134, True), (0.0426, 0.0057, False)])
def test_seeds_needed_is_the_smallest_n_with_power(mean, sd, statsmodels_solves):
    n, why = seeds_needed(mean, sd, eps=0.01)
    assert n is not None and "paired t test" in why
    assert _power_t_integral(mean, sd, n, 0.05) >= 0.8
    if n > 2:
        assert _power_t_integral(mean, sd, n - 1, 0.05) < 0.8
    if statsmodels_solves:
        sm = TTestPower().solve_power(effect_size=abs(mean) / sd, alpha=0.05, power=0.8)
        assert n == max(2, math.ceil(sm - 1e-9))


def test_power_tost_against_monte_carlo():
    rng = np.random.default_rng(11)
    R = 40000
    for mu, sd, n, eps in [(0.01, 0.05, 8, 0.05), (0.0, 0.1, 20, 0.05), (-0.02, 0.03, 5, 0.06), (0.03, 0.02, 30, 0.04)]:
        x = rng.normal(mu, sd, size=(R, n))  # (R, n)
        m, se = x.mean(1), x.std(1, ddof=1) / math.sqrt(n)
        c = sps.t.isf(0.05, n - 1)
        mc = (((m + eps) / se > c) & ((m - eps) / se < -c)).mean()
        exact = power_tost(mu, sd, n, eps)
        assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / R) + 1e-3
        # the usual shifted-noncentral-t approximation is a lower bound
        df = n - 1
        approx = sps.nct.sf(c, df, (mu + eps) / sd * math.sqrt(n)) + sps.nct.cdf(-c, df, (mu - eps) / sd * math.sqrt(n)) - 1
        assert approx <= exact + 1e-9


def test_seeds_needed_accounts_for_the_holm_family():
    one, _ = seeds_needed(0.05, 0.05, eps=0.01)
    many, why = seeds_needed(0.05, 0.05, eps=0.01, n_tests=100)
    assert many > one and "Holm over 100" in why
    assert _power_t_integral(0.05, 0.05, many, 0.05 / 100) >= 0.8 > _power_t_integral(0.05, 0.05, many - 1, 0.05 / 100)


def test_docstring_example_runs():
    import doctest

    import sandbox.stats

    assert doctest.testmod(sandbox.stats).failed == 0


def test_tost_seeds_needed_and_unreachable():
    n, why = seeds_needed(0.01, 0.05, eps=0.05)
    assert "TOST" in why and power_tost(0.01, 0.05, n, 0.05) >= 0.8 > power_tost(0.01, 0.05, n - 1, 0.05)
    n, why = seeds_needed(0.0499, 0.05, eps=0.05)  # at the margin: needs ~6e4 seeds
    assert n is None and "does not reach" in why
    n, why = seeds_needed(2e-8, 1.0, eps=1e-8)  # difference test at a mean of ~0
    assert n is None and "paired t test" in why


# ---------------------------------------------------------------------------------------------
# regimes


def _fixed(mean, sd, n):
    """n deltas with exactly this sample mean and SD."""
    z = np.linspace(-1, 1, n)
    z = (z - z.mean()) / z.std(ddof=1)
    return mean + sd * z


@pytest.mark.parametrize("mean,sd,n,eps,regime", [
    (0.3, 0.1, 5, 0.05, "beats"),
    (-0.3, 0.1, 5, 0.05, "degrades"),
    (0.001, 0.01, 30, 0.05, "ties"),
    (0.02, 0.2, 4, 0.05, "inconclusive"),
])
def test_classify_regimes(mean, sd, n, eps, regime):
    d = _fixed(mean, sd, n)
    pr = paired(d, np.zeros(n), eps=eps)
    got, reason, need = classify(pr, pr.p)
    assert got == regime and reason
    if regime == "inconclusive":
        assert isinstance(need, int) and need > n and "seeds" in reason
    else:
        assert need is None
    if regime == "ties":
        assert -eps < pr.ci_low and pr.ci_high < eps and pr.p_tost < 0.05


def test_not_significant_is_not_a_tie():
    # the study's full-vs-B3 shape: +0.015, t = 1.94, n = 3: not significant and no equivalence
    d = _fixed(0.015, 0.015 * math.sqrt(3) / 1.94, 3)
    pr = paired(d, np.zeros(3), eps=0.01)
    regime, reason, need = classify(pr, pr.p)
    assert round(pr.p, 2) == 0.19 and regime == "inconclusive" and need is not None and need > 3


def test_holm_can_turn_beats_into_inconclusive():
    d = _fixed(0.1, 0.05, 6)
    pr = paired(d, np.zeros(6), eps=0.01)
    assert pr.p < 0.05 and classify(pr, pr.p)[0] == "beats"
    assert classify(pr, min(1.0, 20 * pr.p))[0] == "inconclusive"


def test_significant_inside_margin_says_so():
    d = _fixed(0.005, 0.001, 20)
    pr = paired(d, np.zeros(20), eps=0.05)
    regime, reason, _ = classify(pr, pr.p)
    assert regime == "beats<eps" and "< eps 0.05" in reason
    regime, _, _ = classify(paired(-d, np.zeros(20), eps=0.05), pr.p)
    assert regime == "degrades<eps"


def test_a_gain_of_3e_10_is_not_beats():
    d = _fixed(3e-10, 1e-10, 10)
    pr = paired(d, np.zeros(10), eps=0.01)
    assert pr.p < 1e-5 and classify(pr, pr.p)[0] == "beats<eps"


# Each label of `label_point`, and its precedence.
def test_label_inert_wins_over_everything():
    assert label_point("beats", "r", acted=False, room_high=1.0, eps=0.01)[0] == "inert"
    assert label_point("ties", "r", acted=False, room_high=0.0, eps=0.01)[0] == "inert"
    assert label_point("beats", "r", acted=None, room_high=1.0, eps=0.01)[0] == "beats"   # unknown: not inert


@pytest.mark.parametrize("regime", ["beats", "degrades"])
def test_label_effects_beyond_eps_win_over_no_room(regime):
    assert label_point(regime, "r", acted=True, room_high=0.001, eps=0.01) == (regime, "r")


def test_label_no_room_never_hides_a_significant_degradation():
    assert label_point("degrades<eps", "r", acted=True, room_high=0.004, eps=0.01)[0] == "degrades<eps"


@pytest.mark.parametrize("regime", ["beats<eps", "ties", "inconclusive"])
def test_label_no_room_replaces_small_and_null_results(regime):
    label, reason = label_point(regime, "r", acted=True, room_high=0.004, eps=0.01)
    assert label == "no-room" and "0.004" in reason
    assert label_point(regime, "r", acted=True, room_high=0.02, eps=0.01)[0] == regime       # room above eps
    assert label_point(regime, "r", acted=True, room_high=float("nan"), eps=0.01)[0] == regime  # no oracle arm


def _decomp_table(deltas_evo, deltas_restart, rooms, accepted):
    rows = []
    for point, (de, dr, ro, ac) in enumerate(zip(deltas_evo, deltas_restart, rooms, accepted)):
        for seed in range(len(de)):
            base = 1.0 + 0.1 * seed
            rows += [dict(point=point, seed=seed, arm="grad", log_loss=base),
                     dict(point=point, seed=seed, arm="evo", log_loss=base - de[seed], accepted=ac[seed],
                          lifecycle_events=0),
                     dict(point=point, seed=seed, arm="restart", log_loss=base - dr[seed]),
                     dict(point=point, seed=seed, arm="oracle", log_loss=base - ro[seed])]
    return pd.DataFrame(rows)


def test_decompose_columns_labels_and_scipy():
    rng = np.random.default_rng(0)
    n = 8
    evo = [np.zeros(n), 0.05 + 0.01 * rng.standard_normal(n), 0.002 + 0.0005 * rng.standard_normal(n)]
    rst = [0.01 * rng.standard_normal(n) for _ in range(3)]
    room = [np.abs(0.001 * rng.standard_normal(n)), 0.08 + 0.01 * rng.standard_normal(n),
            0.003 + 0.0005 * rng.standard_normal(n)]
    acc = [np.zeros(n), np.full(n, 0.5), np.full(n, 0.2)]
    out = decompose(_decomp_table(evo, rst, room, acc), by=["point"], eps=0.01, n_boot=50)
    assert out["regime"].tolist() == ["inert", "beats", "no-room"]
    assert out["accepted"].tolist() == pytest.approx([0.0, 0.5, 0.2])
    assert out["accepted_seeds"].tolist() == [0, n, n]
    for i in range(3):
        assert out.loc[i, "delta_restart"] == pytest.approx(rst[i].mean(), abs=1e-12)
        assert out.loc[i, "room"] == pytest.approx(room[i].mean(), abs=1e-12)
        ci = sps.ttest_1samp(room[i], 0).confidence_interval()
        assert out.loc[i, "room_ci_high"] == pytest.approx(ci.high, abs=1e-10)
    # Holm per contrast over the points
    p_restart = [sps.ttest_1samp(r, 0).pvalue for r in rst]
    assert out["restart_p_holm"].to_numpy() == pytest.approx(multipletests(p_restart, method="holm")[1], abs=1e-12)
    assert out["seeds_needed"].isna().all()
    # without the control arms the decomposition columns are NaN and no-room is never applied
    plain = _decomp_table(evo, rst, room, acc)
    out2 = decompose(plain[plain.arm.isin(["grad", "evo"])], by=["point"], eps=0.01, n_boot=50)
    assert out2["room"].isna().all() and out2["regime"].tolist()[:2] == ["inert", "beats"]
    assert out2["regime"][2] == "beats<eps"


@pytest.mark.parametrize("ref,test,regime,needle", [
    ([np.nan, np.nan], [1.0, 2.0], "inconclusive", "all runs diverged"),
    ([], [], "inconclusive", "no paired seeds"),
    ([1.0, np.inf], [0.5, 0.2], "inconclusive", "one seed: no variance estimate"),
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "ties", "zero variance"),
    ([1.2, 2.2, 3.2], [1.0, 2.0, 3.0], "beats", "zero variance, all seeds agree"),
    ([1.0, 2.0, 3.0], [1.5, 2.5, 3.5], "degrades", "zero variance, all seeds agree"),
    ([1.004, 2.004], [1.0, 2.0], "beats<eps", "zero variance, all seeds agree"),
])
def test_edge_cases_have_a_reason(ref, test, regime, needle):
    ref, test = np.asarray(ref, float), np.asarray(test, float)  # 1.2 - 1.0 != 2.2 - 2.0 in floats
    pr = paired(ref, test, eps=0.01)
    got, reason, need = classify(pr, holm([pr.p])[0])
    assert got == regime and needle in reason and need is None


@given(st.lists(st.one_of(st.floats(-3, 3), st.just(math.nan), st.just(math.inf)), min_size=0, max_size=8),
       st.floats(1e-3, 1.0))
def test_classify_never_nan_or_crash(deltas, eps):
    d = np.asarray(deltas, dtype=float)
    pr = paired(d, np.zeros(d.size), eps=eps, n_boot=50)
    regime, reason, need = classify(pr, float(holm([pr.p])[0]))
    assert regime in ("beats", "beats<eps", "ties", "degrades", "degrades<eps", "inconclusive") and reason
    assert "nan" not in reason.lower()
    assert need is None or (isinstance(need, int) and need >= 2)
    assert pr.n + pr.n_diverged == d.size


# ---------------------------------------------------------------------------------------------
# balanced metric vs the arithmetic mean of PPLs


def test_balanced_log_ppl_shapes_loop_and_torch():
    rng = np.random.default_rng(0)
    tok = rng.integers(1, 500, size=(3, 4, 5))   # (S, P, M)
    nll = rng.uniform(0.5, 4, size=(3, 4, 5)) * tok
    out = balanced_log_ppl(nll, tok)             # (S, P)
    loop = np.array([[np.mean([nll[s, p, m] / tok[s, p, m] for m in range(5)]) for p in range(4)] for s in range(3)])
    np.testing.assert_allclose(out, loop, rtol=1e-14)
    tt = balanced_log_ppl(torch.tensor(nll), torch.tensor(tok))
    assert isinstance(tt, torch.Tensor) and tt.shape == (3, 4)
    np.testing.assert_allclose(tt.numpy(), loop, rtol=1e-12)
    with pytest.raises(ValueError):
        balanced_log_ppl([[1.0, 2.0]], [[1, 0]])


def test_arithmetic_mean_of_ppls_and_balanced_disagree_in_sign():
    # two domains, three seeds; the test arm is much better on domain 0, a bit worse on domain 1
    tokens = np.full((3, 2), 1000)
    ref_nll = np.array([[2.0, 2.0], [2.05, 1.98], [1.97, 2.03]]) * tokens   # (S, M) per-domain NLL sums
    test_nll = np.array([[1.5, 2.4], [1.55, 2.38], [1.45, 2.45]]) * tokens
    ref_log, test_log = balanced_log_ppl(ref_nll, tokens), balanced_log_ppl(test_nll, tokens)  # (S,)

    # the wrong aggregator: arithmetic mean of per-domain PPLs, then of seeds
    mean_ppl_ref = np.exp(ref_nll / tokens).mean()
    mean_ppl_test = np.exp(test_nll / tokens).mean()
    assert mean_ppl_test > mean_ppl_ref               # says: the test arm is worse

    pr = paired(ref_log, test_log, eps=0.01)
    assert pr.mean > 0 and (ref_log - test_log > 0).all()   # balanced log: the test arm is better
    regime, _, _ = classify(pr, pr.p)
    assert regime == "beats"


def test_token_weighting_can_flip_the_sign():
    tokens = np.array([[9000, 100], [9000, 100]])           # domain 0 dominates the pool
    nll = np.array([[2.0, 3.0], [2.01, 2.5]]) * tokens        # arm 1: slightly worse on 0, far better on 1
    bal = balanced_log_ppl(nll, tokens)
    pooled = nll.sum(-1) / tokens.sum(-1)                     # token-weighted (pooled): not the study's metric
    assert bal[0] - bal[1] > 0 > pooled[0] - pooled[1]


# ---------------------------------------------------------------------------------------------
# summarize


def _results_table(rng, points, seeds=(0, 1, 2, 3, 4, 5)):
    rows = []
    for point, (align, effect, noise) in enumerate(points):
        for s in seeds:
            base = rng.normal(0, 0.3)
            rows.append(dict(point=point, alignment=align, seed=s, arm="grad", log_loss=base, diverged=False))
            rows.append(dict(point=point, alignment=align, seed=s, arm="evo",
                             log_loss=base - effect + rng.normal(0, noise), diverged=False))
    return pd.DataFrame(rows)


def test_summarize_pairs_by_seed_and_holm_over_all_points():
    rng = np.random.default_rng(5)
    df = _results_table(rng, [(0.0, -0.3, 0.02), (0.5, 0.0, 0.005), (1.0, 0.3, 0.02), (0.25, 0.05, 0.1)])
    df = df.sample(frac=1.0, random_state=0)  # row order must not matter
    df.loc[(df.point == 2) & (df.seed == 1) & (df.arm == "evo"), "diverged"] = True
    out = summarize(df, ["point", "alignment"], eps=0.05, n_boot=500)
    assert list(out.columns) == ["point", "alignment", *SUMMARY_STATS]
    assert list(out.point) == [0, 1, 2, 3]
    raw = []
    for _, r in out.iterrows():
        g = df[df.point == r.point]
        ref = g[g.arm == "grad"].set_index("seed").log_loss.sort_index()
        tst = g[g.arm == "evo"].set_index("seed").log_loss.sort_index()
        tst = tst.where(~g[g.arm == "evo"].set_index("seed").diverged.sort_index().astype(bool))
        pr = paired(ref.to_numpy(), tst.to_numpy(), eps=0.05, n_boot=500)
        assert r.n == pr.n and r.n_diverged == pr.n_diverged and r.t == pytest.approx(pr.t, rel=1e-12)
        raw.append(pr.p)
    np.testing.assert_allclose(out.p_holm, multipletests(raw, method="holm")[1], atol=TOL)
    assert list(out.regime) == ["degrades", "ties", "beats", "inconclusive"]
    assert out.n_diverged.tolist() == [0, 0, 1, 0] and "diverged" in out.reason[2]
    assert pd.isna(out.seeds_needed[0]) and int(out.seeds_needed[3]) > 6


def test_summarize_unpaired_and_bad_tables():
    rng = np.random.default_rng(6)
    df = _results_table(rng, [(0.0, 0.3, 0.02)])
    df = df[~((df.seed == 3) & (df.arm == "evo"))]
    out = summarize(df, ["point"], eps=0.05, n_boot=100)
    assert out.n[0] == 5 and out.n_diverged[0] == 0 and "only one arm" in out.reason[0]
    with pytest.raises(BadInput, match="test_arm"):
        summarize(df, ["point"], test_arm="evolution")
    with pytest.raises(BadInput, match="one row per"):
        summarize(pd.concat([df, df.iloc[:1]]), ["point"])
    with pytest.raises(BadInput, match="log_loss"):
        summarize(df.drop(columns="log_loss"), ["point"])


# ---------------------------------------------------------------------------------------------
# attribution


def _cells_table(rng, seeds=(42, 137, 2026), spellings=("B3", "R", "R+E", "L+R", "R+E+L")):
    effects = {"B3": 0.0, "R": 0.0426, "R+E": 0.0426, "L+R": 0.02, "R+E+L": 0.0146}
    rows = []
    for s in seeds:
        base = 3.0 + rng.normal(0, 0.05)
        for name in spellings:
            rows.append(dict(cell=name, seed=s, balanced_log_ppl=base - effects[name] + rng.normal(0, 0.003),
                             diverged=False))
    return pd.DataFrame(rows)


def test_attribution_named_contrasts_chain_and_gap():
    rng = np.random.default_rng(9)
    t = _cells_table(rng)
    out = attribution(t, eps=0.01, n_boot=200)
    assert list(out.columns) == list(ATTRIBUTION_COLUMNS)
    named = out[out.kind == "named"].set_index("contrast")
    assert set(named.index) == {"router", "scope", "lifecycle", "lifecycle_global", "system"}
    v = t.pivot(index="seed", columns="cell", values="balanced_log_ppl")
    for name, ref, trt in [("router", "B3", "R"), ("lifecycle_global", "R", "L+R"), ("system", "B3", "R+E+L")]:
        res = sps.ttest_rel(v[ref], v[trt])
        assert named.loc[name, "t"] == pytest.approx(res.statistic, rel=1e-10)
        assert abs(named.loc[name, "p"] - res.pvalue) < TOL
        assert named.loc[name, "mean_delta"] == pytest.approx((v[ref] - v[trt]).mean(), rel=1e-12)
    assert named.loc["lifecycle_global", "treated"] == "R+L"
    chain = out[out.kind == "chain_sum"].iloc[0]
    step_sum = sum(named.loc[k, "mean_delta"] for k in ("router", "scope", "lifecycle"))
    assert chain.mean_delta == pytest.approx(step_sum, abs=1e-12)
    assert chain.mean_delta == pytest.approx(named.loc["system", "mean_delta"], abs=1e-12)
    gap = out[out.kind == "chain_gap"].iloc[0]
    assert abs(gap.mean_delta) < 1e-12 and "identical seeds" in gap.note


def test_attribution_gap_from_a_diverged_seed():
    rng = np.random.default_rng(10)
    t = _cells_table(rng, seeds=(1, 2, 3, 4))
    t.loc[(t.cell == "R+E") & (t.seed == 2), "diverged"] = True
    out = attribution(t, eps=0.01, n_boot=100).set_index("contrast")
    assert out.loc["scope", "n"] == 3 and out.loc["scope", "n_diverged"] == 1
    assert out.loc["system", "n"] == 4 and out.loc["chain_sum", "n"] == 3 and out.loc["chain_sum", "n_diverged"] == 1
    gap = out.loc["chain_sum - system"]
    assert gap.mean_delta == pytest.approx(out.loc["chain_sum", "mean_delta"] - out.loc["system", "mean_delta"])
    assert abs(gap.mean_delta) > 1e-6 and "different seed sets" in gap.note


def test_attribution_partial_cells_and_bad_input():
    rng = np.random.default_rng(12)
    t = _cells_table(rng, spellings=("B3", "R"))
    out = attribution(t, n_boot=50)
    assert list(out.contrast) == ["router"]
    bad = t.assign(cell=["B3", "X"] * 3)
    with pytest.raises(BadInput, match="cell"):
        attribution(bad)
    with pytest.raises(BadInput, match="one row per"):
        attribution(pd.concat([t, t.iloc[:1].assign(cell="b3")]))


def test_attribution_reproduces_the_study_table():
    # per-seed deltas with the study's means and t values (n = 3): router +0.0426 (t = 12.86),
    # lifecycle -0.028 (t = -4.46), system +0.015 (t = 1.94); scope is whatever closes the chain
    def with_t(mean, t, pattern):
        z = (pattern - pattern.mean()) / pattern.std(ddof=1)
        return mean + z * abs(mean) * math.sqrt(3) / abs(t)

    d_r = with_t(0.0426, 12.86, np.array([0.0, 1.0, 3.0]))
    d_l = with_t(-0.028, -4.46, np.array([2.0, 0.0, 1.0]))
    d_full = with_t(0.015, 1.94, np.array([0.0, 2.0, 1.0]))
    d_e = d_full - d_r - d_l
    b3 = np.array([3.10, 3.05, 3.12])
    r = b3 - d_r
    re = r - d_e
    rel = re - d_l
    t = pd.DataFrame([dict(cell=c, seed=s, balanced_log_ppl=v[i])
                      for c, v in (("B3", b3), ("R", r), ("R+E", re), ("R+E+L", rel)) for i, s in enumerate((42, 137, 2026))])
    out = attribution(t, eps=0.01, n_boot=100).set_index("contrast")
    assert out.loc["router", "t"] == pytest.approx(12.86) and round(out.loc["router", "p"], 3) == 0.006
    assert out.loc["lifecycle", "t"] == pytest.approx(-4.46) and round(out.loc["lifecycle", "p"], 3) == 0.047
    assert out.loc["system", "t"] == pytest.approx(1.94) and round(out.loc["system", "p"], 2) == 0.19
    assert out.loc["scope", "mean_delta"] == pytest.approx(0.015 - 0.0426 + 0.028, abs=1e-12)
    assert out.loc["chain_sum", "mean_delta"] == pytest.approx(0.015, abs=1e-12)
    assert abs(out.loc["chain_sum - system", "mean_delta"]) < 1e-12
