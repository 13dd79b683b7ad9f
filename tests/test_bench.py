"""`sandbox bench`: the baselines it times are correct, its FLOP count is exact, and the quick run
reports every figure. No assertion here depends on how long anything took."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sandbox.app.bench import (BenchConfig, dense_domain_losses, interleaved, loop_mixture, mixture_flops, targets)
from sandbox.errors import BadInput


@pytest.fixture
def one_thread():
    """One torch thread while a test runs (2 shared cores), restored afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def test_dense_form_matches_gram_form():
    from sandbox import analytic
    from sandbox.tasks import TaskSpec, make_task, noisy_contexts

    spec = TaskSpec(dim=12, domains=3, slots=5, rank=3, true_rank=2, context_noise=0.3, alignment=0.4)
    cfg = analytic.AnalyticConfig(draws=3)
    task = make_task(spec, [3, 9])
    st = analytic.initial_state(task, spec, cfg)
    rcfg = analytic.router_config(spec, cfg)
    feats = noisy_contexts(task, spec.context_noise, 3, salt=2).to(analytic.DTYPE)          # (S, M, N, F)
    scale = cfg.scale(spec)
    gram = analytic.domain_losses(rcfg, st.params, st.A, st.B, task, feats, 5, scale, 0.01)
    dense = dense_domain_losses(rcfg, st.params, st.A, st.B, task.U.double(), task.V.double(), feats, 5, scale, 0.01)
    torch.testing.assert_close(dense, gram, rtol=1e-10, atol=1e-12)
    # and the dense form itself against an explicit loop over seeds, domains and draws
    from sandbox.router import router_gates

    S, M, N, F = feats.shape
    for s in range(S):
        for m in range(M):
            acc = 0.0
            for n in range(N):
                p = {k: v[s] for k, v in st.params.items()}
                g = router_gates(rcfg, p, feats[s, m, n][None], 5)[0]                        # (K,)
                W = sum(g[k] * scale * st.B[s, k] @ st.A[s, k] for k in range(spec.slots))
                acc += float(((W - task.U[s, m].double() @ task.V[s, m].double()) ** 2).sum())
            assert dense[s, m].item() == pytest.approx(acc / N + 0.01, rel=1e-10)


