"""Frozen contracts, continued: the key functions and compatibility rules that tests/test_contracts.py
does not reach (the acar options, the lifecycle operators at other values, one learning rate, several
bases, full fine-tuned copies, the pretraining cache key). Taken from main on 2026-12-07, before the
hand-written identities became field rules (`sandbox.identity`); like tests/test_contracts.py, a
change that moves one of them breaks the folders, ledgers or caches written before it.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from sandbox.analytic import AnalyticConfig
from sandbox.results import config_hash
from sandbox.tasks import TaskSpec
from sandbox.tuning import TuneConfig
from substrate.cell import CellConfig
from substrate.corpus import CorpusConfig
from substrate.fusion import FusionConfig
from substrate.model import preset
from substrate.routing import RoutingArms
from substrate.train import TrainConfig, pretrain_key
from sweeps import factorial as sfact
from sweeps import fusion as sfusion
from sweeps import grid, substrate_map

GOLDEN = {
    "analytic_acar": "9ae06ecad76d4a95",
    "analytic_lifecycle_ops": "fcd13b602e4e04ac",
    "analytic_every_is_interval": "6be5487d6a7ddaa4",
    "tune_widened": "tune:b2079f4417ba6e82",
    "own_acar": "e6c0b6c7369c04fb",
    "sweep_folder_acar_axis": "a1bef74cc6",
    "cell_one_lr": "5d64146c62",
    "cell_router_lr": "254fd9f133",
    "cell_base_seed": "b40a611074",
    "cell_operators": "3138aa8524",
    "cell_fresh": "619480b24c",
    "factorial_operators": "factorial-eda881656c",
    "substrate_point_acar": "4f5769b1c6531a87",
    "substrate_point_fresh": "e4b6c839057f80a4",
    "substrate_point_operators": "4113bbd40dad3d9a",
    "substrate_folder_acar_axis": "740b88c025",
    "substrate_folder_operators": "c9b00e347b",
    "fusion_point_full": "3a1f8b42b6260bd7",
    "fusion_folder_full": "253dcfcd2a",
    "pretrain_tiny": "fa07db5fdc43472f",
    "corpus_other": "fc8c51de56",
}


def _identities() -> dict[str, str]:
    spec, solver = TaskSpec(), AnalyticConfig()
    acar = dataclasses.replace(solver, acar=True, acar_tol=0.3)
    ops = dataclasses.replace(solver, lifecycle=True, lifecycle_every=7, inherit_mode="child")
    cell_ops = CellConfig.of(cell="R+L", selection="roulette", crossover="slerp", crossover_t=0.25,
                             mutation="finetune", finetune_steps=2, router_init="zero", tau_scales="logit",
                             router_kind="acar", inherit_mode="child")
    arms_ops = dataclasses.replace(RoutingArms(), cell=CellConfig.of(cell="B3", preset="tiny", steps=100,
                                                                      router_init="zero", tau_scales="logit",
                                                                      selection="roulette"))
    return {
        "analytic_acar": grid.point_key(spec, acar),
        "analytic_lifecycle_ops": grid.point_key(spec, ops),
        "analytic_every_is_interval": grid.point_key(spec, dataclasses.replace(solver, lifecycle_every=10)),
        "tune_widened": grid.tune_key(spec, solver, TuneConfig(widen=3, robust=True)),
        "own_acar": grid.own_key(dataclasses.replace(spec, alignment=0.5), acar, "acar"),
        "sweep_folder_acar_axis": config_hash(grid.SweepConfig(solver=acar, axis="lr", axis_range=(0.01, 0.1),
                                                               axis_points=3, points=3).folder_key()),
        "cell_one_lr": config_hash(CellConfig.of(router_lr=3e-3).identity()),
        "cell_router_lr": config_hash(CellConfig.of(router_lr=0.05).identity()),
        "cell_base_seed": config_hash(CellConfig.of(bases=3, seed=4).identity()),
        "cell_operators": config_hash(cell_ops.identity()),
        "cell_fresh": config_hash(CellConfig.of(preset="tiny", steps=30, train_data="fresh").identity()),
        "factorial_operators": sfact.study_name(sfact.FactorialConfig(base=dataclasses.replace(cell_ops, bases=2))),
        "substrate_point_acar": substrate_map.point_key(dataclasses.replace(RoutingArms(), acar=True)),
        "substrate_point_fresh": substrate_map.point_key(dataclasses.replace(
            RoutingArms(), cell=CellConfig.of(cell="B3", preset="tiny", steps=100, train_data="fresh"))),
        "substrate_point_operators": substrate_map.point_key(arms_ops),
        "substrate_folder_acar_axis": config_hash(substrate_map.SubstrateSweepConfig(
            arms=dataclasses.replace(RoutingArms(), acar=True), axis="population", axis_range=(4, 8),
            points=2, axis_points=2).folder_key()),
        "substrate_folder_operators": config_hash(substrate_map.SubstrateSweepConfig(arms=arms_ops,
                                                                                     points=2).folder_key()),
        "fusion_point_full": sfusion.point_key(FusionConfig(specialists="full")),
        "fusion_folder_full": config_hash(sfusion.FusionSweepConfig(base=FusionConfig(specialists="full")).folder_key()),
        "pretrain_tiny": pretrain_key(preset("tiny", slots=4, rank=2), SimpleNamespace(key="4c6136dccd"),
                                      TrainConfig(steps=60, warmup=6)),
        "corpus_other": config_hash({"kind": "synthetic", **dataclasses.asdict(CorpusConfig(domains=3))}),
    }


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_key_hashes_are_frozen(name):
    assert _identities()[name] == GOLDEN[name], (
        f"{name}: the hash that names existing folders/ledgers/caches changed; old runs would no longer resume")
