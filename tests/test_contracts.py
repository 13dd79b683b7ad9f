"""Frozen contracts: the identities that name run folders, ledger points and studies, and each
command's option names.

A run folder, a ledger and a PostgreSQL study resume only while the hash that names them stays the
same, and scripts keep working only while the flags they pass still exist. These golden values were
taken from main on 2026-12-04; a change that moves one of them breaks every folder written before it
(or every script that used the flag). A deliberate change updates the value here and says in its
commit message how old folders are handled. New options are fine (the option sets are checked as
supersets); removing or renaming one is not (keep the old name as a hidden alias).
"""

from __future__ import annotations

import dataclasses

import pytest
import typer

from sandbox.analytic import AnalyticConfig
from sandbox.results import config_hash
from sandbox.tasks import TaskSpec
from sandbox.tuning import TuneConfig
from substrate.cell import CellConfig
from substrate.corpus import CorpusConfig
from substrate.fusion import FusionConfig
from substrate.routing import RoutingArms
from sweeps import factorial as sfact
from sweeps import fusion as sfusion
from sweeps import grid, substrate_map
from sweeps.systems import code_identity

GOLDEN = {
    "analytic_default": "6be5487d6a7ddaa4",
    "analytic_sigmoid": "9225cb31a3a2e815",
    "tune_default": "tune:52b26b465dcedead",
    "own_restart": "15c25d12061f8064",
    "sweep_folder": "0fb3994aac",
    "substrate_point": "a861d7438aa0b638",
    "substrate_folder": "2af391a554",
    "fusion_point": "c9160b346ea7628f",
    "fusion_folder": "0249a30f5a",
    "cell_small": "23e3ef44a2",
    # 2026-12-07 (issue 26, part 3): tiny x 100 steps reads each of its 128 fixed windows per domain 1.6
    # times, so its default became fresh windows (`CellConfig.train_data`): a different run, a new hash.
    # The earlier runs keep their hashes with --train-data windows (the *_windows entries: the old values).
    "cell_tiny_R": "a88fe8cc2c",
    "cell_tiny_R_windows": "584e04cc0b",
    "factorial_study": "factorial-bc6d7f5261",
    "factorial_tiny_study": "factorial-d65cc87d4c",
    "factorial_tiny_study_windows": "factorial-ed0851d5f8",
    # --bases N > 1 names its own study (a seed's base depends on N); --bases 1 keeps the names above.
    "factorial_study_bases3": "factorial-8d0098f388",
    "corpus_default": "4c6136dccd",
    # the code identity's hash scheme (study attribute `code`): a worker refuses a plan whose value differs,
    # so moving the registry to sweeps/systems.py (issue 27) must keep it
    "worker_code": "68e6d818d3ea0ec0",
}


def _identities() -> dict[str, str]:
    spec, solver = TaskSpec(), AnalyticConfig()
    return {
        "analytic_default": grid.point_key(spec, solver),
        "analytic_sigmoid": grid.point_key(dataclasses.replace(spec, alignment=0.3),
                                           dataclasses.replace(solver, router="sigmoid")),
        "tune_default": grid.tune_key(spec, solver, TuneConfig()),
        "own_restart": grid.own_key(spec, solver, "restart"),
        "sweep_folder": config_hash(grid.SweepConfig().folder_key()),
        "substrate_point": substrate_map.point_key(RoutingArms()),
        "substrate_folder": config_hash(substrate_map.SubstrateSweepConfig().folder_key()),
        "fusion_point": sfusion.point_key(FusionConfig()),
        "fusion_folder": config_hash(sfusion.FusionSweepConfig().folder_key()),
        "cell_small": config_hash(CellConfig().identity()),
        "cell_tiny_R": config_hash(CellConfig.of(cell="R", preset="tiny", steps=100).identity()),
        "cell_tiny_R_windows": config_hash(CellConfig.of(cell="R", preset="tiny", steps=100,
                                                         train_data="windows").identity()),
        "factorial_study": sfact.study_name(sfact.FactorialConfig()),
        "factorial_tiny_study": sfact.study_name(sfact.FactorialConfig(base=CellConfig.of(preset="tiny", steps=100))),
        "factorial_tiny_study_windows": sfact.study_name(sfact.FactorialConfig(
            base=CellConfig.of(preset="tiny", steps=100, train_data="windows", bases=1))),
        "factorial_study_bases3": sfact.study_name(sfact.FactorialConfig(base=CellConfig.of(bases=3))),
        "corpus_default": config_hash({"kind": "synthetic", **dataclasses.asdict(CorpusConfig())}),
        "worker_code": code_identity()["hash_scheme"],
    }


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_identity_hashes_are_frozen(name):
    assert _identities()[name] == GOLDEN[name], (
        f"{name}: the hash that names existing folders/ledgers changed; old runs would no longer resume")


