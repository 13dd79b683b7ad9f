"""The death, inheritance and reallocation extension points (`sandbox.lifecycle.kinds`): the built-ins
go through the same registry and calls as plugins; the worked plugins (examples/age_death.py,
examples/random_domain.py, and the task-arithmetic inheritance of docs/plugins.md) run on both
systems, in the map and the factorial, with their events counted; a plugin that breaks its protocol
gets one line and exit 2."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from sandbox import plugins
from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.lifecycle import LifecycleConfig, Population, _death_order, lifecycle_step
from sandbox.lifecycle.kinds import Blend, Child, LeastFit, WorstDomain, dying

ROOT = Path(__file__).resolve().parents[1]
AGE = "examples.age_death:OldestDies"
RANDOM = "examples.random_domain:RandomDomain"
ARITH = "lifecycle_ops:TaskArithmetic"
#: tests/test_plugin_example.py's fast analytic sweep, with the lifecycle (an event every 5 of 30 steps).
FLAGS = ["--points", "3", "--seeds", "2", "--steps", "30", "--population", "4", "--domains", "2", "--slots", "3",
         "--dim", "8", "--rank", "2", "--true-rank", "1", "--context-dim", "4", "--draws", "2", "--eval-draws", "4",
         "--tune", "off", "--no-figures", "--lifecycle", "--interval", "5"]
#: tests/test_factorial.py's tiny cell settings (lifecycle events at steps 2 and 4).
TINY = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]

#: docs/plugins.md's inheritance from scratch, verbatim.
OPS = textwrap.dedent('''
    import torch

    from sandbox.adapters import refactor


    class TaskArithmetic:
        receiver = "neighbour"

        def inherit(self, A_r, B_r, A_d, B_d, cfg, generator):
            L = torch.cat([B_r, cfg.inherit_alpha * B_d], dim=-1)     # (n, d_out, 2r)
            R = torch.cat([A_r, A_d], dim=-2)                          # (n, 2r, d_in)
            return refactor(L, R, A_r.shape[-2])                        # best rank-r factors of N + alpha D
''')


@pytest.fixture(autouse=True)
def _importable(monkeypatch, tmp_path_factory):
    monkeypatch.syspath_prepend(str(ROOT))
    folder = tmp_path_factory.mktemp("ops")
    (folder / "lifecycle_ops.py").write_text(OPS)
    monkeypatch.syspath_prepend(str(folder))


def test_the_docs_show_the_tested_inheritance():
    assert OPS.strip() in (ROOT / "docs" / "plugins.md").read_text()


def test_the_builtins_are_registered_objects_of_the_same_protocols():
    assert isinstance(plugins.resolve("death", "least-fit"), LeastFit)
    assert isinstance(plugins.resolve("inheritance", "blend"), Blend) and Blend.receiver == "neighbour"
    assert isinstance(plugins.resolve("inheritance", "child"), Child) and Child.receiver == "newborn"
    assert isinstance(plugins.resolve("reallocation", "worst-domain"), WorstDomain)
    for key, name in (("death", "least-fit"), ("inheritance", "child"), ("reallocation", "worst-domain")):
        assert name in plugins.GROUPS[key].names()


@pytest.mark.parametrize("seed", range(20))
def test_least_fit_through_the_registry_is_the_old_death_order(seed):
    g = torch.Generator().manual_seed(seed)
    n, K = 5, int(torch.randint(2, 7, (1,), generator=g))
    fit = torch.randn(n, K, generator=g, dtype=torch.float64).round(decimals=1)   # ties
    fit[torch.rand(n, K, generator=g) < 0.2] = math.nan
    ages = torch.randint(0, 4, (n, K), generator=g) * 10
    cfg = LifecycleConfig(n_die=int(torch.randint(1, 5, (1,), generator=g)), min_age=10)
    order, valid = dying(cfg, fit, ages, g)
    old, old_valid = _death_order(fit, ages, cfg.n_die, cfg.min_age)
    assert torch.equal(valid.sum(-1), old_valid.sum(-1))
    for i in range(n):
        k = int(valid[i].sum())
        assert order[i, :k].tolist() == old[i, :k].tolist()   # the same slots, in the same order


def test_oldest_dies_picks_the_oldest_then_the_least_fit():
    from examples.age_death import OldestDies

    cfg = LifecycleConfig(death_kind=AGE, n_die=2, min_age=10)
    fit = torch.tensor([[0.3, -0.1, math.nan, 0.2], [0.0, 0.5, 0.1, -0.4], [0.1, 0.2, 0.3, 0.4]], dtype=torch.float64)
    ages = torch.tensor([[20, 20, 5, 30], [10, 10, 10, 10], [12, 0, 0, 0]])
    dead = OldestDies().dies(fit, ages, cfg, None)
    assert dead.tolist() == [[False, True, False, True], [True, False, False, True], [True, False, False, False]]
    order, valid = dying(cfg, fit, ages, None)          # processed least fit first
    assert order[1].tolist() == [3, 0] and valid.tolist() == [[True, True], [True, True], [True, False]]


def _bank(n, K, gen, r=2, d_in=6, d_out=5):
    return (torch.randn(n, K, r, d_in, generator=gen, dtype=torch.float64),
            torch.randn(n, K, d_out, r, generator=gen, dtype=torch.float64))


def test_a_lifecycle_step_with_every_plugin_counts_its_events():
    gen = torch.Generator().manual_seed(3)
    n, K, M, F = 6, 4, 3, 5
    A, B = _bank(n, K, gen)
    rp = {"W": torch.randn(n, F, K, generator=gen, dtype=torch.float64),
          "bias": torch.randn(n, K, generator=gen, dtype=torch.float64)}
    pop = Population(torch.arange(K).repeat(n, 1), torch.tensor([30, 10, 30, 20]).repeat(n, 1),
                     torch.full((n, K), -1), torch.full((n,), K), 0)
    fit = torch.randn(n, K, generator=gen, dtype=torch.float64)
    losses, feats = torch.rand(n, M, generator=gen, dtype=torch.float64), torch.randn(n, M, F, generator=gen)
    cfg = LifecycleConfig(min_age=0, death_kind=AGE, inherit_mode=ARITH, reallocation_kind=RANDOM, realloc_noise=0.0)
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    _, (A2, B2), rp2, events = lifecycle_step(pop, (A, B), rp, fit, cfg, gens, 0, losses, feats)
    deaths = [e for e in events if e["event"] == "death"]
    assert len(deaths) == n and len(events) == 3 * n            # death, inherit (into the neighbour), birth
    for e in deaths:                                            # the older of slots 0 and 2, least fit first
        i = e["batch"]
        assert e["slot"] == (0 if fit[i, 0] <= fit[i, 2] else 2)
    for e in (e for e in events if e["event"] == "inherit"):    # neighbour <- best rank-2 of N + alpha D
        i, nb, d = e["batch"], e["slot"], e["parent_slot"]
        dense = B[i, nb] @ A[i, nb] + 0.5 * B[i, d] @ A[i, d]
        s = torch.linalg.svdvals(dense)
        got = torch.linalg.matrix_norm(B2[i, nb] @ A2[i, nb] - dense)
        torch.testing.assert_close(got, s[2:].pow(2).sum().sqrt())
    births = [e for e in events if e["event"] == "birth"]
    targets = [e["domain"] for e in births]
    assert all(0 <= t < M for t in targets) and len(set(targets)) > 1   # drawn, not always the worst domain
    for e in births:                # the freed column's logit rises by realloc_push on its drawn domain
        i, k, p, m = e["batch"], e["slot"], e["parent_slot"], e["domain"]
        z_new, z_par = feats[i].double() @ rp2["W"][i, :, k], feats[i].double() @ rp["W"][i, :, p]
        gain = (z_new - z_new.mean()) - (z_par - z_par.mean())
        assert gain[m].item() == pytest.approx(1.0, abs=1e-9)


def _sweep(tmp_path, name, *extra):
    assert main(["sweep", *FLAGS, *extra, "--out", str(tmp_path / name)]) == 0
    res = pd.read_csv(tmp_path / name / "results.csv")
    return res[res["arm"] == "evo"].set_index(["point", "seed"])


def test_lifecycle_plugins_run_the_analytic_map(tmp_path):
    base = _sweep(tmp_path, "builtin")
    for name, flag, value in (("age", "--death", AGE), ("random", "--reallocation", RANDOM),
                              ("arith", "--inherit-mode", ARITH)):
        mine = _sweep(tmp_path, name, flag, value)
        assert (mine["lifecycle_events"] > 0).all() and mine["final_loss"].notna().all()
        assert mine["lifecycle_events"].equals(base["lifecycle_events"])   # same count of deaths, births, inherits
        assert not mine["final_loss"].equals(base["final_loss"]), name
        solver = json.loads((tmp_path / name / "manifest.json").read_text())["config"]["solver"]
        assert solver[flag[2:].replace("-", "_")] == value              # the run records the plugin it ran


def _deaths_follow_age(folder: Path) -> int:
    """Every death in `folder`'s lifecycle.csv took the oldest slot alive, least fit among equally
    old (ages from the births in the same table, fitness from fitness.csv)."""
    events, fitness = pd.read_csv(folder / "lifecycle.csv"), pd.read_csv(folder / "fitness.csv")
    born = {int(r.slot_id): int(r.step) for r in events[events["event"] == "birth"].itertuples()}
    deaths = events[events["event"] == "death"]
    for d in deaths.itertuples():
        alive = fitness[fitness["step"] == d.step]
        birth = alive["slot_id"].map(lambda i: born.get(int(i), 0))
        oldest = alive[birth == birth.min()]
        assert int(d.slot_id) == int(oldest.sort_values(["fitness", "slot"]).iloc[0]["slot_id"]), (d, alive)
    return len(deaths)


def test_a_death_plugin_runs_full_and_the_factorial(tmp_path):
    cache = str(tmp_path / "cache")
    assert main(["full", "--cell", "R+L", *TINY, "--death", AGE, "--reallocation", RANDOM, "--device", "cpu",
                 "--seeds", "0,", "--cache", cache, "--out", str(tmp_path / "full")]) == 0
    assert _deaths_follow_age(tmp_path / "full" / "seed-0") == 2      # events at steps 2 and 4
    births = pd.read_csv(tmp_path / "full" / "seed-0" / "lifecycle.csv").query("event == 'birth'")
    assert births["domain"].between(0, 3).all()
    assert main(["factorial", "--cells", "B3,R+L", "--seeds", "1", *TINY, "--death", AGE, "--device", "cpu",
                 "--no-figures", "--cache", cache, "--out", str(tmp_path / "fact")]) == 0
    cells = pd.read_csv(tmp_path / "fact" / "cells.csv")
    assert list(cells["cell"]) == ["B3", "R+L"] and cells["balanced_log_ppl"].notna().all()
    trial = next((tmp_path / "fact").rglob("R+L*/lifecycle.csv")).parent
    assert _deaths_follow_age(trial) == 2
    metrics = json.loads((trial / "metrics.json").read_text())
    assert metrics["lifecycle_events"] == 2 and metrics["config"]["death"] == AGE


def test_identities_name_a_plugin_and_keep_the_builtins_out():
    from sandbox.analytic import AnalyticConfig
    from substrate.cell import CellConfig

    assert not {"death", "inherit_mode", "reallocation"} & set(AnalyticConfig().identity())
    assert AnalyticConfig(death=AGE).identity()["death"] == AGE
    assert AnalyticConfig(inherit_mode="child").identity()["inherit_mode"] == "child"
    tiny = dict(cell="R+L", preset="tiny", steps=100)
    assert not {"death", "reallocation"} & set(CellConfig.of(**tiny).identity())
    assert CellConfig.of(**tiny, reallocation=RANDOM).identity()["reallocation"] == RANDOM


def test_an_entry_point_names_a_death_plugin(monkeypatch):
    from importlib import metadata

    ep = metadata.EntryPoint(name="oldest", value=AGE, group="molora.deaths")
    real = metadata.entry_points
    monkeypatch.setattr(plugins, "entry_points", lambda group=None: [ep] if group == "molora.deaths" else real(group=group))
    assert type(plugins.resolve("death", LifecycleConfig(death_kind="oldest").death_kind)).__name__ == "OldestDies"
    assert "oldest" in plugins.GROUPS["death"].names()


BROKEN = textwrap.dedent('''
    import torch

    class NoDies:
        pass

    class LongMask:
        def dies(self, fitness, ages, cfg, generator):
            return torch.zeros(fitness.shape, dtype=torch.long)

    class Everyone:
        def dies(self, fitness, ages, cfg, generator):
            return torch.ones(fitness.shape, dtype=torch.bool)

    class Transposed:
        def dies(self, fitness, ages, cfg, generator):
            return torch.zeros(fitness.shape[::-1], dtype=torch.bool)

    class DropsRank:
        def inherit(self, A_r, B_r, A_d, B_d, cfg, generator):
            return A_r[:, :1], B_r[:, :, :1]

    class Sideways:
        receiver = "parent"
        def inherit(self, A_r, B_r, A_d, B_d, cfg, generator):
            return A_r, B_r

    class NoBias:
        def reallocate(self, parent, domain_losses, domain_features, cfg, generator):
            return {"W": parent["W"]}, torch.full((parent["W"].shape[0],), -1)

    class FarDomain:
        def reallocate(self, parent, domain_losses, domain_features, cfg, generator):
            return dict(parent), torch.full((parent["W"].shape[0],), 7)
''')


@pytest.mark.parametrize("flag, name, says", [
    ("--death", "NoDies", "NoDies has no dies() method"),
    ("--death", "LongMask", "LongMask.dies() returned (2, 4) torch.int64; expected a bool tensor (n, K) = (2, 4)"),
    ("--death", "Everyone", "Everyone.dies() marked all 4 slots of a row; expected a bool (n, K) with at least one"),
    ("--death", "Transposed", "Transposed.dies() returned (4, 2) torch.bool; expected a bool tensor (n, K) = (2, 4)"),
    ("--inherit-mode", "DropsRank", "DropsRank.inherit() returned ((3, 1, 5), (3, 4, 1)); expected the receiver's "
                                    "(A (n, r, d_in), B (n, d_out, r)) = ((3, 2, 5), (3, 4, 2))"),
    ("--inherit-mode", "Sideways", "Sideways.receiver is 'parent'; expected 'neighbour' or 'newborn'"),
    ("--reallocation", "NoBias", "NoBias.reallocate() returned ({'W': (2, 3, 3)}, (2,)); expected (the parent's "
                                 "columns, same names and shapes, and an integer target) = ({'W': (2, 3, 3), 'bias': "
                                 "(2, 3), 'phi': (2, 3)}, target (n,) = (2,))"),
    ("--reallocation", "FarDomain", "FarDomain.reallocate() returned target [7, 7]; expected domains in [-1, 5)"),
])
def test_a_lifecycle_plugin_that_breaks_its_protocol_gets_one_line_and_exit_2(tmp_path, monkeypatch, capsys, flag,
                                                                              name, says):
    (tmp_path / "broken_ops.py").write_text(BROKEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["sweep", *FLAGS, flag, f"broken_ops:{name}", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag} 'broken_ops:{name}'") and says in err, err
    with pytest.raises(BadInput, match=flag):      # the transformer's config refuses it the same way
        from substrate.cell import CellConfig

        key = {"--death": "death", "--inherit-mode": "inherit_mode", "--reallocation": "reallocation"}[flag]
        CellConfig.of(cell="R+L", preset="tiny", **{key: f"broken_ops:{name}"})
