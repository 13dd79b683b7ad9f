"""Evolutionary routing search: population layout, per-parameter scales, elitist selection."""

import pytest
import torch
from hypothesis import given, strategies as st

from sandbox import evolution as evo
from sandbox.errors import BadInput


def _gens(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_propose_member_zero_is_current_and_noise_scaled():
    cfg = evo.EvolutionConfig(population=4001, mutation_scale=0.3)
    x = torch.tensor([[0.0, 1.0, -2.0], [5.0, 5.0, 5.0]])
    sigma = torch.tensor([[1.0, 2.0, 0.5], [1.0, 1.0, 1.0]])
    pop = evo.propose(x, sigma, cfg, _gens([1, 2]))
    assert pop.shape == (2, 4001, 3)
    torch.testing.assert_close(pop[:, 0], x, rtol=0, atol=0)
    noise = pop[:, 1:] - x[:, None]
    sd = noise.std(dim=1)
    torch.testing.assert_close(sd, 0.3 * sigma, rtol=0.06, atol=0)
    torch.testing.assert_close(noise.mean(dim=1), torch.zeros(2, 3), rtol=0, atol=0.05)


def test_propose_per_seed_streams_do_not_depend_on_batch():
    cfg = evo.EvolutionConfig(population=5)
    x, s = torch.zeros(3, 4), torch.ones(3, 4)
    full = evo.propose(x, s, cfg, _gens([7, 8, 9]))
    one = evo.propose(x[1:2], s[1:2], cfg, _gens([8]))
    torch.testing.assert_close(full[1:2], one, rtol=0, atol=0)


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
])
def test_config_validation(field, value, flag):
    with pytest.raises(BadInput) as e:
        evo.EvolutionConfig(**{field: value})
    assert e.value.flag == flag