def test_loop_mixture_matches_bank_values_and_grads(gen):
    from sandbox.adapters import gated_mixture

    N, K, r, d_in, d_out = 7, 4, 3, 6, 5
    x = torch.randn(N, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    A = torch.randn(K, r, d_in, generator=gen, dtype=torch.float64, requires_grad=True)
    B = torch.randn(K, d_out, r, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.rand(N, K, generator=gen, dtype=torch.float64, requires_grad=True)
    y1, y2 = gated_mixture(x, A, B, g, 0.7), loop_mixture(x, A, B, g, 0.7)
    torch.testing.assert_close(y2, y1)
    go = torch.randn(N, d_out, generator=gen, dtype=torch.float64)
    for a, b in zip(torch.autograd.grad(y1, [x, A, B, g], go), torch.autograd.grad(y2, [x, A, B, g], go)):
        torch.testing.assert_close(b, a)


def test_mixture_flops_matches_flop_counter(gen):
    from torch.utils.flop_counter import FlopCounterMode

    N, K, r, d_in, d_out = 32, 4, 2, 16, 8
    x = torch.randn(N, d_in, generator=gen, requires_grad=True)
    A = torch.randn(K, r, d_in, generator=gen, requires_grad=True)
    B = torch.randn(K, d_out, r, generator=gen, requires_grad=True)
    g = torch.rand(N, K, generator=gen, requires_grad=True)
    from sandbox.adapters import gated_mixture

    with FlopCounterMode(display=False) as fc:
        torch.autograd.grad(gated_mixture(x, A, B, g, 1.0), [x, A, B, g], torch.ones(N, d_out))
    assert fc.get_total_flops() == mixture_flops(N, K, r, d_in, d_out)


def test_interleaved_calls_each_candidate_and_takes_medians():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1

    def b():
        calls["b"] += 1

    t = interleaved({"a": a, "b": b}, repeats=5, min_sample_s=0.0, warmup=2)
    # calibration 1 + warm-up 2 + 5 rounds x 1 inner call
    assert calls == {"a": 8, "b": 8}
    for v in t.values():
        assert len(v.samples) == 5 and v.inner == 1
        assert v.best <= v.median and v.median == sorted(v.samples)[2]


def test_interleaved_budget_cuts_rounds_of_slow_comparisons():
    import time as _time

    calls = []
    t = interleaved({"slow": lambda: (calls.append(1), _time.sleep(0.05))}, repeats=50, min_sample_s=0.0, warmup=0,
                    budget_s=0.1)
    assert len(t["slow"].samples) == 3 and len(calls) == 4


def attention_flops_per_token(cfg, seq_len: int, features: str = "hidden") -> float:
    """The attention part of `step_flops_per_token` (scores and weighted sums, full T x T): torch's
    FLOP counter does not see CPU attention, so the tests take it out of the formula."""
    D, T, L = cfg.d_model, seq_len, cfg.n_layer
    skipped = 8 * T * D if cfg.targets == "mlp" else 0
    return 12 * L * T * D + (4 * L * T * D if features == "hidden" else 0) - skipped


@pytest.mark.parametrize("cell,features", [("R", "hidden"), ("B3", "embed")])
def test_cell_step_flops_equal_flop_counter(cell, features, one_thread):
    from torch.utils.flop_counter import FlopCounterMode

    from substrate.bench import make_step, step_flops_per_token

    B, T = 2, 16
    step, st = make_step("tiny", B, T, cell=cell)
    with FlopCounterMode(display=False) as fc:
        loss = step()
    assert math.isfinite(loss) and st.step == 1
    cfg = st.model.cfg
    # the counter sees every matmul of the step but not CPU attention, which is added analytically
    expected = (step_flops_per_token(cfg, T, features) - attention_flops_per_token(cfg, T, features)) * B * T
    assert fc.get_total_flops() == expected


@pytest.mark.parametrize("targets_", ["attn+mlp", "attn", "mlp"])
def test_model_flops_equal_flop_counter_for_every_target_set(targets_, gen, one_thread):
    """The skipped-input-gradient correction for each choice of adapted projections."""
    from torch.utils.flop_counter import FlopCounterMode

    from sandbox.router import Router, RouterConfig
    from substrate.bench import step_flops_per_token
    from substrate.model import build_model, freeze_base, preset, routing_features

    cfg = preset("tiny", targets=targets_)
    B, T = 2, 16
    model = build_model(cfg, 0)
    freeze_base(model)
    router = Router(RouterConfig(kind="sigmoid", n_features=cfg.d_model, n_slots=cfg.slots), generator=gen)
    idx = torch.randint(cfg.vocab, (B, T + 1), generator=gen)
    with FlopCounterMode(display=False) as fc:
        gates = router(routing_features(model, idx[:, :-1], "hidden"), 0)              # (B, T, K)
        _, loss = model(idx[:, :-1], gates, idx[:, 1:])
        loss.backward()
    expected = (step_flops_per_token(cfg, T) - attention_flops_per_token(cfg, T)) * B * T
    assert fc.get_total_flops() == expected


def test_step_updates_adapters_and_router_only(one_thread):
    from substrate.bench import make_step

    step, st = make_step("tiny", 2, 8)
    model, router = st.model, st.router
    base = {k: v.clone() for k, v in model.base_state_dict().items()}
    banks = {k: v.clone() for k, v in model.state_dict().items() if ".bank." in k}
    rparams = {k: v.detach().clone() for k, v in router.named_parameters()}
    losses = [step() for _ in range(3)]
    assert all(math.isfinite(v) for v in losses) and st.step == 3
    for k, v in model.base_state_dict().items():
        torch.testing.assert_close(v, base[k], rtol=0, atol=0)
    assert all(not torch.equal(v, banks[k]) for k, v in model.state_dict().items() if ".bank." in k)
    assert all(not torch.equal(p.detach(), rparams[k]) for k, p in router.named_parameters())


def test_targets_rows():
    res = {"loss": [{"d": 64, "speedup": 4.0}, {"d": 256, "speedup": 2.0}],
           "mixture": [{"D": 256, "loop_over_bank": 6.0, "bank_over_single": 2.0, "layer_bank_over_single": 1.1}],
           "adaptation": [{"preset": "small", "fraction_of_matmul": 0.25}, {"preset": "tiny", "skipped": "x"},
                          {"preset": "widened-1536", "mfu": 0.4}],
           "sweep": {"skipped": "not there"}}
    rows = targets(res)
    met = [(r["case"], r["met"]) for r in rows]
    assert met == [("d=64", True), ("d=256", False), ("D=256", True), ("D=256", False), ("D=256", True),
                   ("small", False), ("widened-1536", True), ("not measured", None)]


def test_config_errors_name_the_flag():
    with pytest.raises(BadInput, match="--repeats"):
        BenchConfig(repeats=0)
    with pytest.raises(BadInput, match="--only"):
        BenchConfig(sections=("loss", "nope"))
    with pytest.raises(BadInput, match="--device"):
        BenchConfig(device="tpu")


def test_cli_bad_flags_exit_2(capsys):
    from sandbox.app.cli import main

    assert main(["bench", "--only", "loss,warp"]) == 2
    assert "--only" in capsys.readouterr().err
    assert main(["bench", "--presets", "huge"]) == 2
    assert "--presets" in capsys.readouterr().err


def _finite_numbers(obj, path="") -> list[str]:
    """Paths of numbers in a JSON tree that are not finite (None counts as not finite)."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _finite_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _finite_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        bad.append(path)
    return bad


def test_quick_json_reports_every_figure(capsys, one_thread):
    from sandbox.app.cli import main

    assert main(["bench", "--quick", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"machine", "config", "loss", "mixture", "adaptation", "sweep", "targets"} <= set(res)
    assert {"cpu", "cores", "torch_threads", "date"} <= set(res["machine"])
    assert [r["d"] for r in res["loss"]] == list(BenchConfig.quick_config().loss_dims)
    for r in res["loss"]:
        assert {"gram_evals_per_s", "dense_evals_per_s", "speedup"} <= set(r) and r["max_rel_diff"] < 1e-9
    assert [r["D"] for r in res["mixture"]] == list(BenchConfig.quick_config().mixture_dims)
    for r in res["mixture"]:
        assert {"bank_s", "loop_s", "single_s", "loop_over_bank", "bank_over_single", "layer_bank_over_single",
                "bank_fraction_of_matmul", "bank_over_single_floor"} <= set(r)
    by = {r["preset"]: r for r in res["adaptation"]}
    assert set(by) == {"tiny", "small", "widened-1536"}
    for name in ("tiny", "small"):
        assert {"tokens_per_s", "flops_per_token", "achieved_flops", "matmul_flops", "fraction_of_matmul"} <= set(by[name])
    assert "skipped" in by["widened-1536"]            # too big for a quick CPU run; says why
    fit = {r["preset"]: r for r in res["fitness"]}
    assert set(fit) == {"tiny", "small"}                # CPU: the presets of `FITNESS_SHAPES`
    for r in fit.values():
        assert {"fitness_batched_s", "fitness_sequential_s", "fitness_speedup", "event_steps_batched",
                "event_steps_sequential", "population_batched_s", "population_sequential_s", "population_speedup",
                "step_fraction_of_matmul"} <= set(r)
        assert r["variants"] == r["slots"] + 1
        assert r["fitness_max_abs_diff"] <= 1e-4 and r["population_max_abs_diff"] <= 1e-4
    assert any(r["target"].startswith("fitness pass: batched losses") for r in res["targets"])
    sw = res["sweep"]
    assert "seed_points_per_s" in sw and "wall_s" in sw and "skipped" not in sw
    gr = res["grid"]
    assert gr["seed_points"] == 11 * 4 and gr["ratio"] == pytest.approx(gr["per_point_s"] / gr["stacked_s"])
    f, b = gr["fixed_s_per_batch"], gr["marginal_s_per_row"]          # the two-timing model f + b n
    assert f + 4 * b == pytest.approx(gr["per_point_s"] / 11) and f + 44 * b == pytest.approx(gr["stacked_s"])
    assert gr["ratio_bound"] == pytest.approx((f + 4 * b) / (4 * b))
    assert any(r["target"].startswith("stacked grid") for r in res["targets"])
    assert _finite_numbers(res) == []
    for row in res["targets"]:
        assert row["met"] in (True, False) or (row["met"] is None and row["value"] is None)
    for k, v in res.items():
        if isinstance(v, list):
            for r in v:
                for x in r.values():
                    if isinstance(x, (int, float)) and not isinstance(x, bool):
                        assert x >= 0


def test_batched_fitness_and_population_equal_sequential_references(one_thread):
    """The lifecycle's leave-one-out pass (K + 1 gate variants folded into the batch) and the search's
    population losses (P routers in one forward) give the losses of one forward per variant."""
    from sandbox import evolution as evo
    from sandbox.router import params_to_vector
    from sandbox.streams import Purpose, generator
    from substrate.bench import _cell_state, sequential_loo_losses, sequential_population_losses
    from substrate.cell import loo_losses
    from substrate.routing import RoutingArms, _search_batch, population_losses

    ccfg, sub, st = _cell_state("tiny", 2, 16, fit_windows=1, slots=4)
    loo_b, full_b, _ = loo_losses(ccfg, st, sub.corpus, 3)
    loo_s, full_s = sequential_loo_losses(ccfg, st, sub.corpus, 3)
    assert loo_b.shape == loo_s.shape == (4, sub.corpus.domains)
    torch.testing.assert_close(loo_b, loo_s, rtol=0, atol=1e-5)
    torch.testing.assert_close(full_b, full_s, rtol=0, atol=1e-5)
    rc = RoutingArms(cell=ccfg, evolution=evo.EvolutionConfig(population=5))
    x, y, dom = _search_batch(rc, sub, Purpose.SEARCH_BATCH, 0)
    vec = params_to_vector({k: v.detach().double()[None] for k, v in st.router.params().items()})
    pop = vec + 0.1 * torch.randn(5, vec.shape[-1], generator=generator(Purpose.EVO_SEARCH, 0), dtype=vec.dtype)
    got = population_losses(rc, st, pop, x, y, dom, sub.corpus.domains)
    ref = sequential_population_losses(rc, st, pop, x, y, dom, sub.corpus.domains)
    assert got.shape == (5,) and not torch.equal(got[0].expand(5), got)      # the members differ
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
