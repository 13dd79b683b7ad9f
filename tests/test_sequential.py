"""The group-sequential design of `sandbox factorial --seeds-to-resolve`: boundaries against the
literature and a Brownian Monte Carlo, and the error rates of the whole procedure (paired t tests on
3..12 seeds, Holm with recycling over 5 contrasts, 4 looks) by simulation under the null."""

import math

import numpy as np
import pytest
from scipy import stats

from sandbox.errors import BadInput
from sandbox.sequential import boundaries, combined_z, decide, look_schedule, sequential_holm, spent, stage_z

LOOKS = [3, 6, 9, 12]          # seeds at each look: start 3, rounds of 3, at most 12
ALPHA = 0.05


def test_pocock_boundaries_match_the_published_lan_demets_values():
    # Lan-DeMets Pocock-type spending, 5 equally spaced looks, two-sided alpha 0.05 (e.g. gsDesign sfLDPocock).
    c = boundaries([0.2, 0.4, 0.6, 0.8, 1.0], 0.05, "pocock")
    np.testing.assert_allclose(c, [2.4380, 2.4268, 2.4101, 2.3966, 2.3859], atol=2e-3)
    assert boundaries([1.0], 0.05)[0] == pytest.approx(stats.norm.isf(0.025), abs=1e-9)  # one look: the fixed test


@pytest.mark.parametrize("kind", ["obf", "pocock"])
def test_boundaries_spend_alpha_as_planned_under_brownian_motion(kind):
    fr = np.array([0.25, 0.5, 0.8, 1.0])
    c = boundaries(fr, ALPHA, kind)
    rng = np.random.default_rng(7)
    R = 200_000
    W = (rng.standard_normal((R, fr.size)) * np.sqrt(np.diff(np.r_[0, fr]))).cumsum(1)   # (R, K)
    cross = np.abs(W / np.sqrt(fr)) >= c
    first = np.where(cross.any(1), cross.argmax(1), -1)
    for k in range(fr.size):   # the level spent at each look, not just in total
        target = spent(fr[k], ALPHA, kind) - (spent(fr[k - 1], ALPHA, kind) if k else 0.0)
        se = math.sqrt(target * (1 - target) / R)
        assert abs((first == k).mean() - target) < 4 * se + 1e-4


@pytest.mark.parametrize("kind", ["obf", "pocock"])
def test_familywise_error_under_the_null_stays_at_alpha(kind):
    """5 null contrasts, looks at 3, 6, 9, 12 seeds (stage t tests on 3 seeds each, inverse-normal
    combination), Holm with recycling: the chance of ANY beats/degrades at ANY look is <= alpha
    within Monte Carlo error, and not vacuously small (the design spends its level)."""
    R, m = 20_000, 5
    rng = np.random.default_rng(2026)
    delta = rng.standard_normal((R, LOOKS[-1], m)) * rng.uniform(0.001, 10, (R, 1, m))   # any spread
    Z = combined_z(stage_z(delta, LOOKS), LOOKS)                                          # (R, K, m)
    at, _ = sequential_holm(2 * stats.norm.sf(np.abs(Z)), [n / LOOKS[-1] for n in LOOKS], ALPHA, kind)
    fwer = float((at >= 0).any(-1).mean())
    se = math.sqrt(ALPHA * (1 - ALPHA) / R)
    assert fwer <= ALPHA + 3 * se, fwer
    assert fwer > ALPHA - 6 * se, fwer


def test_equivalence_error_at_the_margin_stays_at_alpha():
    """True delta exactly at the margin (+eps): declaring `ties` at any look is the error; <= alpha."""
    R, eps = 20_000, 0.8
    rng = np.random.default_rng(11)
    delta = eps + rng.standard_normal((R, LOOKS[-1], 1))
    z_low = combined_z(stage_z(delta, LOOKS, eps), LOOKS)
    z_upp = -combined_z(stage_z(delta, LOOKS, -eps), LOOKS)
    c = boundaries([n / LOOKS[-1] for n in LOOKS], 2 * ALPHA)
    err = float((np.minimum(z_low, z_upp)[..., 0] >= c).any(-1).mean())
    assert err <= ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / R), err


def test_stage_z_is_the_t_tail_and_handles_degenerate_stages():
    d = np.array([[0.3], [0.1], [0.5], [np.nan], [0.0], [0.0], [0.0], [0.0]])
    z = stage_z(d, [3, 5, 8])[:, 0]
    t = 0.3 / (0.2 / math.sqrt(3))
    assert z[0] == pytest.approx(stats.norm.isf(stats.t.sf(t, 2)), rel=1e-9)
    assert z[1] == 0.0 and z[2] == 0.0           # one finite delta: no information; all zero: 0
    Z = combined_z(np.array([[1.0], [2.0]]), [4, 9])
    assert Z[1, 0] == pytest.approx((2 * 1 + math.sqrt(5) * 2) / 3)


def test_decide_classifies_and_keeps_verdicts():
    rng = np.random.default_rng(3)
    delta = np.stack([0.05 + 0.002 * rng.standard_normal(12),       # a clear gain
                      np.zeros(12),                                 # exactly zero every seed (scope without L)
                      0.02 * rng.standard_normal(12)], 1)           # unclear at this margin
    dec, rows = decide(delta[:9], ["router", "scope", "lifecycle"], [3, 6, 9], 12, ALPHA, eps=0.01)
    by = {d.contrast: d for d in dec}
    assert by["scope"].regime == "ties" and by["scope"].look == 1
    assert by["router"].regime == "beats" and by["router"].look >= 1
    assert by["lifecycle"].regime == "inconclusive" and "not classified" in by["lifecycle"].reason
    assert len(rows) == 9 and {r["look"] for r in rows} == {1, 2, 3}
    with pytest.raises(BadInput, match="--seeds-to-resolve"):
        decide(delta, ["a", "b", "c"], [3], 1, ALPHA, 0.01)


def test_look_schedule():
    assert look_schedule(3, 12, 3) == [3, 6, 9, 12]
    assert look_schedule(3, 10, 4) == [3, 7, 10]
    assert look_schedule(5, 3, 2) == [5]
