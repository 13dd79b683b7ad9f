"""The worked router plugin (examples/topk_router.py) on both systems, in the map and the factorial,
without any change to the package; plugins that break the protocol get one line and exit 2."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from sandbox.app.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOPK = "examples.topk_router:TopKSoftmax"
#: tests/test_api.py's fast analytic sweep (3 points x 2 seeds, tuning off).
FLAGS = ["--points", "3", "--seeds", "2", "--steps", "20", "--population", "4", "--domains", "2", "--slots", "3",
         "--dim", "8", "--rank", "2", "--true-rank", "1", "--context-dim", "4", "--draws", "2", "--eval-draws", "4",
         "--tune", "off", "--no-figures"]
#: tests/test_factorial.py's tiny cell settings.
TINY = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]


@pytest.fixture(autouse=True)
def _importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def test_topk_gates_keep_k_slots_sum_to_one_and_train():
    from sandbox.router import RouterConfig, init_router_params, kind_of, router_gates

    cfg = RouterConfig(kind=TOPK, n_features=5, n_slots=6)
    assert kind_of(cfg).feasible == "simplex" and cfg.param_names == ("W", "bias")
    params = init_router_params(cfg, (3, 2), torch.Generator().manual_seed(0))
    params = {k: v.requires_grad_() for k, v in params.items()}
    g = router_gates(cfg, params, torch.randn(3, 1, 7, 5, generator=torch.Generator().manual_seed(1)))   # (S, P, N, K)
    assert g.shape == (3, 2, 7, 6)
    torch.testing.assert_close(g.sum(-1), torch.ones(3, 2, 7))
    assert ((g > 0).sum(-1) == 2).all()
    (g[..., 0] * 3 + g[..., 1]).sum().backward()
    assert params["W"].grad.abs().sum() > 0


def test_plugin_runs_the_analytic_map_and_differs_from_softmax(tmp_path):
    for router in ("softmax", TOPK):
        assert main(["sweep", *FLAGS, "--router", router, "--out", str(tmp_path / router.split(":")[-1])]) == 0
    mine, soft = (pd.read_csv(tmp_path / n / "results.csv") for n in ("TopKSoftmax", "softmax"))
    assert len(mine) == len(soft) and set(mine["arm"]) == set(soft["arm"]) >= {"grad", "evo", "restart", "oracle"}
    assert not mine["final_loss"].equals(soft["final_loss"]) and mine["final_loss"].notna().all()
    manifest = json.loads((tmp_path / "TopKSoftmax" / "manifest.json").read_text())
    assert manifest["config"]["solver"]["router"] == TOPK
    assert len(pd.read_csv(tmp_path / "TopKSoftmax" / "summary.csv")) == 3


def test_plugin_runs_the_factorial_and_the_substrate_map(tmp_path):
    cache = str(tmp_path / "cache")
    assert main(["factorial", "--cells", "B3,R", "--seeds", "1", *TINY, "--router-kind", TOPK, "--device", "cpu",
                 "--no-figures", "--cache", cache, "--out", str(tmp_path / "fact")]) == 0
    cells = pd.read_csv(tmp_path / "fact" / "cells.csv")
    assert list(cells["cell"]) == ["B3", "R"] and cells["balanced_log_ppl"].notna().all()
    routers = {}
    for f in (tmp_path / "fact").rglob("metrics.json"):
        m = json.loads(f.read_text())
        routers[m.get("cell", f.parent.name)] = m["router"]
    assert sorted(routers.values()) == sorted(["softmax", TOPK])   # R runs the plugin, B3 keeps the baseline
    assert main(["sweep", "--system", "substrate", "--router", TOPK, "--points", "2", "--seeds", "1", "--steps", "4",
                 "--preset", "tiny", "--population", "4", "--device", "cpu", "--cache", cache, "--no-figures",
                 "--out", str(tmp_path / "map")]) == 0
    res = pd.read_csv(tmp_path / "map" / "results.csv")
    assert {"grad", "evo"} <= set(res["arm"]) and res["final_loss"].notna().all()
    assert json.loads((tmp_path / "map" / "manifest.json").read_text())["config"]["arms"]["cell"]["router_kind"] == TOPK


BROKEN = textwrap.dedent('''
    import torch

    class NoGates:
        feasible = "simplex"
        def param_shapes(self, cfg):
            return {"W": (cfg.n_features, cfg.n_slots), "bias": (cfg.n_slots,)}

    class DropsASlot(NoGates):
        def gates(self, cfg, params, features, step=0):
            return torch.softmax(features @ params["W"], -1)[..., 1:]

    class NoBias(NoGates):
        def param_shapes(self, cfg):
            return {"W": (cfg.n_features, cfg.n_slots)}
        def gates(self, cfg, params, features, step=0):
            return torch.softmax(features @ params["W"], -1)

    class NotOnTheSimplex(NoGates):
        def gates(self, cfg, params, features, step=0):
            return torch.sigmoid(features @ params["W"])

    class Raises(NoGates):
        def gates(self, cfg, params, features, step=0):
            raise RuntimeError("boom")
''')


@pytest.mark.parametrize("name, says", [
    ("NoGates", "NoGates has no gates() method"),
    ("DropsASlot", "DropsASlot.gates() returned (2, 5, 3)"),
    ("NoBias", "'bias': (K,) = (4,)"),
    ("NotOnTheSimplex", "expected 1 (feasible = 'simplex')"),
    ("Raises", "Raises raised RuntimeError"),
])
def test_a_plugin_that_breaks_the_protocol_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys, name, says):
    (tmp_path / "broken_router.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["sweep", *FLAGS, "--router", f"broken_router:{name}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --router") and says in err, err
    if name == "DropsASlot":
        assert "expected (*b, N, K) = (2, 5, 4)" in err


@pytest.mark.parametrize("value, says", [("nowhere:Router", "importable module"), ("examples.topk_router:Nope", "no 'Nope'"),
                                         ("nope", "molora.routers")])
def test_an_unknown_router_is_one_line(value, says, capsys, tmp_path):
    assert main(["sweep", *FLAGS, "--router", value, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "--router" in err


def test_an_entry_point_names_a_plugin(monkeypatch):
    from importlib import metadata

    from sandbox import plugins
    from sandbox.router import RouterConfig, kind_of

    ep = metadata.EntryPoint(name="topk-test", value=TOPK, group="molora.routers")
    real = metadata.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda group=None: [ep] if group == "molora.routers" else real(group=group))
    assert type(kind_of(RouterConfig(kind="topk-test"))).__name__ == "TopKSoftmax"
    assert "topk-test" in plugins.GROUPS["router"].names()


MIRRORED = "examples.mirrored_search:MirroredSearch"


def test_a_search_plugin_runs_on_both_systems(tmp_path):
    assert main(["sweep", *FLAGS, "--evo", MIRRORED, "--out", str(tmp_path / "a")]) == 0
    res = pd.read_csv(tmp_path / "a" / "results.csv")
    evo = res[res["arm"] == "evo"]
    assert (evo["generations"] > 0).all() and evo["accepted"].between(0, 1).all() and evo["accepted"].gt(0).any()
    grad = res[res["arm"] == "grad"].set_index(["point", "seed"])["final_loss"]
    mine = evo.set_index(["point", "seed"])["final_loss"]
    assert not mine.equals(grad.loc[mine.index])   # the accepted generations moved the routers off grad's path
    assert main(["sweep", "--system", "substrate", "--evo", MIRRORED, "--points", "1", "--seeds", "1", "--steps", "4",
                 "--interval", "2", "--preset", "tiny", "--population", "4", "--device", "cpu",
                 "--cache", str(tmp_path / "cache"), "--no-figures", "--out", str(tmp_path / "s")]) == 0
    sub = pd.read_csv(tmp_path / "s" / "results.csv")
    assert (sub.loc[sub["arm"] == "evo", "generations"] > 0).all()


SEARCHES = textwrap.dedent('''
    import torch
    from examples.mirrored_search import MirroredSearch

    class NoTell:
        def init(self, cfg, S, D, generators, dtype):
            return None
        def ask(self, state, x, unit, cfg, generators):
            return x[:, None].expand(-1, cfg.population, -1).clone()

    class ShortPopulation(MirroredSearch):
        def ask(self, state, x, unit, cfg, generators):
            return super().ask(state, x, unit, cfg, generators)[:, :-1]

    class MovesTheParent(MirroredSearch):
        def ask(self, state, x, unit, cfg, generators):
            return super().ask(state, x, unit, cfg, generators) + 1

    class IntTook(MirroredSearch):
        def tell(self, state, population, objective, cfg, active):
            new, took = super().tell(state, population, objective, cfg, active)
            return new, took.long()
''')


@pytest.mark.parametrize("name, says", [
    ("NoTell", "NoTell has no tell() method"),
    ("ShortPopulation", "ShortPopulation.ask() returned (2, 3, 5); expected the population (S, P, D) = (2, 4, 5)"),
    ("MovesTheParent", "MovesTheParent.ask() changed member 0"),
    ("IntTook", "expected a bool tensor (S,) = (2,)"),
])
def test_a_search_that_breaks_the_protocol_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys, name, says):
    (tmp_path / "broken_search.py").write_text(SEARCHES)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["sweep", *FLAGS, "--evo", f"broken_search:{name}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --evo") and says in err, err


GAUSSIAN = "examples.gaussian_mutation:GaussianMutation"


def test_a_mutation_plugin_runs_on_both_systems(tmp_path):
    lc = ["--lifecycle", "--interval", "5", "--steps", "30"]
    at = FLAGS.index("--steps")
    flags = FLAGS[:at] + FLAGS[at + 2:]      # FLAGS without its --steps (lc sets 30)
    for kind in ("svd", GAUSSIAN):
        assert main(["sweep", *flags, *lc, "--mutation", kind, "--out", str(tmp_path / kind.split(":")[-1])]) == 0
    mine, svd = (pd.read_csv(tmp_path / n / "results.csv") for n in ("GaussianMutation", "svd"))
    ev, es = mine[mine["arm"] == "evo"], svd[svd["arm"] == "evo"]
    assert (ev["lifecycle_events"] > 0).all() and not ev["final_loss"].equals(es["final_loss"])
    assert main(["full", "--cell", "R+L", *TINY, "--mutation", GAUSSIAN, "--device", "cpu", "--seeds", "0,",
                 "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "full")]) == 0
    events = pd.read_csv(tmp_path / "full" / "seed-0" / "lifecycle.csv")
    births = events[events["event"] == "birth"]
    assert len(births) and (births["mutation_size"] > 0).all()


def test_a_mutation_that_breaks_the_protocol_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "broken_mutation.py").write_text("class Transposes:\n    def mutate(self, A, B, cfg, generator):\n"
                                                 "        return B, A\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["sweep", *FLAGS, "--lifecycle", "--mutation", "broken_mutation:Transposes",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: --mutation") and "Transposes.mutate() returned ((3, 4, 2), (3, 2, 5))" in err \
        and "expected (A (n, r, d_in), B (n, d_out, r)) = ((3, 2, 5), (3, 4, 2))" in err, err
