"""`sandbox fusion`: the divergence and gain definitions, the fit, the baselines and a resumed run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from substrate.fusion import FusionConfig, divergence, gain, summarize
from sweeps.fusion import FusionSweepConfig, fit_line, fit_table, run_fusion_map


def test_divergence_and_gain_on_a_hand_case():
    base = [5.0, 4.0]
    spec = np.array([[4.0, 4.4],     # specialist 0: 20% better on domain 0, worse on domain 1
                     [5.5, 3.0]])    # specialist 1: 25% better on domain 1
    assert divergence(base, np.diag(spec)) == pytest.approx((20.0 + 25.0) / 2)
    rows = {r["method"]: r for r in summarize({"base": base, "spec": spec, "uniform": [4.5, 3.5], "B3": [4.0, 3.2],
                                               "R": [4.2, 3.0]})}
    # best specialist: balanced 4.2 (specialist 0) vs 4.25 (specialist 1)
    assert rows["best_specialist"]["best_specialist"] == 0
    assert rows["best_specialist"]["balanced_nll"] == pytest.approx(4.2)
    assert rows["best_specialist"]["gain"] == 0.0
    assert rows["uniform"]["gain"] == pytest.approx(100 * (4.2 - 4.0) / 4.2)
    assert rows["oracle"]["balanced_nll"] == pytest.approx(3.5)          # diag: (4.0 + 3.0) / 2
    assert rows["oracle"]["gain"] == pytest.approx(gain(4.2, 3.5))
    assert rows["B3"]["gain"] == pytest.approx(100 * (4.2 - 3.6) / 4.2)
    assert rows["R"]["divergence"] == pytest.approx(22.5)
    assert rows["base"]["gain"] == pytest.approx(100 * (4.2 - 4.5) / 4.2)


def test_identical_specialists_have_divergence_zero():
    base = [5.0, 4.0, 3.0]
    assert divergence(base, base) == 0.0
    rows = summarize({"base": base, "spec": np.tile(base, (3, 1))})
    assert all(r["divergence"] == 0.0 for r in rows)


def test_fit_matches_statsmodels_and_linregress():
    sm = pytest.importorskip("statsmodels.api")
    from scipy.stats import linregress

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 20, 14)
    y = 0.8 * x - 2.7 + rng.normal(0, 1.5, 14)
    f = fit_line(x, y, 0.05)
    ols = sm.OLS(y, sm.add_constant(x)).fit()
    ci = ols.conf_int(0.05)
    assert f["intercept"] == pytest.approx(ols.params[0], rel=1e-10)
    assert f["slope"] == pytest.approx(ols.params[1], rel=1e-10)
    assert [f["intercept_ci_low"], f["intercept_ci_high"]] == pytest.approx(list(ci[0]), rel=1e-10)
    assert [f["slope_ci_low"], f["slope_ci_high"]] == pytest.approx(list(ci[1]), rel=1e-10)
    assert f["r2"] == pytest.approx(ols.rsquared, rel=1e-10)
    assert f["slope_p"] == pytest.approx(ols.pvalues[1], rel=1e-8)
    assert f["resid_sd"] == pytest.approx(math.sqrt(ols.scale), rel=1e-10)
    lr = linregress(x, y)
    assert f["slope"] == pytest.approx(lr.slope) and f["r2"] == pytest.approx(lr.rvalue ** 2)
    # leave-one-out RMSE by refitting without each point
    loo = [y[i] - np.polyval(np.polyfit(np.delete(x, i), np.delete(y, i), 1), x[i]) for i in range(len(x))]
    assert f["loo_rmse"] == pytest.approx(float(np.sqrt(np.mean(np.square(loo)))), rel=1e-8)
    # the band the figure draws is statsmodels' confidence band of the mean
    from figures.fusion import band

    pred = ols.get_prediction(sm.add_constant(np.array([0.0, 10.0]))).summary_frame(alpha=0.05)
    _, lo, hi = band(f, np.array([0.0, 10.0]))
    assert lo == pytest.approx(pred["mean_ci_lower"].to_numpy(), rel=1e-9)
    _, lo, hi = band(f, np.array([0.0, 10.0]), prediction=True)
    assert hi == pytest.approx(pred["obs_ci_upper"].to_numpy(), rel=1e-9)


def test_fit_table_flags_the_published_line():
    x = np.linspace(0, 20, 8)
    rows = []
    for i, xi in enumerate(x):
        for s, e in enumerate((-0.3, 0.3)):
            rows.append({"point": i, "method": "R", "divergence": xi, "gain": 0.82 * xi - 2.72 + e, "diverged": False})
    fit = fit_table(pd.DataFrame(rows), methods=("R",))
    r = fit[fit["level"] == "seed"].iloc[0]
    assert r["n"] == 16 and r["pub6_slope_in_ci"] and r["pub6_intercept_in_ci"]
    assert fit[fit["level"] == "point"].iloc[0]["n"] == 8


@pytest.fixture(scope="module")
def tiny_substrate(tmp_path_factory):
    """A very small shared base (tiny preset, 4 held-out windows)."""
    from substrate.cell import prepare_substrate

    torch.set_num_threads(1)
    cache = tmp_path_factory.mktemp("cache")
    cfg = FusionConfig(router_steps=3, eval_windows=4, specialist_steps=2)
    return prepare_substrate(cfg.cell(), cache), cache


def test_uniform_and_oracle_baselines_on_a_tiny_case(tiny_substrate):
    """On known specialists: uniform = the base plus the mean of the specialists' updates (checked
    as every slot gated 1 with B scaled by 1/M), oracle = each domain on its own specialist."""
    from substrate.fusion import fused_model, held_out, run_fusion

    sub, cache = tiny_substrate
    cfg = FusionConfig(router_steps=3, eval_windows=4, specialist_steps=2)
    M = cfg.domains
    g = torch.Generator().manual_seed(0)
    shapes = {n: (b.A.shape, b.B.shape) for n, b in fused_model(sub, cfg, _zero_spec(sub, cfg)).banks().items()}
    spec = {n: (0.1 * torch.randn(a, generator=g), 0.1 * torch.randn(b, generator=g)) for n, (a, b) in shapes.items()}
    res = run_fusion(cfg, sub, cache, specialists=spec, routers=("B3",))
    L = res["losses"]
    scaled = fused_model(sub, cfg, {n: (A, B / M) for n, (A, B) in spec.items()})
    direct = held_out(scaled, sub, cfg, lambda x, m: torch.ones(x.shape[0], 1, M))
    assert np.allclose(L["uniform"], direct, atol=1e-5)
    assert not np.allclose(L["uniform"], L["base"], atol=1e-3)          # the specialists do something
    assert np.allclose(L["oracle"], np.diag(np.asarray(L["spec"])), atol=1e-6)
    rows = {r["method"]: r for r in res["rows"]}
    assert rows["oracle"]["balanced_nll"] == pytest.approx(float(np.mean(np.diag(np.asarray(L["spec"])))))
    assert rows["best_specialist"]["balanced_nll"] == pytest.approx(float(np.asarray(L["spec"]).mean(1).min()))


def _zero_spec(sub, cfg):
    from dataclasses import replace

    from substrate.model import GPT
    m = GPT(replace(cfg.cell().model_config(), slots=cfg.domains), torch.Generator().manual_seed(0))
    return {n: (b.A.detach(), b.B.detach()) for n, b in m.banks().items()}


def test_tiny_map_resumes_without_recomputing(tiny_substrate, tmp_path, monkeypatch):
    import substrate.fusion as sf

    _, cache = tiny_substrate
    cfg = FusionSweepConfig(base=FusionConfig(router_steps=3, eval_windows=4), specialist_steps=(1, 2, 3),
                            seeds=(0,), cache=str(cache))
    first = run_fusion_map(cfg, tmp_path / "run")
    assert first.computed == 3 and first.reused == 0
    assert set(first.table["method"]) == {"best_specialist", "base", "uniform", "oracle", "B3", "R"}
    assert len(first.table) == 3 * 6
    assert (tmp_path / "run" / "fit.csv").exists() and (tmp_path / "run" / "manifest.json").exists()
    calls = []
    monkeypatch.setattr(sf, "run_fusion", lambda *a, **k: calls.append(1))
    more = FusionSweepConfig(base=cfg.base, specialist_steps=(1, 2, 3), seeds=(0,), cache=str(cache))
    again = run_fusion_map(more, tmp_path / "run")
    assert again.computed == 0 and again.reused == 3 and not calls
    pd.testing.assert_frame_equal(first.table, again.table)


# ---------------------------------------------------------------------------------------------
# --specialists full: full fine-tuned copies and the output mixture
# ---------------------------------------------------------------------------------------------


def test_full_copies_refused_above_small():
    from sandbox.errors import BadInput

    with pytest.raises(BadInput, match=r"--specialists .*--preset widened-1536"):
        FusionConfig(preset="widened-1536", specialists="full")
    assert FusionConfig(preset="small", specialists="full").specialists == "full"
    # the default leaves the trial identity (ledger key) and the folder key as they were
    assert "specialists" not in FusionConfig().identity()
    assert "specialists" not in FusionSweepConfig().folder_key()["base"]
    assert FusionConfig(specialists="full").identity()["specialists"] == "full"


def test_full_copies_refused_by_the_command(capsys):
    from sandbox.app.cli import main

    assert main(["fusion", "--specialists", "full", "--preset", "widened-1536"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--specialists" in err and "--preset widened-1536" in err and len(err.splitlines()) == 1


def test_full_copy_differs_from_the_base_only_by_trained_weights(tiny_substrate):
    from substrate.fusion import base_model, base_weights, train_full_copies

    sub, _ = tiny_substrate
    cfg = FusionConfig(specialists="full", eval_windows=4)
    base = base_model(sub, cfg)
    before = {n: w.clone() for n, w in base_weights(base).items()}
    copies = train_full_copies(base, sub.corpus, steps=2, lr=1e-3, seed=0)
    after = base_weights(base)
    assert all(torch.equal(before[n], after[n]) for n in before)                 # the base is untouched
    assert set(copies) == set(before)                                             # every base weight, nothing else
    assert not any(".bank." in n for n in copies)
    M = cfg.domains
    for n, w in copies.items():
        assert w.shape == (M, *before[n].shape)
    moved = [n for n in before if not torch.equal(copies[n][0], before[n])]
    assert moved and any("blocks" in n for n in moved)                            # trained weights changed
    for m in range(1, M):                                                         # each copy is its own run
        assert any(not torch.equal(copies[n][m], copies[n][0]) for n in copies)


def test_mixture_one_hot_picks_the_copy_and_uniform_averages(tiny_substrate):
    from substrate.fusion import base_model, base_weights, copy_logits, copy_logprobs, mixture_nll

    sub, _ = tiny_substrate
    cfg = FusionConfig(specialists="full")
    model = base_model(sub, cfg)
    g = torch.Generator().manual_seed(1)
    M = cfg.domains
    copies = {n: torch.stack([w + 0.05 * torch.randn(w.shape, generator=g) for _ in range(M)])
              for n, w in base_weights(model).items()}
    x = sub.corpus.split("heldout")[0][:3].long()
    x, y = x[:, :-1], x[:, 1:]
    with torch.no_grad():
        logits = copy_logits(model, copies, x)
        logp = copy_logprobs(model, copies, x, y)
        from torch.func import functional_call
        for k in range(M):                                                        # the batched pass = each copy alone
            single = functional_call(model, {n: w[k] for n, w in copies.items()}, (x,))
            assert torch.allclose(logits[k], single, atol=1e-5)
            own = torch.nn.functional.cross_entropy(single.transpose(1, 2), y, reduction="none")
            onehot = torch.nn.functional.one_hot(torch.tensor(k), M).float()[None, None].expand(3, 1, M)
            assert torch.allclose(mixture_nll(logp, onehot), own, atol=1e-5)
        p = torch.softmax(logits, -1).mean(0)                                     # uniform = average of the distributions
        want = -torch.log(p.gather(-1, y[..., None])[..., 0])
        assert torch.allclose(mixture_nll(logp, torch.full((3, y.shape[1], M), 1.0 / M)), want, atol=1e-5)


def test_full_fusion_runs_every_method_on_a_tiny_case(tiny_substrate):
    from substrate.fusion import run_fusion

    sub, cache = tiny_substrate
    cfg = FusionConfig(specialists="full", router_steps=2, eval_windows=2, specialist_steps=2, specialist_lr=1e-3)
    res = run_fusion(cfg, sub, cache)
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == set(("best_specialist", "base", "uniform", "oracle", "B3", "R"))
    L = res["losses"]
    assert np.allclose(L["oracle"], np.diag(np.asarray(L["spec"])))
    assert all(math.isfinite(r["gain"]) for r in rows.values())
