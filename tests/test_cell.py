"""One factorial cell on the tiny substrate: what each letter switches, LOO fitness against a loop,
kill-and-resume equality, divergence recording, the base perturbation probe and config errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pandas as pd
import pytest
import torch

import substrate.cell as cellmod
from sandbox.errors import BadInput
from sandbox.lifecycle import fitness
from substrate.cell import CellConfig, build_state, loo_losses, prepare_substrate, run_cell, step_generator
from substrate.corpus import sample_batch

TINY = dict(preset="tiny", steps=10, batch=4, slots=4, rank=4, eval_every=5, checkpoint_every=4, interval=5,
            min_age=0, fit_windows=2, eval_windows=4, seed=3)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sub(cache):
    torch.set_num_threads(1)
    return prepare_substrate(CellConfig.of(**TINY), cache)


def run(cfg, path, sub, **kw):
    return run_cell(cfg, path, substrate=sub, **kw)


def test_router_letter_switches_router_kind_and_features(sub):
    b3, r = build_state(CellConfig.of(**TINY, cell="B3"), sub), build_state(CellConfig.of(**TINY, cell="R"), sub)
    assert (b3.router.cfg.kind, CellConfig.of(**TINY, cell="B3").features) == ("softmax", "embed")
    assert (r.router.cfg.kind, CellConfig.of(**TINY, cell="R").features) == ("sigmoid", "hidden")
    x = sub.corpus.heldout[0][:2, :-1].long()
    g_b3 = cellmod.gates_for(CellConfig.of(**TINY, cell="B3"), b3, x, 0)
    g_r = cellmod.gates_for(CellConfig.of(**TINY, cell="R"), r, x, 0)
    torch.testing.assert_close(g_b3.sum(-1), torch.ones(g_b3.shape[:-1]))       # softmax: on the simplex
    floors = r.router.floors()
    assert bool((g_r >= floors - 1e-6).all()) and bool((g_r <= 1).all())
    assert not torch.allclose(g_r.sum(-1), torch.ones(g_r.shape[:-1]))        # independent gates (near 1, not on it)
    # same seed -> same starting bank in every cell (common random numbers)
    for (n, a), (_, b) in zip(b3.model.banks().items(), r.model.banks().items()):
        torch.testing.assert_close(a.A, b.A)
        torch.testing.assert_close(a.B, b.B)


def test_scope_letter_changes_fitness_only(sub, tmp_path):
    r = run(CellConfig.of(**TINY, cell="R"), tmp_path / "r", sub).metrics
    re_ = run(CellConfig.of(**TINY, cell="R+E"), tmp_path / "re", sub).metrics
    # E without L trains exactly like R: it only changes how fitness is measured and logged.
    assert r["balanced_log_ppl"] == re_["balanced_log_ppl"]
    fr, fe = pd.read_csv(tmp_path / "r" / "fitness.csv"), pd.read_csv(tmp_path / "re" / "fitness.csv")
    assert set(fr["scope"]) == {"global"} and set(fe["scope"]) == {"per-domain"}
    assert list(fr["step"].unique()) == [5, 10]
    # identical states -> identical global fitness; per-domain max >= global mean, and not equal
    pd.testing.assert_series_equal(fr["fitness_global"], fe["fitness_global"])
    pd.testing.assert_series_equal(fr["fitness"], fr["fitness_global"], check_names=False)
    assert (fe["fitness"] >= fe["fitness_global"] - 1e-12).all()
    assert (fe["fitness"] > fe["fitness_global"] + 1e-9).any()
    assert r["scope"] == "global" and re_["scope"] == "per-domain"


def test_lifecycle_letter_produces_events_with_lineage(sub, tmp_path):
    rl = run(CellConfig.of(**TINY, cell="R+L"), tmp_path / "rl", sub).metrics
    r = run(CellConfig.of(**TINY, cell="R"), tmp_path / "r", sub).metrics
    ev = pd.read_csv(tmp_path / "rl" / "lifecycle.csv")
    assert rl["lifecycle_events"] == 2 and (ev["event"] == "death").sum() == 2       # steps 5 and 10
    assert set(ev["event"]) == {"death", "inherit", "birth"}
    # the inheritance blend under its own name (the bare `alpha` is the statistics' test level)
    assert "inherit_alpha" in ev.columns and "alpha" not in ev.columns
    assert (ev["inherit_alpha"] == CellConfig.of(**TINY).lifecycle.inherit_alpha).all()
    births = ev[ev["event"] == "birth"]
    assert (births["slot_id"] >= TINY["slots"]).all() and (births["parent_id"] >= 0).all()
    assert r["lifecycle_events"] == 0 and len(pd.read_csv(tmp_path / "r" / "lifecycle.csv")) == 0
    assert rl["balanced_log_ppl"] != r["balanced_log_ppl"]


def test_loo_losses_match_a_loop_over_slots(sub):
    cfg = CellConfig.of(**TINY, cell="R")
    st = build_state(cfg, sub)
    loo, full, hbar = loo_losses(cfg, st, sub.corpus, 7)
    M, w = sub.corpus.domains, cfg.fit_windows
    dom = torch.arange(M).repeat_interleave(w)
    x, y, _ = sample_batch(sub.corpus, "train", M * w, step_generator(cfg.seed, 7, cellmod._FIT), domains=dom)
    with torch.no_grad():
        gates = cellmod.gates_for(cfg, st, x, 7)
        def per_domain(g):
            nll = st.model.token_nll(x, y, g).mean(-1).double()
            return torch.stack([nll[dom == m].mean() for m in range(M)])
        torch.testing.assert_close(full, per_domain(gates))
        for k in range(cfg.slots):
            g = gates.clone()
            g[..., k] = 0
            torch.testing.assert_close(loo[k], per_domain(g), rtol=1e-5, atol=1e-6)
    assert hbar.shape == (M, st.model.cfg.d_model)
    assert fitness(loo, full, "global").shape == (cfg.slots,)


def test_data_order_is_a_pure_function_of_seed_and_step(sub):
    a = sample_batch(sub.corpus, "train", 4, step_generator(5, 11, cellmod._BATCH))[0]
    b = sample_batch(sub.corpus, "train", 4, step_generator(5, 11, cellmod._BATCH))[0]
    c = sample_batch(sub.corpus, "train", 4, step_generator(5, 12, cellmod._BATCH))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_kill_and_resume_equals_uninterrupted(sub, tmp_path):
    cfg = CellConfig.of(**{**TINY, "steps": 12}, cell="R+E+L")
    whole = run(cfg, tmp_path / "whole", sub)
    first = run(cfg, tmp_path / "cut", sub, stop_after=7)
    assert not first.done and first.step == 7 and (tmp_path / "cut" / "checkpoint.pt").exists()
    second = run(cfg, tmp_path / "cut", sub)
    assert second.done and second.step == 12 and not (tmp_path / "cut" / "checkpoint.pt").exists()
    for key in ("balanced_log_ppl", "log_ppl", "gap_to_floor", "steps", "tokens", "lifecycle_events", "diverged",
                "gates"):
        assert whole.metrics[key] == second.metrics[key], key
    assert set(second.metrics["gates"]) == {"before", "after"}   # the step-0 diagnostics survive the checkpoint
    for table in ("curves.csv", "lifecycle.csv", "fitness.csv", "gates.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "whole" / table), pd.read_csv(tmp_path / "cut" / table))
    manifest = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert len(manifest["resumes"]) == 1
    # a finished folder reports without training again
    again = run(cfg, tmp_path / "cut", sub)
    assert again.metrics["balanced_log_ppl"] == whole.metrics["balanced_log_ppl"]


def test_resume_refuses_a_different_config(sub, tmp_path):
    cfg = CellConfig.of(**TINY, cell="R")
    run(cfg, tmp_path / "x", sub, stop_after=2)
    with pytest.raises(BadInput, match="--out"):
        run(replace(cfg, lr=1e-2), tmp_path / "x", sub)


def test_divergence_is_recorded_not_raised(sub, tmp_path, monkeypatch):
    real = cellmod.train_step

    def exploding(cfg, st, corpus, tcfg):
        loss = real(cfg, st, corpus, tcfg)
        return math.inf if st.step == 3 else loss

    monkeypatch.setattr(cellmod, "train_step", exploding)
    m = run(CellConfig.of(**TINY, cell="B3"), tmp_path / "d", sub).metrics
    assert m["diverged"] is True and m["diverged_step"] == 3 and math.isnan(m["balanced_log_ppl"])
    assert m["steps"] == 3 and json.loads((tmp_path / "d" / "metrics.json").read_text())["diverged"] is True


def test_perturb_base_relative_scale(sub):
    cfg = CellConfig.of(**TINY, cell="B3")
    plain, noisy = build_state(cfg, sub), build_state(replace(cfg, perturb_base=0.1), sub)
    W0 = plain.model.blocks[0].mlp.fc.weight
    W1 = noisy.model.blocks[0].mlp.fc.weight
    rel = float((W1 - W0).norm() / W0.norm())
    assert rel == pytest.approx(0.1, rel=0.05)     # 16k entries: the Monte Carlo error is ~1%
    assert torch.equal(plain.model.ln_f.weight, noisy.model.ln_f.weight)   # norms untouched
    again = build_state(replace(cfg, perturb_base=0.1), sub)
    assert torch.equal(again.model.blocks[0].mlp.fc.weight, W1)           # a pure function of the seed


@pytest.mark.parametrize("kw, flag", [
    (dict(cell="R+X"), "--cell"), (dict(inherit_alpha=1.5), "--inherit-alpha"), (dict(pooling="mean"), "--pooling"),
    (dict(tau_min=5.0), "--tau-min"), (dict(floor_max=1.0), "--floor-max"), (dict(alignment=-0.1), "--alignment"),
    (dict(steps=0), "--steps"), (dict(inherit_mode="clone"), "--inherit-mode"), (dict(preset="huge"), "--preset"),
    (dict(domains=20), "--domains"), (dict(perturb_base=-1.0), "--perturb-base"), (dict(device="tpu"), "--device"),
])
def test_bad_knobs_name_their_flag(kw, flag):
    with pytest.raises(BadInput) as e:
        CellConfig.of(**{**TINY, **kw})
    assert e.value.flag == flag and "\n" not in e.value.one_line()


def test_cell_spelling_is_canonical():
    assert CellConfig.of(**TINY, cell="l+r").cell == "R+L" and CellConfig.of(**TINY, cell="e+l+r").cell == "R+E+L"


def test_real_text_folder_runs_with_unknown_floors(tmp_path, cache):
    import random

    rng = random.Random(0)
    vocab = {"prose": "the cat sat on the mat with a hat and a bat".split(),
             "code": "import numpy as np def main return value if else for".split()}
    for dom, words in vocab.items():
        (tmp_path / "data" / dom).mkdir(parents=True)
        (tmp_path / "data" / dom / "a.txt").write_text(" ".join(rng.choice(words) for _ in range(1500)))
    cfg = CellConfig.of(**{**TINY, "steps": 4, "pretrain_steps": 5, "specialist_steps": 3}, cell="R",
                     data=str(tmp_path / "data"))
    m = run_cell(cfg, tmp_path / "run", cache).metrics
    assert set(m["log_ppl"]) == {"code", "prose"} and math.isfinite(m["balanced_log_ppl"])
    assert all(math.isnan(v) for v in m["gap_to_floor"].values())


def test_fair_start_gives_the_sigmoid_router_the_softmax_total_and_reports_the_step0_gap(sub, tmp_path):
    """--router-init mass (default): the R cell's total gate weight per token at step 0 is the softmax's
    1 on the real hidden-state features; zero keeps the old start (K (1 + f) / 2). metrics.json
    reports the step-0 held-out gap to the plain base."""
    x = torch.cat([w[:4, :-1].long() for w in sub.corpus.heldout])
    totals = {}
    for init in ("mass", "zero"):
        cfg = CellConfig.of(**TINY, cell="R", router_init=init)
        totals[init] = float(cellmod.gates_for(cfg, build_state(cfg, sub), x, 0).sum(-1).mean())
    assert abs(totals["mass"] - 1.0) < 0.03          # measured 0.984: W h adds a little spread on K = 4
    assert abs(totals["zero"] - 4 * (0.05 + 0.95 / 2)) < 0.05
    assert "router_init" not in CellConfig.of(**TINY, router_init="zero").identity()   # old folders still resume
    m = run(CellConfig.of(**{**TINY, "steps": 2}, cell="R"), tmp_path / "r", sub).metrics
    assert m["initial_gap_to_base"] == pytest.approx(m["initial_balanced_log_ppl"] - m["base_balanced_log_ppl"])
    with pytest.raises(BadInput, match="--router-init"):
        CellConfig.of(**TINY, router_init="half")


# --- gate diagnostics and the router's own learning rate ----------------------------------

def test_gate_diagnostics_in_metrics_match_the_held_out_gates(sub, tmp_path):
    from sandbox import gatestats

    cfg = CellConfig.of(**TINY, cell="R")
    m = run(cfg, tmp_path / "r", sub).metrics
    names = list(sub.corpus.names)
    for phase in ("before", "after"):
        d = m["gates"][phase]
        assert set(d) == set(gatestats.NAMES)
        assert list(d["own"]) == names and list(d["slots5_domain"]) == names
    # "before" = the gates of the starting state on every held-out window (eval_windows per domain)
    st = build_state(cfg, sub)
    gates, dom = cellmod.held_out_gates(cfg, st, sub.corpus)
    T = sub.corpus.heldout[0].shape[1] - 1
    assert gates.shape == (sub.corpus.domains * TINY["eval_windows"] * T, cfg.slots)
    want = gatestats.gate_stats(gates, dom, sub.corpus.domains, floors=st.router.floors().detach(),
                                own_slots=st.assignment.tolist())
    got = m["gates"]["before"]
    assert got["own"] == dict(zip(names, want["own"])) and got["mass"] == want["mass"] and got["mi"] == want["mi"]
    assert got["open"] == pytest.approx(got["mass"] - cfg.slots * float(st.router.floors()[0]), rel=1e-5)
    # the fair start: total 1 per token, half of it above the floors, so the router can move it
    assert got["mass"] == pytest.approx(1.0, abs=0.05) and got["open"] > 0.4
    # a softmax has no floor: open = mass = 1
    b3 = run(CellConfig.of(**TINY, cell="B3"), tmp_path / "b3", sub).metrics["gates"]["after"]
    assert b3["mass"] == pytest.approx(1.0) and b3["open"] == pytest.approx(1.0)
    g = pd.read_csv(tmp_path / "r" / "gates.csv")
    assert set(g["phase"]) == {"before", "after"} and len(g) == 2 * sub.corpus.domains * cfg.slots


def test_router_gets_its_own_learning_rate(sub):
    from substrate.defaults import ROUTER_LR_RATIO
    from substrate.train import TrainConfig, lr_at

    cfg = CellConfig.of(**TINY, cell="R")
    assert cfg.router_lr is None and cfg.router_lr_value == ROUTER_LR_RATIO * cfg.lr
    st = build_state(cfg, sub)
    assert len(st.opt.param_groups) == 2
    adapters, router = st.opt.param_groups
    assert {id(p) for p in router["params"]} == {id(p) for p in st.router.parameters()}
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch=cfg.batch, warmup=1, min_lr_ratio=0.1)
    st.step = 3
    cellmod.train_step(cfg, st, sub.corpus, tcfg)
    assert adapters["lr"] == lr_at(3, tcfg) and router["lr"] == pytest.approx(ROUTER_LR_RATIO * lr_at(3, tcfg))
    # --router-lr = --lr: one group, the optimiser (and the identity, so the folders) of the earlier runs
    same = CellConfig.of(**TINY, cell="R", router_lr=cfg.lr, tau_scales="logit")
    assert len(build_state(same, sub).opt.param_groups) == 1
    assert "router_lr" not in same.identity() and "tau_scales" not in same.identity()
    assert cfg.identity()["router_lr"] is None and cfg.identity()["tau_scales"] == "input"
    with pytest.raises(BadInput, match="--router-lr"):
        CellConfig.of(**TINY, router_lr=0.0)
