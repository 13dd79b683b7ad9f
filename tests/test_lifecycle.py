"""Lifecycle: operators against dense/loop oracles and Monte Carlo, and the issue's invariants as
hypothesis properties on a seed-batched bank and on a dict of per-layer banks."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from helpers import slot_rank
from sandbox.adapters import AdapterBank, BankConfig, gated_mixture, init_factors, lowrank_svd
from sandbox.errors import BadInput
from sandbox.lifecycle import (
    LifecycleConfig, Population, blend, event_rows, fitness, lifecycle_step, loo_gates, mutate_svd, reallocate,
    reset_adam_state, reset_mask, _death_order,
)
from sandbox.router import RouterConfig, init_router_params

F, M, P = 3, 3, 2  # routing features, domains, router individuals per population


# --------------------------------------------------------------------------------------------- operators


def test_fitness_by_scope_matches_numpy(gen):
    loo = torch.rand(2, 4, M, generator=gen, dtype=torch.float64)
    full = torch.rand(2, M, generator=gen, dtype=torch.float64)
    d = loo.numpy() - full.numpy()[:, None, :]
    np.testing.assert_allclose(fitness(loo, full, "global"), d.mean(-1))
    np.testing.assert_allclose(fitness(loo, full, "per-domain", "max"), d.max(-1))
    np.testing.assert_allclose(fitness(loo, full, "per-domain", "mean"), d.mean(-1))
    np.testing.assert_allclose(fitness(loo, full, "per-domain", "median"), np.median(d, -1))
    with pytest.raises(BadInput, match="--scope"):
        fitness(loo, full, "local")


def test_loo_gates_switch_off_one_slot(gen):
    A = torch.randn(2, 4, 2, 5, generator=gen)
    B = torch.randn(2, 4, 3, 2, generator=gen)
    x = torch.randn(2, 6, 5, generator=gen)
    gates = torch.rand(2, 6, 4, generator=gen)
    lg = loo_gates(gates)  # (2, 4, 6, 4)
    y = gated_mixture(x.unsqueeze(1), A.unsqueeze(1), B.unsqueeze(1), lg, 1.0)  # (2, 4, 6, 3)
    for k in range(4):
        g = gates.clone()
        g[..., k] = 0
        assert_close(y[:, k], gated_mixture(x, A, B, g, 1.0))


@given(K=st.integers(2, 7), n_die=st.integers(1, 8), min_age=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=40)
def test_death_order_matches_loop(K, n_die, min_age, seed):
    """The slots `lifecycle_step` kills: the n_die least fit old enough (ties by slot), never all K."""
    g = torch.Generator().manual_seed(seed)
    fit = torch.randint(0, 4, (5, K), generator=g).double()  # ties on purpose
    ages = torch.randint(0, 6, (5, K), generator=g)
    order, valid = _death_order(fit, ages, n_die, min_age)
    dead = torch.zeros_like(fit, dtype=torch.bool)
    dead = dead.scatter(-1, order, valid) if order.shape[-1] else dead
    for i in range(5):
        eligible = [k for k in range(K) if ages[i, k] >= min_age]
        ranked = sorted(eligible, key=lambda k: (float(fit[i, k]), k))
        expect = set(ranked[:min(n_die, K - 1)])
        assert set(torch.nonzero(dead[i]).flatten().tolist()) == expect
        assert dead[i].sum() < K


def test_mutation_zero_is_exact_clone(gen):
    A, B = init_factors((5,), 1, 3, 6, 4, "random", gen)
    A2, B2 = mutate_svd(A[:, 0], B[:, 0], 0.0, 0.0, gen)
    assert torch.equal(A2, A[:, 0]) and torch.equal(B2, B[:, 0])


def test_singular_value_noise_is_lognormal_monte_carlo():
    g = torch.Generator().manual_seed(7)
    n, sigma = 4000, 0.3
    A, B = init_factors((n,), 1, 1, 6, 5, "random", g, dtype=torch.float64)
    A2, B2 = mutate_svd(A[:, 0], B[:, 0], sigma, 0.0, g)
    ratio = torch.log(torch.linalg.matrix_norm(B2 @ A2) / torch.linalg.matrix_norm(B[:, 0] @ A[:, 0]))
    # log ratio ~ N(0, sigma^2): mean within 4 standard errors of 0, sd within 6%
    assert abs(float(ratio.mean())) < 4 * sigma / math.sqrt(n)
    assert float(ratio.std()) == pytest.approx(sigma, rel=0.06)
    # no rotation: the column and row spaces are the parent's
    P0 = B[:, 0] @ A[:, 0]
    U = torch.linalg.svd(P0).U[..., :1]
    child = B2 @ A2
    assert_close(U @ (U.transpose(-1, -2) @ child), child)


def test_rotation_keeps_singular_values_and_moves_subspace(gen):
    A, B = init_factors((50,), 1, 3, 12, 10, "random", gen, dtype=torch.float64)
    A2, B2 = mutate_svd(A[:, 0], B[:, 0], 0.0, 0.2, gen)
    s0 = torch.linalg.svdvals(B[:, 0] @ A[:, 0])[..., :3]
    s1 = torch.linalg.svdvals(B2 @ A2)[..., :3]
    assert_close(s1, s0)
    moved = torch.linalg.matrix_norm(B2 @ A2 - B[:, 0] @ A[:, 0]) / torch.linalg.matrix_norm(B[:, 0] @ A[:, 0])
    assert (moved > 1e-3).all()
    small = mutate_svd(A[:, 0], B[:, 0], 0.0, 0.02, torch.Generator().manual_seed(1))
    moved_small = torch.linalg.matrix_norm(small[1] @ small[0] - B[:, 0] @ A[:, 0]) / torch.linalg.matrix_norm(B[:, 0] @ A[:, 0])
    assert float(moved_small.mean()) < float(moved.mean())


def test_rotation_turns_singular_vectors_by_about_the_angle_monte_carlo():
    g = torch.Generator().manual_seed(3)
    A, B = init_factors((400,), 1, 8, 128, 96, "random", g, dtype=torch.float64)
    A, B = A[:, 0], B[:, 0]
    U = lowrank_svd(B, A)[0][..., 0]  # (400, 96) top left singular vector, in factor form
    for angle in (0.05, 0.1):
        A2, B2 = mutate_svd(A, B, 0.0, angle, g)
        U2 = lowrank_svd(B2, A2)[0][..., 0]
        turn = torch.arccos((U * U2).sum(-1).abs().clamp(max=1))
        # ||Omega u|| has mean ~ angle (a chi over sqrt(m) with m = 16 dims), so the turn is about angle
        assert float(turn.mean()) == pytest.approx(angle, rel=0.2)


def test_blend_is_best_rank_r_of_dense_blend(gen):
    A = torch.randn(2, 4, 2, 7, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 4, 6, 2, generator=gen, dtype=torch.float64)
    An, Bn = blend(A[:, 0], B[:, 0], A[:, 1], B[:, 1], 0.3, 2)
    dense = 0.7 * B[:, 0] @ A[:, 0] + 0.3 * B[:, 1] @ A[:, 1]
    s = torch.linalg.svdvals(dense)
    assert_close(torch.linalg.matrix_norm(Bn @ An - dense), s[:, 2:].pow(2).sum(-1).sqrt())
    A1, B1 = blend(A[:, 0], B[:, 0], A[:, 1], B[:, 1], 1.0, 2)
    assert_close(B1 @ A1, B[:, 1] @ A[:, 1])


def test_reallocation_points_slot_at_worst_domain(gen):
    cfg = LifecycleConfig(realloc_noise=0.0, realloc_push=2.0)
    rc = RouterConfig(kind="sigmoid", n_features=F, n_slots=4)
    p = init_router_params(rc, (3, P), gen)  # (n=3, e=P, F, K)
    losses = torch.tensor([[0.1, 0.9, 0.2], [0.5, 0.1, 0.0], [0.0, 0.1, 0.3]])
    hbar = torch.randn(3, M, F, generator=gen)
    slot, parent = torch.tensor([1, 2, 0]), torch.tensor([3, 0, 2])
    valid = torch.tensor([True, True, False])
    new, target = reallocate(p, slot, parent, valid, cfg, gen, losses, hbar)
    assert target.tolist() == [1, 0, 2]
    for i in range(2):
        z_new = hbar[i] @ new["W"][i, :, :, slot[i]].T + new["bias"][i, :, slot[i]]  # (M, P)
        z_par = hbar[i] @ p["W"][i, :, :, parent[i]].T + p["bias"][i, :, parent[i]]
        gain = (z_new - z_new.mean(0)) - (z_par - z_par.mean(0))
        assert_close(gain[target[i]], torch.full((P,), 2.0), atol=1e-5, rtol=1e-5)
        assert torch.equal(new["phi"][i, :, slot[i]], p["phi"][i, :, parent[i]])
    for k in p:
        assert torch.equal(new[k][2], p[k][2])  # row without a death is untouched


def test_reset_adam_state(gen):
    A = torch.nn.Parameter(torch.randn(2, 4, 3, 5, generator=gen))
    W = torch.nn.Parameter(torch.randn(2, F, 4, generator=gen))
    opt = torch.optim.Adam([A, W], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        (A.square().sum() + W.pow(3).sum()).backward()
        opt.step()
    mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in (A, W)}
    reset_adam_state(opt, A, mask, slot_dim=-3)
    reset_adam_state(opt, W, mask, slot_dim=-1)
    for p, view in ((A, mask[:, :, None, None]), (W, mask[:, None, :])):
        for key in ("exp_avg", "exp_avg_sq"):
            now, old = opt.state[p][key], before[p][key]
            assert torch.all(torch.where(view, now, 0) == 0)
            assert torch.equal(torch.where(view, old, now), old)  # unmasked entries unchanged
    with pytest.raises(BadInput, match="slot_dim"):
        reset_adam_state(opt, W, mask, slot_dim=-2)


def test_config_validation_and_due():
    with pytest.raises(BadInput, match="--inherit-alpha"):
        LifecycleConfig(inherit_alpha=1.5)
    with pytest.raises(BadInput, match="--inherit-mode"):
        LifecycleConfig(inherit_mode="merge")
    with pytest.raises(BadInput, match="--per-domain-agg"):
        LifecycleConfig(per_domain_agg="sum")
    cfg = LifecycleConfig(interval=100)
    assert [cfg.due(s) for s in (0, 50, 100, 200)] == [False, False, True, True]


def test_child_mode_newborn_is_alpha_times_dying(gen):
    A, B = init_factors((1,), 3, 2, 6, 5, "random", gen, dtype=torch.float64)
    pop = Population.founders((1,), 3)
    cfg = LifecycleConfig(min_age=0, inherit_mode="child", inherit_alpha=0.4, mutation=False)
    fit = torch.tensor([[1.0, -1.0, 2.0]])
    pop2, (A2, B2), _, events = lifecycle_step(pop, (A, B), None, fit, cfg, gen, step=10)
    assert_close(B2[0, 1] @ A2[0, 1], 0.4 * B[0, 1] @ A[0, 1])
    assert [e["event"] for e in events] == ["death", "inherit", "birth"]
    assert events[1]["parent_id"] == 1 and events[1]["slot_id"] == 3 and pop2.ids[0].tolist() == [0, 3, 2]


def test_blend_goes_to_nearest_neighbour(gen):
    A, B = init_factors((1,), 4, 2, 6, 5, "random", gen, dtype=torch.float64)
    A[0, 2], B[0, 2] = A[0, 0], -3 * B[0, 0]  # anti-aligned with slot 0 ...
    A[0, 3], B[0, 3] = A[0, 0], 2 * B[0, 0]  # ... and aligned: slot 3 is slot 0's nearest neighbour
    cfg = LifecycleConfig(min_age=0, inherit_alpha=0.25, mutation=False)
    fit = torch.tensor([[-5.0, 1.0, 1.0, 1.0]])
    _, (A2, B2), _, events = lifecycle_step(Population.founders((1,), 4), (A, B), None, fit, cfg, gen, step=1)
    inherit = [e for e in events if e["event"] == "inherit"]
    assert len(inherit) == 1 and inherit[0]["slot"] == 3 and inherit[0]["parent_id"] == 0
    expect = 0.75 * B[0, 3] @ A[0, 3] + 0.25 * B[0, 0] @ A[0, 0]
    assert_close(B2[0, 3] @ A2[0, 3], expect)
    assert torch.equal(A2[0, 2], A[0, 2]) and torch.equal(B2[0, 1], B[0, 1])


# --------------------------------------------------------------------------------------------- properties




def make_state(S, K, r, seed, dict_banks, ages_max=6):
    g = torch.Generator().manual_seed(seed)
    if dict_banks:
        banks = {"q": AdapterBank(BankConfig(K, r, 5, 4, lora_alpha=2.0 * r, batch_shape=(S,)), init="random", generator=g),
                 "mlp": AdapterBank(BankConfig(K, r, 4, 6, batch_shape=(S,)), init="lora", generator=g)}
        banks["mlp"].B.data.normal_(generator=g)  # make the second layer non-zero too
    else:
        banks = init_factors((S,), K, r, 5, 4, "random", g)
    ids = torch.arange(K).expand(S, K).clone()
    pop = Population(ids, torch.randint(0, ages_max + 1, (S, K), generator=g), torch.full((S, K), -1),
                     torch.full((S,), K), step=0)
    rc = RouterConfig(kind="sigmoid", n_features=F, n_slots=K)
    rp = init_router_params(rc, (S, P), g)
    fit = torch.randint(-3, 3, (S, K), generator=g).double() / 2
    losses = torch.rand(S, M, generator=g)
    feats = torch.randn(S, M, F, generator=g)
    return pop, banks, rp, fit, losses, feats


def factors(banks):
    if isinstance(banks, dict):
        return {k: (b.A.detach().clone(), b.B.detach().clone()) for k, b in banks.items()}
    return {"": (banks[0].clone(), banks[1].clone())}


@pytest.mark.parametrize("dict_banks", [False, True])
@pytest.mark.parametrize("mode", ["blend", "child"])
def test_alpha_zero_changes_only_the_freed_slots(dict_banks, mode):
    pop, banks, rp, fit, losses, feats = make_state(3, 5, 2, 11, dict_banks, ages_max=0)
    old = factors(banks)
    cfg = LifecycleConfig(n_die=2, min_age=0, inherit_alpha=0.0, inherit_mode=mode, reallocation=False)
    pop2, banks2, rp2, events = lifecycle_step(pop, banks, rp, fit, cfg, torch.Generator().manual_seed(0), 0)
    freed = {(e["batch"], e["slot"]) for e in events if e["event"] == "death"}
    assert len(freed) == 6 and {e["event"] for e in events} == {"death", "birth"}
    for name, (A, B) in factors(banks2).items():
        for row in range(3):
            for k in range(5):
                same = torch.equal(A[row, k], old[name][0][row, k]) and torch.equal(B[row, k], old[name][1][row, k])
                assert same == ((row, k) not in freed)
    assert all(torch.equal(rp2[k], rp[k]) for k in rp)  # reallocation off: router untouched


configs = st.builds(
    LifecycleConfig, n_die=st.integers(1, 7), min_age=st.integers(0, 6),
    inherit_alpha=st.sampled_from([0.0, 0.0, 0.3, 1.0]), inherit_mode=st.sampled_from(["blend", "child"]),
    mutation_sigma=st.sampled_from([0.0, 0.3]), rotation=st.sampled_from([0.0, 0.1]),
    tournament=st.integers(1, 3), realloc_noise=st.sampled_from([0.0, 0.2]),
    scope=st.sampled_from(["global", "per-domain"]), death=st.booleans(), inheritance=st.booleans(),
    mutation=st.booleans(), reallocation=st.booleans(),
)


@given(cfg=configs, S=st.integers(1, 3), K=st.integers(2, 6), r=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       dict_banks=st.booleans())
@settings(max_examples=40)
def test_lifecycle_invariants(cfg, S, K, r, seed, dict_banks):
    pop, banks, rp, fit, losses, feats = make_state(S, K, r, seed, dict_banks)
    old = factors(banks)
    params_before = [b for b in banks.values()] if dict_banks else None
    gen = torch.Generator().manual_seed(seed + 1)
    pop2, banks2, rp2, events = lifecycle_step(pop, banks, rp, fit, cfg, gen, step=0, domain_losses=losses,
                                               domain_features=feats)
    new = factors(banks2)

    # slot count and shapes constant; AdapterBanks updated in place
    assert pop2.ids.shape == (S, K) and pop2.batch_shape == (S,)
    if dict_banks:
        assert all(banks2[k] is b for k, b in zip(banks2, params_before))
    deaths = [e for e in events if e["event"] == "death"]
    births = [e for e in events if e["event"] == "birth"]
    inherits = [e for e in events if e["event"] == "inherit"]
    assert len(deaths) == len(births)
    touched = {(e["batch"], e["slot"]) for e in births + inherits}
    for row in range(S):
        ids = pop2.ids[row].tolist()
        assert len(set(ids)) == K  # unique
        born = [e for e in births if e["batch"] == row]
        assert pop2.next_id[row] == K + len(born)
        assert all(e["slot_id"] >= K for e in born)  # new ids are fresh, never reused
        died = [e for e in deaths if e["batch"] == row]
        # young slots never die; at least one survivor; at most n_die; the least fit die
        assert all(pop.ages[row, e["slot"]] >= cfg.min_age for e in died)
        eligible = int((pop.ages[row] >= cfg.min_age).sum())
        assert len(died) == (min(cfg.n_die, K - 1, eligible) if cfg.death else 0)
        assert len(set(ids) & set(range(K))) >= 1
        if died:
            worst_alive = min(float(fit[row, k]) for k in range(K)
                              if pop.ages[row, k] >= cfg.min_age and k not in {e["slot"] for e in died}) \
                if eligible > len(died) else math.inf
            assert max(e["fitness"] for e in died) <= worst_alive
        # lineage only names ids that existed
        existed = set(range(K)) | set(ids)
        for e in events:
            if e["batch"] == row:
                assert {e["slot_id"], e["parent_id"], e["neighbour_id"]} - {-1} <= existed
        assert set(pop2.parents[row].tolist()) - {-1} <= existed
        assert (pop2.ages[row][[e["slot"] for e in born]] == 0).all()

    for name, (A, B) in new.items():
        A0, B0 = old[name]
        r_ = A.shape[-2]
        assert torch.isfinite(A).all() and torch.isfinite(B).all()
        assert (slot_rank(A, B) <= r_).all() and A.shape == A0.shape and B.shape == B0.shape
        for row in range(S):
            for k in range(K):
                if (row, k) not in touched:  # bit-for-bit unchanged
                    assert torch.equal(A[row, k], A0[row, k]) and torch.equal(B[row, k], B0[row, k])
    for key in rp:
        for row in range(S):
            for k in range(K):
                if (row, k) not in touched:
                    assert torch.equal(rp2[key][row, ..., k], rp[key][row, ..., k])
        assert torch.isfinite(rp2[key]).all()
        assert rp2[key].shape == rp[key].shape

    if cfg.inherit_alpha == 0 or not cfg.inheritance:
        assert not inherits  # alpha = 0: neighbours untouched (checked bit-for-bit above)
    if cfg.mutation and cfg.mutation_sigma == 0 and cfg.rotation == 0 and not inherits:
        for e in births:  # zero mutation: an exact clone of the (unchanged) parent
            parent_slot = pop2.ids[e["batch"]].tolist().index(e["parent_id"])
            for A, B in new.values():
                assert torch.equal(A[e["batch"], e["slot"]], A[e["batch"], parent_slot])
                assert torch.equal(B[e["batch"], e["slot"]], B[e["batch"], parent_slot])

    # the same generator seed gives identical results
    pop_b, banks_b, rp_b, fit_b, losses_b, feats_b = make_state(S, K, r, seed, dict_banks)
    again = lifecycle_step(pop_b, banks_b, rp_b, fit_b, cfg, torch.Generator().manual_seed(seed + 1), 0, losses_b, feats_b)
    assert torch.equal(again[0].ids, pop2.ids) and torch.equal(again[0].parents, pop2.parents)
    for name, (A, B) in factors(again[1]).items():
        assert torch.equal(A, new[name][0]) and torch.equal(B, new[name][1])
    assert all(torch.equal(again[2][k], rp2[k]) for k in rp)
    assert [{k: v for k, v in e.items() if k not in ("mutation_size", "fitness")} for e in again[3]] == \
        [{k: v for k, v in e.items() if k not in ("mutation_size", "fitness")} for e in events]


@given(seed=st.integers(0, 2**31 - 1), dict_banks=st.booleans(), mode=st.sampled_from(["blend", "child"]))
@settings(max_examples=6)
def test_repeated_steps_keep_lineage_consistent(seed, dict_banks, mode):
    S, K = 2, 4
    pop, banks, rp, fit, losses, feats = make_state(S, K, 2, seed, dict_banks, ages_max=0)
    cfg = LifecycleConfig(interval=10, n_die=2, min_age=10, inherit_mode=mode)
    g = torch.Generator().manual_seed(seed)
    seen = [set(range(K)) for _ in range(S)]
    for step in range(10, 70, 10):
        fit = torch.randn(S, K, generator=g)
        pop, banks, rp, events = lifecycle_step(pop, banks, rp, fit, cfg, g, step, losses, feats)
        for row in range(S):
            ids = set(pop.ids[row].tolist())
            fresh = ids - seen[row]
            assert all(i >= max(seen[row]) + 1 for i in fresh)  # never reused
            named = {v for e in events if e["batch"] == row for v in (e["slot_id"], e["parent_id"], e["neighbour_id"])}
            assert named - {-1} <= seen[row] | ids
            seen[row] |= ids
        # slots born at this step are age 0, so at the next step (age 10 = min_age) they may die
        assert ((pop.ages == 0) | (pop.ages >= 10)).all()
    for A, B in factors(banks).values():
        assert torch.isfinite(A).all() and torch.isfinite(B).all()


def test_optimizer_keeps_bank_parameters_and_reset(gen):
    bank = AdapterBank(BankConfig(4, 2, 6, 5, batch_shape=(2,)), init="random", generator=gen)
    opt = torch.optim.Adam(bank.parameters(), lr=1e-2)
    x = torch.randn(2, 8, 6, generator=gen)
    for _ in range(3):
        opt.zero_grad()
        bank(x, torch.full((2, 8, 4), 0.5)).square().sum().backward()
        opt.step()
    pop = Population.founders((2,), 4).at(100)
    cfg = LifecycleConfig(min_age=0, n_die=1)
    pop, bank2, _, events = lifecycle_step(pop, bank, None, torch.randn(2, 4, generator=gen), cfg, gen, step=100)
    assert bank2 is bank and opt.param_groups[0]["params"][0] is bank.A
    mask = reset_mask(events, (2,), 4)
    assert int(mask.sum()) == len([e for e in events if e["event"] in ("birth", "inherit")])
    reset_adam_state(opt, bank.A, mask, slot_dim=-3)
    assert torch.all(opt.state[bank.A]["exp_avg"][mask] == 0)
    assert torch.all(opt.state[bank.A]["exp_avg"][~mask] != 0)
    rows = event_rows(events, [42, 137])
    assert {r["seed"] for r in rows} <= {42, 137} and "batch" not in rows[0]


def test_half_precision_banks_keep_dtype_and_untouched_slots(gen):
    bank = AdapterBank(BankConfig(4, 2, 8, 6), init="random", generator=gen, dtype=torch.bfloat16)
    A0, B0 = bank.A.detach().clone(), bank.B.detach().clone()
    cfg = LifecycleConfig(min_age=0, inheritance=False)
    fit = torch.tensor([0.0, -1.0, 2.0, 1.0])
    _, banks, _, events = lifecycle_step(Population.founders((), 4), {"w": bank}, None, fit, cfg, gen, step=1)
    assert bank.A.dtype == torch.bfloat16 and torch.isfinite(bank.A.float()).all()
    assert [e["slot"] for e in events] == [1, 1]
    for k in (0, 2, 3):
        assert torch.equal(bank.A[k], A0[k]) and torch.equal(bank.B[k], B0[k])


def test_event_slots_point_at_the_slots_holding_those_ids(gen):
    pop, banks, rp, fit, losses, feats = make_state(2, 5, 2, 3, False, ages_max=0)
    cfg = LifecycleConfig(n_die=3, min_age=0)
    held = pop.ids.clone()
    pop2, _, _, events = lifecycle_step(pop, banks, rp, fit, cfg, gen, 0, losses, feats)
    assert {e["event"] for e in events} == {"death", "inherit", "birth"}
    for e in events:  # parents and neighbours are survivors, dying donors are replaced only at their own rank
        ids_before = held[e["batch"]].tolist()
        for key in ("parent", "neighbour"):
            slot, id_ = e[f"{key}_slot"], e[f"{key}_id"]
            assert (slot == -1) == (id_ == -1)
            if slot >= 0:
                assert ids_before[slot] == id_
        if e["event"] == "birth":
            assert pop2.ids[e["batch"], e["parent_slot"]] == e["parent_id"]


# --------------------------------------------------------------------------------------------- per-row generators


def _row_state(state, i, dict_banks):
    """Batch element i of `make_state`'s output as a batch of one (banks keep their scale)."""
    pop, banks, rp, fit, losses, feats = state
    one = lambda x: x[i:i + 1].clone()  # noqa: E731
    if dict_banks:
        banks = {k: AdapterBank.from_factors(one(b.A.detach()), one(b.B.detach()), b.lora_alpha) for k, b in banks.items()}
    else:
        banks = (one(banks[0]), one(banks[1]))
    pop = Population(one(pop.ids), one(pop.ages), one(pop.parents), one(pop.next_id), pop.step)
    return pop, banks, {k: one(v) for k, v in rp.items()}, one(fit), one(losses), one(feats)


