"""The regime map's arms on the transformer (`substrate.routing`): one batched forward for the whole
search population (against a loop over members), common random numbers across arms, the search
counts what it did, and the domain-oracle ceiling."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from sandbox import evolution as evo
from sandbox.errors import BadInput
from sandbox.router import params_to_vector, vector_to_params
from substrate import routing
from sandbox.streams import Purpose, generator
from substrate.cell import CellConfig, build_state, gates_for, prepare_substrate
from substrate.corpus import sample_batch

TINY = dict(preset="tiny", steps=12, batch=4, slots=4, rank=4, eval_windows=4, seed=3)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sub(cache_dir):
    torch.set_num_threads(1)
    return prepare_substrate(CellConfig.of(**TINY), cache_dir)


@pytest.mark.parametrize("cell", ["B3", "R"])
def test_population_forward_equals_a_loop_over_members(sub, cell):
    rc = routing.RoutingArms(cell=CellConfig.of(**TINY, cell=cell), evolution=evo.EvolutionConfig(population=5))
    st = build_state(rc.cell, sub)
    M = sub.corpus.domains
    dom = torch.arange(M).repeat_interleave(2)
    x, y, dom = sample_batch(sub.corpus, "train", len(dom), generator(Purpose.SEARCH_BATCH, 3, 0), domains=dom)
    base = params_to_vector({k: v.detach().double()[None] for k, v in st.router.params().items()})   # (1, D)
    pop = base + 0.5 * torch.randn(5, base.shape[-1], generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = routing.population_losses(rc, st, pop, x, y, dom, M)                                         # (5,)
    want = []
    for p in range(5):
        with torch.no_grad():
            st.router.load_params({k: v[0] for k, v in vector_to_params(pop[p:p + 1], st.router.cfg).items()})
            nll = st.model.token_nll(x, y, gates_for(rc.cell, st, x, st.step)).mean(-1).double()   # (N,)
        want.append(torch.stack([nll[dom == m].mean() for m in range(M)]).mean())
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-5, atol=1e-6)


def test_arms_share_their_start_and_the_search_counts_what_it_did(sub):
    rc = routing.RoutingArms(cell=CellConfig.of(**TINY, cell="B3"),
                             evolution=evo.EvolutionConfig(population=4, interval=4, mutation_scale=0.1))
    res = routing.run_arms(rc, sub)
    assert set(res) == set(routing.ARMS)
    assert res["evo"]["generations"] == res["restart"]["generations"] == 3 and res["grad"]["generations"] == 0
    assert 0 <= res["evo"]["accepted"] <= 3
    for arm in routing.ARMS:
        assert math.isfinite(res[arm]["balanced"]) and len(res[arm]["nll"]) == sub.corpus.domains
    # a search that accepts nothing leaves evo == grad exactly (same batches, same start, state kept)
    inert = routing.RoutingArms(cell=CellConfig.of(**TINY, cell="B3"),
                                evolution=evo.EvolutionConfig(population=3, interval=4, method="fixed",
                                                              mutation_scale=100.0))
    r2 = routing.run_arms(inert, sub, arms=("grad", "evo"))
    assert r2["evo"]["accepted"] == 0 and r2["evo"]["balanced"] == r2["grad"]["balanced"]
    assert r2["grad"]["balanced"] == res["grad"]["balanced"]          # common random numbers across calls


def test_lifecycle_cells_are_refused():
    with pytest.raises(BadInput, match="--cell"):
        routing.RoutingArms(cell=CellConfig.of(**TINY, cell="R+L"))


def test_substrate_sweep_records_resumes_and_decomposes(sub, tmp_path):
    from sweeps import substrate_map as sm

    arms = routing.RoutingArms(cell=CellConfig.of(**{**TINY, "steps": 8}, cell="B3"),
                               evolution=evo.EvolutionConfig(population=3, interval=4))
    cfg = sm.SubstrateSweepConfig(arms=arms, points=2, seeds=(0, 1), cache=str(tmp_path / "cache"))
    first = sm.run_substrate_sweep(cfg, tmp_path / "map", figures=False)
    assert first.computed == 4 and first.reused == 0
    assert set(first.results["arm"]) == set(routing.ARMS) and len(first.results) == 2 * 2 * 4
    s = first.summary
    assert {"mean_delta", "delta_restart", "room", "accepted", "regime"} <= set(s.columns)
    assert "no-room" not in set(s["regime"])                 # the domain oracle is not a proven ceiling
    wide = first.results.pivot_table(index=["point", "seed"], columns="arm", values="log_loss")
    assert s["mean_delta"].to_numpy() == pytest.approx((wide["grad"] - wide["evo"]).groupby(level=0).mean().to_numpy())
    assert set(first.base) == {"train_nll", "heldout_nll", "floor", "memorising"}
    again = sm.run_substrate_sweep(cfg, tmp_path / "map", figures=False)
    assert again.computed == 0 and again.reused == 4
    pd_cols = [c for c in first.results.columns if c != "wall_s"]
    assert again.results[pd_cols].equals(first.results[pd_cols])


def test_cli_system_flag_is_checked():
    from sandbox.app.cli import main

    assert main(["sweep", "--system", "quantum"]) == 2


def test_the_maps_machine_defaults_are_the_configs_and_the_help_says_them():
    """The substrate map's machine-dependent defaults are `SubstrateSweepConfig`'s (one place), and
    `sandbox sweep`'s help reads them from there."""
    from sandbox.app.commands.sweep import _sweep_options
    from substrate.defaults import GPU_PRESET, PRESET_STEPS
    from sweeps.substrate_map import SubstrateSweepConfig

    cpu, gpu = SubstrateSweepConfig.defaults_for("cpu"), SubstrateSweepConfig.defaults_for("cuda")
    assert (cpu.preset, cpu.points, cpu.seeds) == ("tiny", 5, (0, 1, 2, 3, 4))
    assert (gpu.preset, gpu.points, gpu.seeds) == (GPU_PRESET, 5, (0, 1, 2))
    assert SubstrateSweepConfig.defaults_for("mps") is cpu   # every device but cuda
    assert SubstrateSweepConfig.steps_for("tiny") == PRESET_STEPS["tiny"]
    assert SubstrateSweepConfig.steps_for("not-a-preset") == 100
    helps = {o.name: o.help for o in _sweep_options()}
    assert f"substrate: {cpu.preset} on a CPU, {gpu.preset} on CUDA" in helps["preset"]
    assert f"substrate: {len(cpu.seeds)} on a CPU, {len(gpu.seeds)} on CUDA" in helps["seeds"]
    assert f"substrate: {cpu.points})" in helps["points"]


