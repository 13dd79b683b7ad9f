"""Analytic sandbox: Gram form vs dense vs Monte Carlo, leave-one-out, solvers and their pairing."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sandbox import analytic as an
from sandbox import evolution as evo
from sandbox.errors import BadInput
from sandbox.router import router_gates
from sandbox.tasks import Task, TaskSpec, make_task

from helpers import gram_terms_einsum



SPEC = TaskSpec(domains=3, slots=5, dim=10, rank=3, true_rank=2, context_dim=6, alignment=0.6)
FAST = dict(steps=30, interval=10, population=6)


def solve(task, spec, cfg, arm, state=None) -> an.ArmResult:
    """One arm for every seed of `task` (one grid point) from a given state, through `solve_rows`."""
    res = an.solve_rows(an.stack_rows([(spec, cfg, task.seeds)], tasks=[task]), arm, state)
    for e in res.events:
        e.pop("row", None)
    return res


def _bank(gen, S=2, K=5, r=3, d=10):
    A = torch.randn(S, K, r, d, generator=gen, dtype=torch.float64) / 3
    B = torch.randn(S, K, d, r, generator=gen, dtype=torch.float64) / 3
    return A, B


def _dense_loss(gates, A, B, D, scale):
    """Oracle: form W = sum_k g_k s B_k A_k (d x d) and ||W - D_m||_F^2, looping over k."""
    W = 0
    for k in range(A.shape[-3]):
        W = W + gates[..., k, None, None] * scale * (B[..., k, :, :] @ A[..., k, :, :])
    return ((W - D) ** 2).sum((-1, -2))


def test_gram_loss_matches_dense(gen):
    task = make_task(SPEC, [1, 2])
    A, B = _bank(gen)
    U, V = task.U.double(), task.V.double()
    G, c, e = an.gram_terms(A, B, U, V, scale=0.7)
    gates = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)       # (S, M, N, K)
    got = an.quadratic_loss(gates, G, c, e)                                   # (S, M, N)
    D = (U @ V)[:, :, None]                                                   # (S, M, 1, d, d)
    want = _dense_loss(gates, A[:, None, None], B[:, None, None], D, 0.7)
    torch.testing.assert_close(got, want)
    # with a population dim: bank (S, 1) against gates (S, P)
    gp = torch.rand(2, 7, 3, 4, 5, generator=gen, dtype=torch.float64)
    got_p = an.quadratic_loss(gp, G[:, None], c[:, None], e[:, None])
    want_p = _dense_loss(gp, A[:, None, None, None], B[:, None, None, None], D[:, None], 0.7)
    torch.testing.assert_close(got_p, want_p)


def test_gram_loss_matches_monte_carlo(gen):
    """E_x ||(W - D) x||^2 over x ~ N(0, I) equals the closed form (isotropic inputs)."""
    task = make_task(SPEC, [3])
    A, B = _bank(gen, S=1)
    U, V = task.U.double(), task.V.double()
    G, c, e = an.gram_terms(A, B, U, V, scale=1.0)
    gates = torch.rand(1, 3, 1, 5, generator=gen, dtype=torch.float64)
    closed = an.quadratic_loss(gates, G, c, e)[0, :, 0]                       # (M,)
    W = (gates[0, :, 0, :, None, None] * (B[0] @ A[0])).sum(1)                # (M, d, d)
    err = W - (U @ V)[0]                                                      # (M, d, d)
    x = torch.randn(200_000, 10, generator=gen, dtype=torch.float64)          # (n, d)
    sq = ((x @ err.transpose(-1, -2)) ** 2).sum(-1)                           # (M, n)
    mc, se = sq.mean(-1), sq.std(-1) / math.sqrt(x.shape[0])
    assert ((mc - closed).abs() < 4 * se).all(), (mc, closed, se)
    assert ((mc - closed).abs() / closed < 0.02).all()


def test_gram_terms_match_einsum_form_and_gradients(gen):
    """The batched-matmul Gram terms and their hand-written backward equal autograd through the
    einsum form, for a plain bank, a bank stored transposed (the solver's layout), broadcast
    batch dims and a per-row scale; gradcheck confirms the backward against finite differences."""
    task = make_task(SPEC, [1, 2])
    U, V = task.U.double(), task.V.double()
    A, B = _bank(gen)
    gG = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    gc = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    for layout in ("plain", "transposed"):
        a = A.clone().requires_grad_(True)
        bt = B.transpose(-1, -2).contiguous().requires_grad_(True)
        b = bt.transpose(-1, -2) if layout == "transposed" else B.clone().requires_grad_(True)
        G, c, e = an.gram_terms(a, b, U, V, 0.7)
        G0, c0, e0 = gram_terms_einsum(a, b, U, V, 0.7)
        for x, y in ((G, G0), (c, c0), (e, e0)):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-13)
        leaf_b = bt if layout == "transposed" else b
        got = torch.autograd.grad((G * gG).sum() + (c * gc).sum(), (a, leaf_b))
        want = torch.autograd.grad((G0 * gG).sum() + (c0 * gc).sum(), (a, leaf_b))
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # a population dim broadcast against one teacher per seed, and a per-row scale
    Ap = A[:, None].expand(2, 4, *A.shape[1:]).contiguous()
    G, c, _ = an.gram_terms(Ap, B[:, None], U[:, None], V[:, None], torch.tensor([0.5, 2.0]))
    for i, s in enumerate((0.5, 2.0)):
        G0, c0, _ = gram_terms_einsum(A[i], B[i], U[i], V[i], s)
        torch.testing.assert_close(G[i], G0.expand(4, 5, 5), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(c[i], c0.expand(4, 3, 5), rtol=1e-13, atol=1e-13)
    a = A[:1].clone().requires_grad_(True)
    b = B[:1].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: an.gram_terms(x, y, U[:1], V[:1], 0.9)[:2], (a, b))


@given(K=st.integers(1, 6), r=st.integers(1, 4), d=st.integers(1, 9), M=st.integers(1, 3), rs=st.integers(1, 3),
       batch=st.sampled_from([(), (2,), (2, 3)]), transposed=st.booleans(), seed=st.integers(0, 2**16))
def test_gram_terms_match_einsum_form_for_any_shape(K, r, d, M, rs, batch, transposed, seed):
    """Every shape (a slot, rank 1, d = 1, one domain, r* > r, no batch dim or two): the batched
    matmul form, its hand-written backward and the task route (`task_terms`) equal the einsum form."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, K, r, d, generator=g, dtype=torch.float64).requires_grad_(True)
    bt = torch.randn(*batch, K, r, d, generator=g, dtype=torch.float64).requires_grad_(True)
    B = bt.transpose(-1, -2) if transposed else bt.transpose(-1, -2).contiguous()
    U = torch.randn(*batch, M, d, rs, generator=g, dtype=torch.float64)
    V = torch.randn(*batch, M, rs, d, generator=g, dtype=torch.float64)
    wG = torch.randn(*batch, K, K, generator=g, dtype=torch.float64)
    wc = torch.randn(*batch, M, K, generator=g, dtype=torch.float64)
    got, want = an.gram_terms(A, B, U, V, 0.8), gram_terms_einsum(A, B, U, V, 0.8)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    dg = torch.autograd.grad((got[0] * wG).sum() + (got[1] * wc).sum(), (A, bt))
    dw = torch.autograd.grad((want[0] * wG).sum() + (want[1] * wc).sum(), (A, bt))
    for x, y in zip(dg, dw):
        torch.testing.assert_close(x, y, rtol=1e-11, atol=1e-11)
    if len(batch) == 1:                       # a task's teachers (S, M, ...), read once per task
        task = Task(U=U, V=V, contexts=torch.zeros(2, M, 1), assignment=torch.zeros(2, M, dtype=torch.long),
                       seeds=(0, 1))
        for x, y in zip(an.task_terms(A, B, task, 0.8), want):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_leave_one_out_matches_zeroed_gates(gen):
    task = make_task(SPEC, [1, 2])
    A, B = _bank(gen)
    G, c, e = an.gram_terms(A, B, task.U.double(), task.V.double(), 0.5)
    gates = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    loo = an.leave_one_out(gates, G, c, e)                                    # (S, M, N, K)
    for k in range(5):
        g = gates.clone()
        g[..., k] = 0
        torch.testing.assert_close(loo[..., k], an.quadratic_loss(g, G, c, e))


def test_gram_gradient_matches_dense(gen):
    task = make_task(SPEC, [5])
    A, B = _bank(gen, S=1)
    A.requires_grad_(True)
    B.requires_grad_(True)
    gates = torch.rand(1, 3, 2, 5, generator=gen, dtype=torch.float64)
    G, c, e = an.gram_terms(A, B, task.U.double(), task.V.double(), 1.3)
    ga = torch.autograd.grad(an.quadratic_loss(gates, G, c, e).sum(), (A, B))
    D = (task.U.double() @ task.V.double())[:, :, None]
    gd = torch.autograd.grad(_dense_loss(gates, A[:, None, None], B[:, None, None], D, 1.3).sum(), (A, B))
    for x, y in zip(ga, gd):
        torch.testing.assert_close(x, y)


def test_domain_losses_match_router_and_dense():
    cfg = an.AnalyticConfig(**FAST, loss_floor=0.0)
    task = make_task(SPEC, [4, 9])
    st = an.initial_state(task, SPEC, cfg)
    rcfg = an.router_config(SPEC, cfg)
    feats = task.contexts[:, :, None].double()                                # (S, M, 1, F)
    got = an.domain_losses(rcfg, st.params, st.A, st.B, task, feats, 0, cfg.scale(SPEC))
    gates = router_gates(rcfg, st.params, feats[:, :, 0])                     # (S, M, K)
    D = (task.U @ task.V).double()                                            # (S, M, d, d)
    want = _dense_loss(gates, st.A[:, None], st.B[:, None], D, cfg.scale(SPEC))
    torch.testing.assert_close(got, want)


def test_both_arms_share_task_and_initial_weights():
    cfg = an.AnalyticConfig(**FAST)
    res = an.run_arms(SPEC, cfg, [10, 11, 12])
    torch.testing.assert_close(res["grad"].initial_loss, res["evo"].initial_loss, rtol=0, atol=0)
    # with no generation inside the budget the evo arm IS the grad arm, bit for bit
    quiet = an.AnalyticConfig(steps=30, interval=31, population=6)
    r2 = an.run_arms(SPEC, quiet, [10, 11, 12])
    torch.testing.assert_close(r2["grad"].final_loss, r2["evo"].final_loss, rtol=0, atol=0)
    assert r2["evo"].loss_evals == r2["grad"].loss_evals == 30
    # initial state is a pure function of (spec, seed)
    task = make_task(SPEC, [10, 11, 12])
    s1, s2 = an.initial_state(task, SPEC, cfg), an.initial_state(task, SPEC, cfg)
    for k in s1.params:
        torch.testing.assert_close(s1.params[k], s2.params[k], rtol=0, atol=0)
    torch.testing.assert_close(s1.A, s2.A, rtol=0, atol=0)


@pytest.mark.parametrize("kw", [dict(), dict(router="sigmoid", plasticity=0.0), dict(context_noise=0.3, fresh_noise=True)])
def test_batched_seeds_match_one_seed_at_a_time(kw):
    spec_kw = {k: v for k, v in kw.items() if k == "context_noise"}
    spec = TaskSpec(**{**SPEC.__dict__, **spec_kw})
    cfg = an.AnalyticConfig(**FAST, **{k: v for k, v in kw.items() if k not in spec_kw}, draws=3, eval_draws=5)
    seeds = [3, 1, 4]
    both = an.run_arms(spec, cfg, seeds)
    for i, s in enumerate(seeds):
        one = an.run_arms(spec, cfg, [s])
        for arm in an.ARMS:
            torch.testing.assert_close(both[arm].final_loss[i:i + 1], one[arm].final_loss, rtol=1e-10, atol=1e-12)


def test_generation_never_worsens_search_objective():
    cfg = an.AnalyticConfig(**FAST, plasticity=0.0)
    task = make_task(SPEC, [1, 2, 3, 4])
    st = an.initial_state(task, SPEC, cfg)
    rcfg = an.router_config(SPEC, cfg)
    feats = task.contexts[:, :, None].double()
    scale = cfg.scale(SPEC)
    tensors = dict(st.params)
    before = an.domain_losses(rcfg, tensors, st.A, st.B, task, feats, 5, scale).mean(-1)
    gens = [torch.Generator().manual_seed(s) for s in task.seeds]
    search = evo.init_search(cfg.evolution, 4, rcfg.n_params, gens)
    run = an.Solver(task=task, rcfg=rcfg, cfg=dataclasses.replace(cfg, accept_tol=0.0), evolution=cfg.evolution,
                    state=st, tensors=tensors, scale=scale)
    took, gain = an._generation(run, feats, 5, search, gens, torch.ones(4, dtype=torch.bool))
    after = an.domain_losses(rcfg, tensors, st.A, st.B, task, feats, 5, scale).mean(-1)
    assert (after <= before).all()
    assert ((after < before) == took).all()
    torch.testing.assert_close(gain, before - after, rtol=1e-12, atol=1e-15)   # the reported gain is the real one


def test_divergence_is_recorded_not_raised():
    cfg = an.AnalyticConfig(**FAST)
    task = make_task(SPEC, [1, 2])
    st = an.initial_state(task, SPEC, cfg)
    st.params["W"][1, 0, 0] = float("nan")
    for arm in an.ARMS:
        r = solve(task, SPEC, cfg, arm, st)
        assert r.diverged.tolist() == [False, True]
        assert r.diverged_step.tolist() == [-1, 0]
        assert math.isfinite(r.final_loss[0]) and math.isnan(r.final_loss[1])
    rows = an.result_rows({"grad": r}, [1, 2])
    assert rows[1]["diverged"] and math.isnan(rows[1]["log_loss"])


def test_evals_budget_matches_counts():
    cfg = an.AnalyticConfig(**FAST, budget="evals")
    res = an.run_arms(SPEC, cfg, [1])
    n = an.evo_evaluations(SPEC, cfg)
    assert n == 30 + 3 * 6
    assert res["evo"].loss_evals == n and res["grad"].loss_evals == n
    assert res["grad"].grad_steps == n and res["evo"].grad_steps == 30


def test_lifecycle_runs_and_counts():
    cfg = an.AnalyticConfig(**FAST, lifecycle=True)
    res = an.run_arms(SPEC, cfg, [1, 2])
    evo = res["evo"]
    assert evo.loss_evals == an.evo_evaluations(SPEC, cfg) == 30 + 3 * 6 + 2 * (5 + 1)
    assert torch.isfinite(evo.final_loss).all()
    assert {e["event"] for e in evo.events} >= {"death", "birth"}
    assert {e["seed"] for e in evo.events} <= {1, 2}


@pytest.mark.parametrize("kw", [dict(), dict(plasticity=0.0, scope="global"), dict(router="sigmoid")])
def test_lifecycle_seed_is_independent_of_its_batch(kw):
    """With the lifecycle on, seed 1 computed among seeds 0, 1, 2 equals seed 1 alone, for both arms
    and its events: each seed draws its lifecycle noise from its own generator. Discrete outcomes
    (who dies, who is born from whom, the target domain) must match exactly; losses to float
    rounding, since batched float64 matmuls may round differently by batch size (about 1e-16
    relative; a shared lifecycle generator gave differences near 1e-2)."""
    cfg = an.AnalyticConfig(**FAST, lifecycle=True, **kw)
    both, one = an.run_arms(SPEC, cfg, [0, 1, 2]), an.run_arms(SPEC, cfg, [1])
    for arm in ("grad", "evo"):
        for name in ("final_loss", "domain_loss", "curve"):
            torch.testing.assert_close(getattr(both[arm], name)[1:2], getattr(one[arm], name), rtol=1e-12, atol=0)
        assert torch.equal(both[arm].diverged_step[1:2], one[arm].diverged_step)
    mine = [e for e in both["evo"].events if e["seed"] == 1]
    assert len(mine) >= 4 and {e["event"] for e in mine} >= {"death", "birth"}
    floats = ("fitness", "mutation_size")
    discrete = lambda evs: [{k: v for k, v in e.items() if k not in floats} for e in evs]  # noqa: E731
    assert discrete(mine) == discrete(one["evo"].events)
    for key in floats:
        got = torch.tensor([e[key] for e in mine], dtype=torch.float64)
        torch.testing.assert_close(got, torch.tensor([e[key] for e in one["evo"].events], dtype=torch.float64),
                                   rtol=1e-9, atol=1e-12, equal_nan=True)
    # the lifecycle noise is a pure function of (seed, step), different across seeds and steps
    draw = lambda s, t: torch.rand(3, generator=an.lifecycle_generator(s, t))  # noqa: E731
    assert torch.equal(draw(1, 10), draw(1, 10))
    assert not torch.equal(draw(1, 10), draw(2, 10)) and not torch.equal(draw(1, 10), draw(1, 20))


def test_gradient_training_reduces_loss():
    cfg = an.AnalyticConfig(steps=60, interval=20, population=4)
    res = an.run_arms(SPEC, cfg, [1, 2, 3])
    assert (res["grad"].final_loss < res["grad"].initial_loss).all()


@pytest.mark.parametrize("field, value, flag", [
    ("steps", -1, "--steps"), ("lr", 0.0, "--lr"), ("plasticity", -0.5, "--plasticity"),
    ("router", "tanh", "--router"), ("population", 1, "--population"), ("mutation_scale", 0.0, "--mutation-scale"),
    ("interval", 0, "--interval"), ("budget", "flops", "--budget"), ("scope", "local", "--scope"),
    ("loss_floor", -1.0, "--loss-floor"), ("evo", "ga", "--evo"), ("oracle", "best", "--oracle"),
    ("reset_on_accept", "yes", "--reset-on-accept"), ("lora_alpha", 1e200, "--lora-alpha"),
])
def test_config_validation_names_flag(field, value, flag):
    with pytest.raises(BadInput) as e:
        an.AnalyticConfig(**{field: value})
    assert e.value.flag == flag


# ---------------------------------------------------------------------------------------------
# The decomposition: control arms, common random numbers, a known answer


@pytest.mark.parametrize("evo_method", ["es", "cma", "fixed"])
def test_common_random_numbers_across_all_four_arms(evo_method):
    """Every arm starts from the same task and weights; arms that make no change on an event are
    the grad arm bit for bit (restart before its first event, evo with no generation in budget)."""
    cfg = an.AnalyticConfig(**FAST, evo=evo_method)
    res = an.run_arms(SPEC, cfg, [10, 11, 12])
    for arm in an.ARMS:
        torch.testing.assert_close(res[arm].initial_loss, res["grad"].initial_loss, rtol=0, atol=0)
        if arm != "beta2":       # the optimiser control differs from its first step on, by design
            torch.testing.assert_close(res[arm].curve[:, :10], res["grad"].curve[:, :10], rtol=0, atol=0)
    torch.testing.assert_close(res["beta2"].curve[:, 0], res["grad"].curve[:, 0], rtol=0, atol=0)
    # the ceiling arm follows the grad trajectory exactly
    torch.testing.assert_close(res["oracle"].curve, res["grad"].curve, rtol=0, atol=0)
    quiet = an.AnalyticConfig(steps=30, interval=31, population=6, evo=evo_method)
    r2 = an.run_arms(SPEC, quiet, [10, 11, 12])
    for arm in ("evo", "restart"):
        torch.testing.assert_close(r2[arm].final_loss, r2["grad"].final_loss, rtol=0, atol=0)
        assert r2[arm].generations == 0


def test_evo_without_acceptance_equals_grad_and_is_counted():
    """A search that never accepts leaves evo == grad bit for bit (state kept), and says so."""
    cfg = an.AnalyticConfig(**FAST, evo="fixed", mutation_scale=50.0, plasticity=0.0)
    res = an.run_arms(SPEC, cfg, [1, 2])
    assert res["evo"].generations == 3 and res["evo"].accepted.tolist() == [0, 0]
    torch.testing.assert_close(res["evo"].final_loss, res["grad"].final_loss, rtol=0, atol=0)
    rows = an.result_rows(res, [1, 2])
    assert {r["accepted"] for r in rows if r["arm"] == "evo"} == {0.0}


def test_restart_resets_and_reset_on_accept_changes_evo():
    cfg = an.AnalyticConfig(**FAST)
    res = an.run_arms(SPEC, cfg, [1, 2])
    assert res["restart"].generations == 3
    assert not torch.equal(res["restart"].final_loss, res["grad"].final_loss)
    assert (res["evo"].accepted > 0).any()
    reset = an.run_arms(SPEC, an.AnalyticConfig(**FAST, reset_on_accept=True), [1, 2], arms=("evo",))
    assert not torch.equal(reset["evo"].final_loss, res["evo"].final_loss)


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_oracle_is_a_ceiling_for_the_grad_adapters(router):
    cfg = an.AnalyticConfig(**FAST, router=router)
    res = an.run_arms(SPEC.__class__(**{**SPEC.__dict__, "context_noise": 0.3}), cfg, [1, 2, 3],
                      arms=("grad", "oracle"))
    assert (res["oracle"].final_loss <= res["grad"].final_loss + 1e-12).all()


def test_decomposition_known_answer_with_frozen_adapters():
    """Frozen adapters: at a = 1 the best routing is far below the gradient router after a short
    budget (room > eps); at a = 0 the random adapters leave nothing to route to (room < eps)."""
    cfg = an.AnalyticConfig(steps=60, interval=10, population=8, plasticity=0.0)
    spec = TaskSpec()
    room = {}
    for a in (0.0, 1.0):
        res = an.run_arms(TaskSpec(**{**spec.__dict__, "alignment": a}), cfg, [0, 1, 2, 3], arms=("grad", "oracle"))
        room[a] = (res["grad"].final_loss.log() - res["oracle"].final_loss.log())
    assert (room[1.0] > 0.01).all(), room[1.0]
    assert (room[0.0].abs() < 0.01).all(), room[0.0]


# ---------------------------------------------------------------------------------------------
# Grid points stacked on the batch dimension


def _points(kw=None):
    kw = kw or {}
    base_cfg = an.AnalyticConfig(**FAST, **kw)
    pts = []
    for a, p, lr, ms, fl, la, ov in [(0.0, 0.1, 0.05, 0.1, 0.01, 4.0, 0.0), (0.6, 0.3, 0.02, 0.3, 0.0, 2.0, 0.3),
                                     (1.0, 0.05, 0.1, 0.05, 0.05, 8.0, 0.6)]:
        spec = TaskSpec(**{**SPEC.__dict__, "alignment": a, "overlap": ov})
        cfg = an.AnalyticConfig(**{**base_cfg.__dict__, "plasticity": p, "lr": lr, "mutation_scale": ms,
                                  "loss_floor": fl, "lora_alpha": la})
        pts.append((spec, cfg, [3, 1, 4][: 2 + len(pts) % 2]))
    return pts


@pytest.mark.parametrize("kw", [dict(), dict(lifecycle=True), dict(evo="cma"), dict(evo="fixed", router="sigmoid"),
                                dict(budget="evals")])
def test_stacked_points_equal_each_point_alone(kw):
    """Points that differ in every per-row knob, solved as one batch, give what each gives alone:
    the discrete outcomes (acceptances, lifecycle events) exactly, the losses to float rounding
    (batched float64 matmuls may round differently by batch size, ~1e-16 relative)."""
    pts = _points(kw)
    assert len({an.group_key(s, c) for s, c, _ in pts}) == 1
    together = an.run_points(pts)
    for (spec, cfg, seeds), got in zip(pts, together):
        alone = an.run_arms(spec, cfg, seeds)
        for arm in an.ARMS:
            for name in ("final_loss", "initial_loss", "curve", "domain_loss"):
                torch.testing.assert_close(getattr(got[arm], name), getattr(alone[arm], name), rtol=1e-10, atol=1e-13)
            assert got[arm].generations == alone[arm].generations and got[arm].loss_evals == alone[arm].loss_evals
            if alone[arm].accepted is not None:
                assert torch.equal(got[arm].accepted, alone[arm].accepted)
            strip = lambda evs: [{k: v for k, v in e.items() if k not in ("fitness", "mutation_size")} for e in evs]  # noqa: E731
            assert strip(got[arm].events) == strip(alone[arm].events)


def test_noisy_points_stack_and_shape_changing_points_form_groups():
    noisy = [(TaskSpec(**{**SPEC.__dict__, "context_noise": z}), an.AnalyticConfig(**FAST, draws=3, eval_draws=4), [5, 6])
             for z in (0.1, 0.4)]
    quiet = (TaskSpec(**{**SPEC.__dict__, "context_noise": 0.0}), an.AnalyticConfig(**FAST), [5, 6])
    bigger = (TaskSpec(**{**SPEC.__dict__, "slots": 6}), an.AnalyticConfig(**FAST), [5])
    pts = noisy + [quiet, bigger]
    assert len({an.group_key(s, c) for s, c, _ in pts}) == 3
    calls = []
    got = an.run_points(pts, on_chunk=lambda idx, res: calls.append(idx))
    assert sorted(map(sorted, calls)) == [[0, 1], [2], [3]]
    for (spec, cfg, seeds), res in zip(pts, got):
        alone = an.run_arms(spec, cfg, seeds)
        torch.testing.assert_close(res["evo"].final_loss, alone["evo"].final_loss, rtol=1e-10, atol=1e-13)
    # chunks bound the rows per batch: 2 rows per chunk -> one point per chunk
    calls.clear()
    an.run_points(noisy, chunk_rows=2, on_chunk=lambda idx, res: calls.append(idx))
    assert calls == [[0], [1]]


@pytest.mark.parametrize("budget", ["steps", "evals"])
def test_ceiling_taken_from_the_grad_run_equals_the_oracle_arm_run_alone(budget):
    """run_points reads the ceiling off the grad arm's final adapters instead of repeating its steps;
    that is the oracle arm solved on its own, bit for bit."""
    cfg = an.AnalyticConfig(**FAST, budget=budget)
    res = an.run_arms(SPEC, cfg, [4, 5])
    task = make_task(SPEC, [4, 5])
    alone = solve(task, SPEC, cfg, "oracle", an.initial_state(task, SPEC, cfg))
    for name in ("final_loss", "domain_loss", "initial_loss", "curve", "diverged_step"):
        torch.testing.assert_close(getattr(res["oracle"], name), getattr(alone, name), rtol=0, atol=0)
    assert res["oracle"].loss_evals == alone.loss_evals and res["oracle"].grad_steps == alone.grad_steps


def test_both_maps_read_their_arms_off_one_list():
    """One arm list (`sandbox.arms`): the analytic map runs all of it, the transformer map all but the
    beta2 control, both in its order (the order of results.csv) with acar last."""
    from sandbox import arms
    from substrate import routing

    assert an.ALL_ARMS == arms.ALL_ARMS and an.ARMS == arms.ALL_ARMS[:-1]
    assert routing.ALL_ARMS == tuple(a for a in arms.ALL_ARMS if a != "beta2")
    assert routing.ARMS == routing.ALL_ARMS[:-1] and arms.ALL_ARMS[-1] == "acar"
    assert an.AnalyticConfig(acar=True).arms == an.ALL_ARMS and an.AnalyticConfig().arms == an.ARMS