def _comparable(events, row=None):
    """Events of one batch row (renumbered to row 0), NaN as None so equal runs compare equal."""
    out = []
    for e in events:
        if row is None or e["batch"] == row:
            out.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in
                        {**e, "batch": 0 if row is not None else e["batch"]}.items()})
    return out


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@given(cfg=configs, S=st.integers(2, 3), K=st.integers(2, 6), r=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       dict_banks=st.booleans())
@settings(max_examples=30, deadline=None)
def test_per_row_generators_make_each_row_independent_of_its_batch(cfg, S, K, r, seed, dict_banks):
    """With one generator per batch element, element i's result (bank, router, population, events
    and the state its generator is left in) is bit-identical to running element i alone."""
    gseeds = [seed % 1000 + 17 * i for i in range(S)]
    batch_gens = _gens(gseeds)
    pop2, banks2, rp2, events = lifecycle_step(*make_state(S, K, r, seed, dict_banks)[:4], cfg, batch_gens, 3,
                                               *make_state(S, K, r, seed, dict_banks)[4:])
    new = factors(banks2)
    for i in range(S):
        alone_gen = _gens([gseeds[i]])
        p1, b1, rp1, fit1, losses1, feats1 = _row_state(make_state(S, K, r, seed, dict_banks), i, dict_banks)
        q, b1, rq, ev1 = lifecycle_step(p1, b1, rp1, fit1, cfg, alone_gen, 3, losses1, feats1)
        for t_batch, t_one in ((pop2.ids, q.ids), (pop2.ages, q.ages), (pop2.parents, q.parents), (pop2.next_id, q.next_id)):
            assert torch.equal(t_batch[i:i + 1], t_one)
        for name, (A, B) in factors(b1).items():
            assert torch.equal(new[name][0][i:i + 1], A) and torch.equal(new[name][1][i:i + 1], B)
        assert all(torch.equal(rp2[k][i:i + 1], rq[k]) for k in rp2)
        assert _comparable(events, i) == _comparable(ev1)
        # the generators are left in the same state (rows without a late death used throwaways)
        assert torch.equal(torch.rand(4, generator=batch_gens[i]), torch.rand(4, generator=alone_gen[0]))


