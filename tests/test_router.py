"""Routers: gate ranges, floors, bounded temperature, broadcasting against a loop, flat vectors,
the module wrapper, telemetry against numpy/scipy, and slot-permutation invariance of the mixture."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import entropy as scipy_entropy
from torch.testing import assert_close

from sandbox.adapters import gated_mixture
from sandbox.errors import BadInput
from sandbox.router import (
    Router, RouterConfig, floors, gate_rows, gate_telemetry, init_router_params, params_to_vector,
    router_gates, temperature, vector_to_params,
)

finite = st.floats(-30, 30, allow_nan=False)


def random_params(cfg, batch, g, spread=3.0):
    """Parameters far from the init, so the gates leave the middle of their range."""
    p = init_router_params(cfg, batch, g)
    return {k: v + spread * torch.randn(v.shape, generator=g) for k, v in p.items()}


@given(kind=st.sampled_from(["softmax", "sigmoid"]), K=st.integers(1, 6), F=st.integers(1, 5),
       floor_max=st.floats(0, 0.9), step=st.integers(0, 5000), spread=st.floats(0, 50), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=50)
def test_gate_ranges(kind, K, F, floor_max, step, spread, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(kind=kind, n_features=F, n_slots=K, floor_max=floor_max)
    p = random_params(cfg, (2,), g, spread)
    h = torch.randn(2, 7, F, generator=g) * spread
    gates = router_gates(cfg, p, h, step)
    assert gates.shape == (2, 7, K) and torch.isfinite(gates).all()
    if kind == "softmax":
        assert (gates >= 0).all()
        assert_close(gates.sum(-1), torch.ones(2, 7))
    else:
        f = floors(cfg, p)
        assert ((f >= 0) & (f <= floor_max)).all()
        assert (gates >= f.unsqueeze(-2) - 1e-7).all() and (gates <= 1).all()


@given(phi=st.lists(st.floats(-1e4, 1e4, allow_nan=False), min_size=1, max_size=6), floor_max=st.floats(0, 0.99))
def test_floors_bounded(phi, floor_max):
    cfg = RouterConfig(n_slots=len(phi), floor_max=floor_max)
    f = floors(cfg, {"phi": torch.tensor(phi), "bias": torch.zeros(len(phi))})
    assert ((f >= 0) & (f <= floor_max)).all()


@given(schedule=st.sampled_from(["linear", "cosine", "exp"]), t0=st.floats(0.05, 10), t1=st.floats(0.05, 10),
       lo=st.floats(0.05, 3), width=st.floats(0, 5), steps=st.integers(0, 2000))
@settings(max_examples=60)
def test_temperature_within_bounds_at_every_step(schedule, t0, t1, lo, width, steps):
    cfg = RouterConfig(schedule=schedule, tau_start=t0, tau_end=t1, tau_min=lo, tau_max=lo + width, anneal_steps=steps)
    grid = torch.arange(0, 2 * steps + 3)
    taus = temperature(cfg, grid)
    assert (taus >= cfg.tau_min).all() and (taus <= cfg.tau_max).all()
    # the scalar and tensor paths agree; the anneal is monotone between its endpoints
    for s in (0, steps // 2, steps, 2 * steps + 2):
        assert math.isclose(temperature(cfg, s), float(taus[s]), rel_tol=1e-9)
    d = torch.diff(taus)
    assert (d * math.copysign(1, t1 - t0) >= -1e-12).all()


def test_schedule_values():
    cfg = dict(tau_start=2.0, tau_end=0.5, tau_min=0.25, tau_max=4.0, anneal_steps=100)
    lin, cos, exp = (RouterConfig(schedule=s, **cfg) for s in ("linear", "cosine", "exp"))
    assert temperature(lin, 50) == pytest.approx(1.25)
    assert temperature(cos, 50) == pytest.approx(1.25)
    assert temperature(cos, 25) == pytest.approx(0.5 + 1.5 * (1 + math.cos(math.pi / 4)) / 2)
    assert temperature(exp, 50) == pytest.approx(1.0)  # geometric midpoint of 2 and 0.5
    for c in (lin, cos, exp):
        assert temperature(c, 0) == pytest.approx(2.0) and temperature(c, 100) == 0.5 == temperature(c, 10**6)
    clamped = RouterConfig(tau_start=8.0, tau_end=0.1, tau_min=0.25, tau_max=4.0, anneal_steps=10)
    assert temperature(clamped, 0) == 4.0 and temperature(clamped, 10) == 0.25


def test_sigmoid_formula_and_temperature_sharpens(gen):
    cfg = RouterConfig(kind="sigmoid", n_features=3, n_slots=4, anneal_steps=100)
    p = random_params(cfg, (), gen)
    h = torch.randn(5, 3, generator=gen)
    z = h @ p["W"] + p["bias"]
    f = 0.1 * torch.sigmoid(p["phi"])
    assert_close(router_gates(cfg, p, h, 100), f + (1 - f) * torch.sigmoid(z / 0.5))
    # lower temperature pushes the sigmoid part away from 1/2
    early = (router_gates(cfg, p, h, 0) - f) / (1 - f) - 0.5
    late = (router_gates(cfg, p, h, 100) - f) / (1 - f) - 0.5
    assert (late.abs() >= early.abs() - 1e-7).all()


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_broadcast_over_population_matches_loop(kind, gen):
    S, P, N, F, K = 2, 3, 5, 4, 6
    cfg = RouterConfig(kind=kind, n_features=F, n_slots=K)
    p = random_params(cfg, (S, P), gen)
    h = torch.randn(S, 1, N, F, generator=gen)
    gates = router_gates(cfg, p, h, 300)
    assert gates.shape == (S, P, N, K)
    for s in range(S):
        for i in range(P):
            one = {k: v[s, i] for k, v in p.items()}
            assert_close(gates[s, i], router_gates(cfg, one, h[s, 0], 300))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_vector_roundtrip(kind, gen):
    cfg = RouterConfig(kind=kind, n_features=3, n_slots=4)
    p = random_params(cfg, (2, 5), gen)
    vec = params_to_vector(p)
    assert vec.shape == (2, 5, cfg.n_params) and cfg.n_params == 12 + 4 + (4 if kind == "sigmoid" else 0)
    assert_close(vec[..., :12], p["W"].reshape(2, 5, 12))
    back = vector_to_params(vec, cfg)
    assert back.keys() == p.keys() and all(torch.equal(back[k], p[k]) for k in p)
    with pytest.raises(BadInput):
        vector_to_params(vec[..., :-1], cfg)


def test_router_module_matches_functional(gen):
    cfg = RouterConfig(kind="sigmoid", n_features=3, n_slots=4)
    router = Router(cfg, batch_shape=(2,), generator=torch.Generator().manual_seed(5))
    same = init_router_params(cfg, (2,), torch.Generator().manual_seed(5))
    h = torch.randn(2, 7, 3, generator=gen)
    assert_close(router(h, 40), router_gates(cfg, same, h, 40))
    router(h, 40).sum().backward()
    assert all(getattr(router, n).grad is not None for n in ("W", "bias", "phi"))
    router.load_params({k: v + 1 for k, v in same.items()})
    assert_close(router.bias.detach(), same["bias"] + 1)
    assert router.temperature(0) == 2.0 and (router.floors() <= 0.1).all()


def test_telemetry_matches_numpy_and_scipy(gen):
    gates = torch.rand(3, 40, 5, generator=gen, dtype=torch.float64)
    domains = torch.randint(0, 3, (3, 40), generator=gen)
    tel = gate_telemetry(gates, domains, top=2)
    g = gates.reshape(-1, 5).numpy()
    lab = domains.reshape(-1).numpy()
    np.testing.assert_allclose(tel.mean_gate.numpy(), g.mean(0))
    assert tel.entropy == pytest.approx(np.mean(scipy_entropy(g, axis=1)))
    m = g.mean(0)
    assert tel.monopoly == pytest.approx(np.sort(m)[-2:].sum() / m.sum())
    for d in range(3):
        sub = g[lab == d]
        np.testing.assert_allclose(tel.per_domain[d].mean_gate.numpy(), sub.mean(0))
        assert tel.per_domain[d].entropy == pytest.approx(np.mean(scipy_entropy(sub, axis=1)))


def test_telemetry_extremes():
    uniform = gate_telemetry(torch.full((10, 4), 0.25), top=1)
    assert uniform.entropy == pytest.approx(math.log(4)) and uniform.monopoly == pytest.approx(0.25)
    one_hot = torch.zeros(10, 4)
    one_hot[:, 2] = 1
    mono = gate_telemetry(one_hot, top=1)
    assert mono.entropy == pytest.approx(0.0) and mono.monopoly == pytest.approx(1.0)


def test_gate_rows_tidy(gen):
    gates = torch.rand(2, 6, 3, generator=gen)
    domains = torch.tensor([0, 0, 1, 1, 1, 0]).expand(2, 6)
    rows = gate_rows(gates, domains, phase="before", domain_names=["code", "prose"], cell="R")
    assert len(rows) == 2 * 3
    assert set(rows[0]) == {"phase", "domain", "slot", "mean_gate", "cell"}
    assert {r["domain"] for r in rows} == {"code", "prose"}
    prose0 = next(r for r in rows if r["domain"] == "prose" and r["slot"] == 0)
    assert prose0["mean_gate"] == pytest.approx(float(gates[:, 2:5, 0].mean()))
    assert [r["domain"] for r in gate_rows(gates)] == ["all"] * 3


@given(kind=st.sampled_from(["softmax", "sigmoid"]), K=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=25)
def test_permuting_slots_with_router_columns_leaves_output(kind, K, seed):
    g = torch.Generator().manual_seed(seed)
    cfg = RouterConfig(kind=kind, n_features=3, n_slots=K)
    p = random_params(cfg, (2,), g)
    A = torch.randn(2, K, 2, 5, generator=g)
    B = torch.randn(2, K, 4, 2, generator=g)
    h = torch.randn(2, 6, 3, generator=g)
    x = torch.randn(2, 6, 5, generator=g)
    y = gated_mixture(x, A, B, router_gates(cfg, p, h, 10), 0.5)
    perm = torch.randperm(K, generator=g)
    pp = {k: v[..., perm] for k, v in p.items()}  # slot axis is last for every router parameter
    y_perm = gated_mixture(x, A[:, perm], B[:, perm], router_gates(cfg, pp, h, 10), 0.5)
    assert_close(y_perm, y, atol=1e-5, rtol=1e-5)


def test_config_validation_names_flags():
    with pytest.raises(BadInput, match="--router"):
        RouterConfig(kind="topk")
    with pytest.raises(BadInput, match="--tau-min"):
        RouterConfig(tau_min=5.0, tau_max=4.0)
    with pytest.raises(BadInput, match="--floor-max"):
        RouterConfig(floor_max=1.5)
    with pytest.raises(BadInput, match="schedule"):
        RouterConfig(schedule="step")


# --- fair starts: --router-init mass --------------------------------------------------

@pytest.mark.parametrize("K,floor_max,tau_start,mass", [(16, 0.1, 2.0, 1.0), (4, 0.1, 2.0, 1.0), (64, 0.1, 0.5, 1.0),
                                                       (16, 0.0, 2.0, 1.0), (16, 0.5, 1.0, 3.0), (2, 0.9, 4.0, 1.5)])
def test_mass_init_total_gate_weight_matches_target(K, floor_max, tau_start, mass):
    """At step 0 the total gate weight per token is the target (1 = the softmax's) on real, unit-scale
    features, for any K, floor and temperature; zero keeps the old bias-0 start (about K (1 + f) / 2)."""
    g = torch.Generator().manual_seed(K)
    F = 32
    cfg = RouterConfig(kind="sigmoid", n_features=F, n_slots=K, floor_max=floor_max, tau_start=tau_start,
                       init="mass", init_mass=mass)
    h = torch.randn(4096, F, generator=g)                               # features of RMS 1
    total = router_gates(cfg, init_router_params(cfg, (), g), h, 0).sum(-1)  # (N,)
    assert abs(float(total.mean()) - mass) < 0.01 * mass
    soft = RouterConfig(kind="softmax", n_features=F, n_slots=K, init="mass")
    assert_close(router_gates(soft, init_router_params(soft, (), g), h, 0).sum(-1), torch.ones(4096))
    zero = RouterConfig(kind="sigmoid", n_features=F, n_slots=K, floor_max=floor_max, tau_start=tau_start)
    f = floor_max / 2
    assert abs(float(router_gates(zero, init_router_params(zero, (), g), h, 0).sum(-1).mean()) - K * (f + (1 - f) / 2)) < 0.02 * K


def test_mass_init_keeps_floor_in_bounds_and_w_draw():
    from sandbox.router import mass_init

    cfg = RouterConfig(kind="sigmoid", n_features=3, n_slots=16, init="mass")   # floors alone: 16 x 0.05 = 0.8 > 1/2
    bias, phi = mass_init(cfg)
    assert abs(16 * 0.1 / (1 + math.exp(-phi)) - 0.5) < 1e-12                    # floors carry half the mass
    low = RouterConfig(kind="sigmoid", n_features=3, n_slots=4, init="mass")     # 4 x 0.05 = 0.2 <= 1/2: floor kept
    assert mass_init(low)[1] == 0.0
    zero = RouterConfig(kind="sigmoid", n_features=3, n_slots=16)
    assert mass_init(zero) == (0.0, 0.0)
    a = init_router_params(cfg, (2,), torch.Generator().manual_seed(5))
    b = init_router_params(zero, (2,), torch.Generator().manual_seed(5))
    assert torch.equal(a["W"], b["W"]) and torch.equal(b["bias"], torch.zeros(2, 16))


def test_router_init_errors_name_the_flag():
    with pytest.raises(BadInput, match="--router-init"):
        RouterConfig(init="uniform")
    with pytest.raises(BadInput, match="init_mass"):
        RouterConfig(n_slots=4, init="mass", init_mass=4.0)


# --- the anneal and the fair start: --tau-scales ----------------------------------------

def _anneal_gates(tau_scales, step, spread=1.0):
    """A K = 16 sigmoid router with the fair start, annealed 2 -> 0.5 over 100 steps, on unit-RMS features;
    W scaled up by `spread` so the gates depend on the input (a router that has learnt something)."""
    cfg = RouterConfig(kind="sigmoid", n_features=8, n_slots=16, init="mass", anneal_steps=100, tau_scales=tau_scales)
    g = torch.Generator().manual_seed(11)
    p = init_router_params(cfg, (), g)
    p["W"] = p["W"] * spread
    h = torch.randn(2048, 8, generator=g)
    gates = router_gates(cfg, p, h, step)
    return gates, floors(cfg, p)


def test_input_tau_scales_keeps_the_gates_open_through_the_anneal():
    from sandbox.gatestats import token_stats

    # the earlier behaviour: the fair start's bias (2 logit(1/31) = -6.8) is divided by tau = 0.5 at the
    # end: every gate sits on its floor (input-dependent part ~1e-6 per slot), whatever W says
    end_logit = token_stats(*_anneal_gates("logit", 100, spread=10.0))
    assert end_logit["open"] < 16 * 1e-4 and end_logit["spread"] < 1e-3
    assert abs(end_logit["mass"] - 0.5) < 1e-3                           # 16 floors of 1/32
    # tau divides only h W: the start's total of 1 (half floors, half open) holds through the anneal...
    start, end = (token_stats(*_anneal_gates("input", s)) for s in (0, 100))
    assert abs(start["mass"] - 1.0) < 0.01 and abs(end["mass"] - 1.0) < 0.02
    assert start["open"] > 0.49 and end["open"] > 0.48
    # ... and the anneal sharpens the input-dependent part instead of closing it (tau 2 -> 0.5: ~4x)
    s0, s1 = (token_stats(*_anneal_gates("input", s, spread=10.0))["spread"] for s in (0, 100))
    assert s1 > 2 * s0 > 0 and s1 > 50 * end_logit["spread"]
    # at step 0 both start from the same gates (the same total, the same W draw)
    assert_close(_anneal_gates("logit", 0)[0], _anneal_gates("input", 0)[0], rtol=1e-5, atol=1e-6)


def test_tau_scales_default_is_the_earlier_router():
    from sandbox.router import mass_init

    cfg = RouterConfig(kind="sigmoid", n_features=3, n_slots=16, init="mass")
    assert cfg.tau_scales == "logit"
    bias, phi = mass_init(cfg)
    assert bias == pytest.approx(2.0 * math.log((1 / 32) / (1 - 1 / 32) / (1 - (1 / 32) / (1 - 1 / 32))))
    assert mass_init(RouterConfig(kind="sigmoid", n_features=3, n_slots=16, init="mass", tau_scales="input"))[0] == \
        pytest.approx(bias / 2.0)                                        # no tau(0) factor
    with pytest.raises(BadInput, match="--tau-scales"):
        RouterConfig(tau_scales="bias")