#: Each command's option names on 2026-12-04, plus the names added since (2026-12-07: --search-every
#: and --lifecycle-every; --interval stays as their hidden old name).
OPTIONS = {
    "bench": [
        '--device', '--json', '--only', '--out', '--presets', '--quick', '--repeats', '--threads'
    ],
    "cells": [
        '--cells'
    ],
    "factorial": [
        '--alignment', '--alpha', '--anneal-steps', '--batch', '--cache', '--cells', '--checkpoint-every',
        '--context', '--crossover', '--crossover-t', '--data', '--device', '--domains', '--enqueue-only',
        '--eps', '--eval-every', '--eval-windows', '--finetune-lr', '--finetune-steps', '--fit-windows',
        '--floor-max', '--inherit-alpha', '--inherit-mode', '--interval', '--lifecycle-every', '--lr', '--min-age',
        '--mutation', '--mutation-sigma', '--n-die', '--no-figures', '--out', '--per-domain-agg', '--perturb-base',
        '--pooling', '--preset', '--pretrain-steps', '--rank', '--round-seeds', '--router', '--router-init',
        '--router-lr', '--seeds', '--seeds-to-resolve', '--selection', '--slots', '--specialist-steps',
        '--spending', '--steps', '--storage', '--tau-end', '--tau-max', '--tau-min', '--tau-scales',
        '--tau-start', '--threads', '--yes'
    ],
    "full": [
        '--alignment', '--anneal-steps', '--batch', '--cache', '--cell', '--checkpoint-every', '--context',
        '--crossover', '--crossover-t', '--data', '--device', '--domains', '--eval-every', '--eval-windows',
        '--finetune-lr', '--finetune-steps', '--fit-windows', '--floor-max', '--inherit-alpha',
        '--inherit-mode', '--interval', '--lifecycle-every', '--lr', '--min-age', '--mutation', '--mutation-sigma',
        '--n-die', '--out', '--per-domain-agg', '--perturb-base', '--pooling', '--preset', '--pretrain-steps',
        '--rank', '--router', '--router-init', '--router-lr', '--seeds', '--selection', '--slots',
        '--specialist-steps', '--steps', '--stop-after', '--tau-end', '--tau-max', '--tau-min',
        '--tau-scales', '--tau-start', '--threads', '--yes'
    ],
    "fusion": [
        '--alpha', '--batch', '--cache', '--device', '--figures', '--no-figures', '--out', '--preset',
        '--router-lr', '--router-steps', '--seeds', '--specialist-lr', '--specialist-steps',
        '--specialists', '--storage', '--study', '--threads', '--yes'
    ],
    "report": [
        '--out', '--recompute', '--study'
    ],
    "sweep": [
        '--acar', '--acar-tol', '--accept-tol', '--alignment', '--alpha', '--axis', '--axis-points',
        '--batch', '--beta2', '--budget', '--cache', '--chunk-rows', '--confirm', '--context-dim',
        '--context-noise', '--control-beta2', '--converged-frac', '--crossover', '--crossover-t', '--data',
        '--device', '--dim', '--domains', '--draws', '--enqueue-only', '--eps', '--eval-draws', '--evo',
        '--figures', '--finetune-lr', '--finetune-steps', '--fixed-noise', '--fresh-noise',
        '--independent-seeds', '--interval', '--keep-state', '--lifecycle', '--lifecycle-every', '--lora-alpha',
        '--loss-floor',
        '--lr', '--mutation', '--mutation-scale', '--no-acar', '--no-confirm', '--no-figures',
        '--no-lifecycle', '--no-tune-robust', '--oracle', '--out', '--overlap', '--plasticity', '--points',
        '--population', '--preset', '--rank', '--reset-on-accept', '--router', '--scope', '--search',
        '--search-every', '--search-windows', '--seeds', '--selection', '--shared-seeds', '--slots', '--steps', '--storage',
        '--study', '--system', '--threads', '--trials', '--true-rank', '--tune', '--tune-adapter',
        '--tune-beta2', '--tune-lr', '--tune-robust', '--tune-rule', '--tune-seeds', '--tune-widen'
    ],
    "worker": [
        '--cache', '--grace', '--heartbeat', '--max-trials', '--out', '--retries', '--storage', '--study',
        '--threads'
    ],
}


def _option_sets() -> dict[str, set[str]]:
    from sandbox.app.cli import app

    cmd = typer.main.get_command(app)
    return {name: {o for p in sub.params for o in p.opts + p.secondary_opts if o.startswith("-")}
            for name, sub in cmd.commands.items()}


@pytest.mark.parametrize("command", sorted(OPTIONS))
def test_no_option_disappears(command):
    now = _option_sets()
    assert command in now, f"command {command} is gone"
    missing = sorted(set(OPTIONS[command]) - now[command])
    assert not missing, f"sandbox {command}: options removed or renamed: {missing} (keep them as hidden aliases)"