def test_confirmation_keeps_only_children_that_win_twice(sub):
    """--confirm: every child that won its search batch is either kept (accepted) or rejected on a
    second batch (unconfirmed); a rejected child leaves the router as it was."""
    base = dict(cell=CellConfig.of(**TINY, cell="B3"), evolution=evo.EvolutionConfig(population=6, interval=2))
    plain = routing.run_arms(routing.RoutingArms(**base), sub, arms=("evo",))["evo"]
    conf = routing.run_arms(routing.RoutingArms(**base, confirm=True), sub, arms=("evo",))["evo"]
    assert plain["unconfirmed"] == 0
    assert conf["generations"] == plain["generations"] == 6
    assert conf["accepted"] + conf["unconfirmed"] <= conf["generations"]
    assert conf["unconfirmed"] > 0 and conf["accepted"] < plain["accepted"]   # it acted: it rejected batch winners


def test_acar_arm_counts_every_held_out_token_and_leaves_grad_alone(sub, cache_dir, tmp_path):
    """--acar: sigma routing on the grad arm's final router and adapters; grad is the same with or
    without it (common random numbers), the arm is deterministic, its modes add up to the held-out
    tokens evaluated, and the map writes its counts and its paired statistics."""
    from sandbox.acar import USAGE_COLUMNS
    from sandbox.stats import ACAR_SUMMARY
    from sweeps import substrate_map as sm

    base = dict(cell=CellConfig.of(**TINY, cell="B3"), evolution=evo.EvolutionConfig(population=3, interval=4))
    rc = routing.RoutingArms(**base, acar=True)
    assert rc.arms == routing.ALL_ARMS and routing.RoutingArms(**base).arms == routing.ARMS
    res = routing.run_arms(rc, sub, arms=("grad", "acar"))
    assert res["grad"]["balanced"] == routing.run_arms(rc, sub, arms=("grad",))["grad"]["balanced"]
    again = routing.run_arms(rc, sub, arms=("acar",))                     # grad trained again, then acar
    assert again["acar"]["balanced"] == res["acar"]["balanced"] and again["acar"]["modes"] == res["acar"]["modes"]
    tokens = sum(min(len(w), TINY["eval_windows"]) * (w.shape[1] - 1) for w in sub.corpus.heldout)
    assert sum(res["acar"]["modes"]) == tokens and math.isfinite(res["acar"]["balanced"])
    rows = {r["arm"]: r for r in sm.seed_rows(res)}
    assert set(USAGE_COLUMNS) <= set(rows["acar"]) and "mode1" not in rows["grad"]
    # point keys and folders are unchanged while the arm is off
    off = sm.SubstrateSweepConfig(arms=routing.RoutingArms(**base), points=1, seeds=(0, 1))
    on = sm.SubstrateSweepConfig(arms=rc, points=1, seeds=(0,), cache=str(cache_dir))
    assert "acar" not in off.folder_key()["arms"] and on.folder_key()["arms"]["acar"] is True
    assert sm.point_key(off.arms) != sm.point_key(rc)
    with pytest.raises(BadInput, match="--slots"):
        routing.RoutingArms(cell=CellConfig.of(**{**TINY, "slots": 2, "domains": 2}), acar=True)
    out = sm.run_substrate_sweep(dataclasses.replace(on, arms=dataclasses.replace(
        rc, cell=dataclasses.replace(rc.cell, steps=4))), tmp_path / "map", figures=False)
    assert set(out.results["arm"]) == set(routing.ALL_ARMS) and list(out.results.columns[-5:]) == list(USAGE_COLUMNS)
    assert set(ACAR_SUMMARY) <= set(out.summary.columns) and out.summary["acar_mean_slots"].between(1, 3).all()


