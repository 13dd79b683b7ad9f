"""Evolutionary routing search: population layout, step-size adaptation (1/5th rule), CMA-ES through
the library, elitist selection, per-seed streams."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from sandbox import evolution as evo
from sandbox.errors import BadInput


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _search(cfg, S, D, seeds=None):
    gens = _gens(seeds if seeds is not None else range(S))
    return evo.init_search(cfg, S, D, gens), gens


@pytest.mark.parametrize("method", ["es", "fixed"])
def test_propose_member_zero_is_current_and_noise_scaled(method):
    cfg = evo.EvolutionConfig(population=4001, mutation_scale=0.3, method=method)
    x = torch.tensor([[0.0, 1.0, -2.0], [5.0, 5.0, 5.0]])
    unit = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]])
    state, gens = _search(cfg, 2, 3, [1, 2])
    state.sigma = torch.tensor([0.3, 0.6]) if method == "es" else state.sigma
    pop = evo.propose(x, unit, state, cfg, gens)
    assert pop.shape == (2, 4001, 3)
    torch.testing.assert_close(pop[:, 0], x, rtol=0, atol=0)
    noise = pop[:, 1:] - x[:, None]
    size = torch.tensor([[0.3], [0.6]]) if method == "es" else 0.3
    torch.testing.assert_close(noise.std(dim=1), size * unit, rtol=0.06, atol=0)
    torch.testing.assert_close(noise.mean(dim=1), torch.zeros(2, 3), rtol=0, atol=0.05)


@pytest.mark.parametrize("method", ["es", "cma", "fixed"])
def test_propose_per_seed_streams_do_not_depend_on_batch(method):
    cfg = evo.EvolutionConfig(population=5, method=method)
    x, u = torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    full_state, full_gens = _search(cfg, 3, 4, [7, 8, 9])
    one_state, one_gens = _search(cfg, 1, 4, [8])
    for _ in range(3):   # several generations: the carried state must stay per seed too
        full = evo.propose(x, u, full_state, cfg, full_gens)
        one = evo.propose(x[1:2], u[1:2], one_state, cfg, one_gens)
        torch.testing.assert_close(full[1:2], one, rtol=0, atol=0)
        obj = (full ** 2).sum(-1)
        x_full, _ = evo.advance(full_state, full, obj, cfg)
        x_one, _ = evo.advance(one_state, one, (one ** 2).sum(-1), cfg)
        torch.testing.assert_close(x_full[1:2], x_one, rtol=0, atol=0)
        x = x_full


def _run_sphere(method, S=16, n=10, gens=150, x0=3.0, sigma0=1.0):
    cfg = evo.EvolutionConfig(population=16, mutation_scale=sigma0, method=method)
    state, g = _search(cfg, S, n)
    x = torch.full((S, n), x0, dtype=torch.float64)
    unit = torch.ones(S, n, dtype=torch.float64)
    log_dist = []
    for _ in range(gens):
        pop = evo.propose(x, unit, state, cfg, g)
        x, _ = evo.advance(state, pop, (pop ** 2).sum(-1), cfg)
        log_dist.append(float(x.norm(dim=-1).log().mean()))
    return np.asarray(log_dist), state


def test_es_halves_its_distance_on_a_quadratic_at_the_expected_rate():
    # Sphere, n = 10, lambda = 15: at the optimal step the normalised progress of a (1, lambda)-ES
    # is c^2 / 2 with c_{1,15} = 1.736, so the distance halves every n ln 2 / 1.507 = 4.6
    # generations at best; a 1/5th-rule ES should come within a small factor of that.
    n = 10
    log_dist, _ = _run_sphere("es", n=n)
    slope = np.polyfit(np.arange(20, 150), log_dist[20:], 1)[0]
    halving = math.log(0.5) / slope
    best = n * math.log(2) / (1.736 ** 2 / 2)
    assert 0.8 * best < halving < 2.0 * best, (halving, best)


def test_es_step_size_grows_on_a_slope_and_shrinks_near_the_optimum():
    cfg = evo.EvolutionConfig(population=16, mutation_scale=0.01, method="es")
    S, n = 8, 6
    state, g = _search(cfg, S, n)
    w = torch.linspace(1, 2, n, dtype=torch.float64)
    x = torch.zeros(S, n, dtype=torch.float64)
    unit = torch.ones(S, n, dtype=torch.float64)
    for _ in range(10):                                  # linear objective: half the children win
        pop = evo.propose(x, unit, state, cfg, g)
        x, _ = evo.advance(state, pop, pop @ w, cfg)
    assert (state.sigma > 0.01 * 5).all()
    cfg = evo.EvolutionConfig(population=16, mutation_scale=1.0, method="es")
    state, g = _search(cfg, S, n)
    x = torch.zeros(S, n, dtype=torch.float64)            # at the optimum: no child can win
    for _ in range(10):
        pop = evo.propose(x, unit, state, cfg, g)
        x, took = evo.advance(state, pop, (pop ** 2).sum(-1), cfg)
        assert not took.any()
    torch.testing.assert_close(state.sigma, torch.full((S,), math.exp(-10 * 0.2 / 0.8), dtype=torch.float64))
    assert state.accepted.sum() == 0 and state.generations == 10


def test_cma_through_the_library_reduces_a_convex_quadratic():
    S, n = 4, 5
    cfg = evo.EvolutionConfig(population=12, mutation_scale=0.5, method="cma")
    state, g = _search(cfg, S, n)
    scales = torch.tensor([1.0, 3.0, 10.0, 30.0, 100.0], dtype=torch.float64)    # ill-conditioned
    x = torch.ones(S, n, dtype=torch.float64)
    unit = torch.ones(S, n, dtype=torch.float64)
    f0 = float((scales * x[0] ** 2).sum())
    for _ in range(120):
        pop = evo.propose(x, unit, state, cfg, g)
        x, took = evo.advance(state, pop, (scales * pop ** 2).sum(-1), cfg)
        assert all(float(np.abs(es.mean).max()) == 0.0 for es in state.cma)   # re-centred in place
    f = (scales * x ** 2).sum(-1)
    assert (f < 1e-6 * f0).all(), f
    assert state.accepted.tolist() == [120] * S        # cma moves the router at every generation


def test_select_matches_loop_and_prefers_current_on_ties():
    pop = torch.arange(2 * 4 * 3, dtype=torch.float64).reshape(2, 4, 3)
    obj = torch.tensor([[1.0, 0.5, 0.5, 2.0], [1.0, 1.0, float("nan"), 3.0]])
    best, idx = evo.select(pop, obj)
    assert idx.tolist() == [1, 0]
    for s in range(2):
        torch.testing.assert_close(best[s], pop[s, idx[s]])


@given(st.lists(st.floats(-1e6, 1e6) | st.just(float("nan")) | st.just(float("inf")), min_size=2, max_size=9))
def test_select_never_worse_than_current(values):
    obj = torch.tensor([values], dtype=torch.float64)
    pop = torch.randn(1, len(values), 2)
    _, idx = evo.select(pop, obj)
    chosen, current = obj[0, idx[0]], obj[0, 0]
    if torch.isfinite(current):
        assert chosen <= current
    if torch.isfinite(obj).any():
        assert torch.isfinite(chosen)


def test_mutation_scales_rms_with_floor():
    p = {"W": torch.tensor([[[3.0, -3.0], [3.0, 3.0]], [[0.01, 0.0], [0.0, 0.0]]]),     # (S=2, F=2, K=2)
         "bias": torch.tensor([[0.0, 0.0], [4.0, -4.0]])}
    sc = evo.mutation_scales(p)
    assert sc["W"].shape == (2, 2, 2)
    torch.testing.assert_close(sc["W"][0], torch.full((2, 2), 3.0))
    torch.testing.assert_close(sc["W"][1], torch.ones(2, 2))        # floored
    torch.testing.assert_close(sc["bias"], torch.tensor([[1.0, 1.0], [4.0, 4.0]]))


@pytest.mark.parametrize("field, value, flag", [
    ("population", 1, "--population"), ("mutation_scale", -1.0, "--mutation-scale"), ("interval", 0, "--interval"),
    ("method", "ga", "--evo"), ("damping", 0.0, "damping"),
])
def test_config_validation(field, value, flag):
    with pytest.raises(BadInput) as e:
        evo.EvolutionConfig(**{field: value})
    assert e.value.flag == flag
