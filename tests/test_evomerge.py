"""EvoMerge operators of the shared lifecycle: SLERP crossover in factor form, roulette
selection and the fine-tune mutation, as hypothesis properties against dense products."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from torch.testing import assert_close

from helpers import slot_rank
from sandbox.adapters import AdapterBank, product_norm
from sandbox.errors import BadInput
from sandbox.lifecycle import (LifecycleConfig, Population, lifecycle_step, roulette_parent, roulette_weights,
                               slerp_factors)


def _factors(seed, n=3, r=3, d_in=7, d_out=6, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, r, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, r, generator=g, dtype=dtype))


def _dense(A, B):
    return B @ A


@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_slerp_of_identical_parents_is_the_parent(seed, r):
    A, B = _factors(seed, r=r)
    for t in (0.0, 0.3, 1.0):
        A2, B2 = slerp_factors(A, B, A, B, t, r)
        assert_close(_dense(A2, B2), _dense(A, B), rtol=1e-9, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_slerp_endpoints_return_each_parent(seed, r):
    A1, B1 = _factors(seed, r=r)
    A2, B2 = _factors(seed + 1, r=r)
    A, B = slerp_factors(A1, B1, A2, B2, 0.0, r)
    assert_close(_dense(A, B), _dense(A1, B1), rtol=1e-9, atol=1e-9)
    A, B = slerp_factors(A1, B1, A2, B2, 1.0, r)
    assert_close(_dense(A, B), _dense(A2, B2), rtol=1e-9, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), r=st.integers(1, 4), t=st.floats(0, 1))
@settings(max_examples=50, deadline=None)
def test_slerp_rank_and_norm(seed, r, t):
    A1, B1 = _factors(seed, r=r)
    A2, B2 = _factors(seed + 7, r=r)
    A2, B2 = 3.0 * A2, B2  # different norms
    A, B = slerp_factors(A1, B1, A2, B2, t, r)
    assert A.shape == A1.shape and B.shape == B1.shape
    assert bool((slot_rank(A.unsqueeze(1), B.unsqueeze(1)) <= r).all())
    n, n1, n2 = (torch.linalg.matrix_norm(_dense(a, b)) for a, b in ((A, B), (A1, B1), (A2, B2)))
    lo, hi = torch.minimum(n1, n2), torch.maximum(n1, n2)
    assert bool((n >= lo * (1 - 1e-9)).all() and (n <= hi * (1 + 1e-9)).all())
    assert_close(n, (1 - t) * n1 + t * n2, rtol=1e-9, atol=1e-12)
    assert_close(product_norm(A, B), n, rtol=1e-9, atol=1e-12)


def test_slerp_midpoint_matches_dense_slerp_when_rank_allows():
    """With rank 2r nothing is cut, so the factor-form result equals the dense SLERP exactly."""
    A1, B1 = _factors(3, r=2)
    A2, B2 = _factors(4, r=2)
    t = 0.4
    A, B = slerp_factors(A1, B1, A2, B2, t, 4)
    X1, X2 = _dense(A1, B1).flatten(1), _dense(A2, B2).flatten(1)
    n1, n2 = X1.norm(dim=1, keepdim=True), X2.norm(dim=1, keepdim=True)
    th = torch.arccos(((X1 / n1) * (X2 / n2)).sum(1, keepdim=True))
    u = (torch.sin((1 - t) * th) * X1 / n1 + torch.sin(t * th) * X2 / n2) / torch.sin(th)
    want = u / u.norm(dim=1, keepdim=True) * ((1 - t) * n1 + t * n2)
    assert_close(_dense(A, B).flatten(1), want, rtol=1e-9, atol=1e-9)


def test_slerp_with_a_zero_parent():
    A1, B1 = _factors(5)
    A0, B0 = A1.clone(), torch.zeros_like(B1)
    A, B = slerp_factors(A0, B0, A1, B1, 0.0, 3)
    assert_close(_dense(A, B), torch.zeros_like(_dense(A1, B1)))
    A, B = slerp_factors(A0, B0, A1, B1, 0.5, 3)
    assert_close(_dense(A, B), 0.5 * _dense(A1, B1), rtol=1e-9, atol=1e-9)


@given(seed=st.integers(0, 2**31 - 1), K=st.integers(2, 7))
@settings(max_examples=40, deadline=None)
def test_roulette_never_picks_a_dying_slot(seed, K):
    g = torch.Generator().manual_seed(seed)
    fit = torch.randn(6, K, generator=g, dtype=torch.float64)
    fit[0, 0] = math.nan
    alive = torch.rand(6, K, generator=g) < 0.6
    alive[:, 1] = True  # at least one survivor per row, as the lifecycle guarantees
    w = roulette_weights(fit, alive)
    assert_close(w.sum(-1), torch.ones(6, dtype=torch.float64))
    assert bool((w[~alive] == 0).all())
    for _ in range(5):
        p = roulette_parent(fit, alive, g)
        assert bool(alive.gather(-1, p.unsqueeze(-1)).all())


def test_roulette_frequencies_match_probabilities():
    fit = torch.tensor([[0.5, 2.0, -1.0, 1.0, 3.0]], dtype=torch.float64)
    alive = torch.tensor([[True, True, True, False, True]])
    w = roulette_weights(fit, alive)[0]
    assert float(w[3]) == 0 and float(w[4]) > float(w[1]) > float(w[0]) > float(w[2]) > 0
    g = torch.Generator().manual_seed(0)
    n = 20000
    picks = torch.cat([roulette_parent(fit.expand(1000, -1), alive.expand(1000, -1), g) for _ in range(n // 1000)])
    counts = torch.bincount(picks, minlength=5).double()
    assert counts[3] == 0
    keep = w > 0
    _, p = stats.chisquare(counts[keep].numpy(), (w[keep] * n).numpy())
    assert p > 1e-4


def _population(seed, S=3, K=5, r=2, d=6):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(S, K, r, d, generator=g, dtype=torch.float64)
    B = torch.randn(S, K, d, r, generator=g, dtype=torch.float64)
    fit = torch.randn(S, K, generator=g, dtype=torch.float64)
    pop = Population.founders((S,), K).at(100)
    return pop, A, B, fit


def _quadratic_loss(targetW):
    def loss(fac, rp, target, k, generator):
        A, B = fac
        return ((B @ A).sum(-3) - targetW).pow(2).sum((-1, -2))   # (S,)
    return loss


@given(seed=st.integers(0, 2**31 - 1), steps=st.integers(1, 3), n_die=st.integers(1, 3))
@settings(max_examples=25, deadline=None)
def test_finetune_never_touches_other_slots(seed, steps, n_die):
    pop, A, B, fit = _population(seed)
    cfg = LifecycleConfig(min_age=0, n_die=n_die, mutation_kind="finetune", finetune_steps=steps, finetune_lr=0.1)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    tgt = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    # no inheritance, so the only change outside the newborn could come from the fine-tune
    cfg_off = LifecycleConfig(**{**cfg.__dict__, "inheritance": False})
    _, (A2, B2), _, events = lifecycle_step(pop, (A, B), None, fit, cfg_off, gens, 100, finetune=_quadratic_loss(tgt))
    born = torch.zeros(3, 5, dtype=torch.bool)
    for ev in events:
        if ev["event"] == "birth":
            born[ev["batch"], ev["slot"]] = True
            assert math.isfinite(ev["finetune_loss_before"]) and math.isfinite(ev["finetune_loss_after"])
    assert bool(born.any())
    assert torch.equal(A2[~born], A[~born]) and torch.equal(B2[~born], B[~born])
    # and the newborn did move away from its clone: rerun with the fine-tune off (same draws)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    plain = LifecycleConfig(**{**cfg_off.__dict__, "mutation_kind": "svd", "mutation_sigma": 0.0, "rotation": 0.0})
    _, (A3, B3), _, _ = lifecycle_step(pop, (A, B), None, fit, plain, gens, 100)
    assert not torch.equal(A2[born], A3[born]) or not torch.equal(B2[born], B3[born])


def test_finetune_requires_a_callback_and_flags_are_named():
    pop, A, B, fit = _population(0)
    with pytest.raises(BadInput, match="--mutation"):
        lifecycle_step(pop, (A, B), None, fit, LifecycleConfig(min_age=0, mutation_kind="finetune"),
                       torch.Generator().manual_seed(0), 100)
    for kw, flag in ((dict(selection="wheel"), "--selection"), (dict(crossover="uniform"), "--crossover"),
                     (dict(crossover_t=1.5), "--crossover-t"), (dict(finetune_steps=0), "--finetune-steps"),
                     (dict(finetune_lr=0.0), "--finetune-lr"), (dict(mutation_kind="lora"), "--mutation")):
        with pytest.raises(BadInput, match=flag):
            LifecycleConfig(**kw)


@given(seed=st.integers(0, 2**31 - 1))
@settings(max_examples=15, deadline=None)
def test_crossover_births_record_two_parents_and_keep_rank(seed):
    pop, A, B, fit = _population(seed)
    bank = AdapterBank.from_factors(A, B)
    cfg = LifecycleConfig(min_age=0, n_die=2, crossover="slerp", selection="roulette", mutation=False)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(3)]
    _, bank, _, events = lifecycle_step(pop, bank, None, fit, cfg, gens, 100)
    births = [e for e in events if e["event"] == "birth"]
    assert births
    for ev in births:
        assert ev["parent2_slot"] != ev["parent_slot"]
        assert 0 <= ev["crossover_t"] <= 1
    assert bool((slot_rank(bank.A.detach(), bank.B.detach()) <= 2).all())


def test_crossover_is_per_row_reproducible():
    """With per-row generators a seed's crossover does not depend on the other seeds of its batch."""
    pop, A, B, fit = _population(11)
    cfg = LifecycleConfig(min_age=0, crossover="slerp", selection="roulette")
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(3)]
    _, (A2, B2), _, _ = lifecycle_step(pop, (A, B), None, fit, cfg, gens(), 100)
    pop1 = Population.founders((1,), 5).at(100)
    _, (A1, B1), _, _ = lifecycle_step(pop1, (A[1:2], B[1:2]), None, fit[1:2], cfg, gens()[1:2], 100)
    assert_close(A1[0], A2[1], rtol=1e-12, atol=1e-12)
    assert_close(B1[0], B2[1], rtol=1e-12, atol=1e-12)