def test_batch_shape_is_flattened_row_major_for_generators():
    """A (2, 2) batch with four generators equals the flat batch of four with the same generators."""
    cfg = LifecycleConfig(n_die=2, min_age=0)
    pop, (A, B), rp, fit, losses, feats = make_state(4, 5, 2, 5, False, ages_max=0)
    flat = lifecycle_step(pop, (A, B), rp, fit, cfg, _gens(range(4)), 0, losses, feats)
    sq = lambda x: x.reshape(2, 2, *x.shape[1:])  # noqa: E731  (4, ...) -> (2, 2, ...)
    pop4 = Population(sq(pop.ids), sq(pop.ages), sq(pop.parents), sq(pop.next_id), 0)
    grid = lifecycle_step(pop4, (sq(A), sq(B)), {k: sq(v) for k, v in rp.items()}, sq(fit), cfg, _gens(range(4)), 0,
                          sq(losses), sq(feats))
    assert torch.equal(grid[0].ids.reshape(4, -1), flat[0].ids)
    assert torch.equal(grid[1][0].reshape(A.shape), flat[1][0]) and torch.equal(grid[1][1].reshape(B.shape), flat[1][1])
    assert all(torch.equal(grid[2][k].reshape(rp[k].shape), flat[2][k]) for k in rp)
    assert _comparable(grid[3]) == _comparable(flat[3])
    assert not torch.equal(flat[1][0], A)  # something did happen


def test_per_row_generators_differ_from_each_other_and_are_checked(gen):
    cfg = LifecycleConfig(min_age=0, realloc_noise=0.5)
    state = make_state(2, 4, 2, 9, False, ages_max=0)
    same = lifecycle_step(*state[:4], cfg, _gens([7, 7]), 0, *state[4:])
    # rows 0 and 1 start from different states, so compare the noise each drew: a distinct seed per row
    other = lifecycle_step(*make_state(2, 4, 2, 9, False, ages_max=0)[:4], cfg, _gens([7, 8]), 0,
                           *make_state(2, 4, 2, 9, False, ages_max=0)[4:])
    assert torch.equal(same[1][0][0], other[1][0][0]) and not torch.equal(same[1][0][1], other[1][0][1])
    with pytest.raises(ValueError, match="one per batch row"):
        lifecycle_step(*make_state(2, 4, 2, 9, False, ages_max=0)[:4], cfg, _gens([1, 2, 3]), 0)
    with pytest.raises(ValueError, match="one per batch row"):
        mutate_svd(state[1][0][:, 0], state[1][1][:, 0], 0.1, 0.1, _gens([1]))