def test_acar_router_gates_are_causal_and_carry_no_gradient(sub):
    cell = CellConfig.of(**TINY, cell="R")
    st = build_state(cell, sub)
    x = sub.corpus.heldout[0][:3, :-1].long()
    t0 = x.shape[1] // 2
    x2 = x.clone()
    x2[:, t0:] = x[:, t0:].roll(1, dims=0)                 # later tokens from another window
    assert not torch.equal(x, x2)
    g1, g2 = routing.acar_router_gates(cell, st, x), routing.acar_router_gates(cell, st, x2)
    torch.testing.assert_close(g1.gates[:, :t0], g2.gates[:, :t0], rtol=0, atol=0)
    assert not g1.gates.requires_grad
    torch.testing.assert_close(g1.gates.sum(-1), torch.ones(x.shape))


def test_the_arms_take_the_cells_step_and_optimiser(sub, monkeypatch):
    """One transformer train step and optimiser (`substrate.adapt`): the map's trained arms call the
    cells' `train_step` on the fixed windows with the optimiser `build_state` made (adapters at lr x
    plasticity, frozen at 0; the router at lr, whatever --router-lr says)."""
    from substrate import adapt

    calls = []

    def counting(cfg, st, corpus, tcfg, train_data=None):
        calls.append((train_data, [(len(g["params"]), g.get("scale", 1.0)) for g in st.opt.param_groups]))
        return adapt.train_step(cfg, st, corpus, tcfg, train_data=train_data)

    monkeypatch.setattr(routing, "train_step", counting)
    cell = CellConfig.of(**TINY, cell="R")
    n_router = len(list(build_state(cell, sub).router.parameters()))
    for plasticity, groups in ((0.5, [(None, 0.5), (n_router, 1.0)]), (0.0, [(n_router, 1.0)])):
        calls.clear()
        res = routing.run_arms(routing.RoutingArms(cell=cell, plasticity=plasticity), sub, arms=("grad",))["grad"]
        assert math.isfinite(res["balanced"]) and len(calls) == TINY["steps"]
        assert all(t == "windows" for t, _ in calls)
        got = calls[0][1]
        assert [s for _, s in got] == [s for _, s in groups]
        assert all(n == want for (n, _), (want, _) in zip(got, groups) if want is not None)


def test_the_arms_read_the_fixed_windows_whatever_the_cells_train_data(sub):
    """train_data is a cell-run setting (`sweeps.substrate_map.CELL_ONLY`): the map's arms read the
    corpus's fixed training windows, so fresh and windows give the same arm bit for bit."""
    res = [routing.run_arms(routing.RoutingArms(cell=CellConfig.of(**TINY, cell="B3", train_data=t)), sub,
                            arms=("grad",))["grad"]["nll"] for t in ("windows", "fresh")]
    assert res[0] == res[1]


def test_a_map_refuses_the_acar_router_kind():
    with pytest.raises(BadInput, match="--router-kind .acar.: expected auto or a router plugin"):
        routing.RoutingArms(cell=CellConfig.of(**TINY, cell="B3", router_kind="acar"))
