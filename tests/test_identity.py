"""`sandbox.identity`: the generic identity of a config, driven by the rules on its fields, equals the
hand-written identities it replaced (kept below as the reference, verbatim but for names) over a
hypothesis-drawn range of configs; and the rule vocabulary itself on small hand cases."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sandbox import identity as ident
from sandbox.analytic import AnalyticConfig
from sandbox.errors import BadInput
from sandbox.results import config_hash
from sandbox.tasks import TaskSpec
from sandbox.tuning import TuneConfig
from substrate.cell import CellConfig
from substrate.config import NESTED
from substrate.fusion import FusionConfig
from substrate.model import ModelConfig
from substrate.routing import RoutingArms
from sweeps import factorial as sfact
from sweeps import fusion as sfusion
from sweeps import grid, substrate_map

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much,
                                                                            HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# The reference: the hand-written identities as they stood on main on 2026-12-07
# ---------------------------------------------------------------------------------------------

ANALYTIC_LATER = dict(death="least-fit", inherit_mode="blend", reallocation="worst-domain")
CELL_LATER = dict(router_kind="auto", router_init="zero", selection="tournament", crossover="none",
                  crossover_t=None, mutation="svd", finetune_steps=1, finetune_lr=0.01, tau_scales="logit",
                  train_data="windows", death="least-fit", reallocation="worst-domain")
LATER_CELL_DEFAULTS = dict(death="least-fit", reallocation="worst-domain")
CELL_ONLY = {"bases": 1, "train_data": None}


def ref_analytic_identity(self: AnalyticConfig) -> dict:
    d = dataclasses.asdict(self)
    if d["lifecycle_every"] is None:
        d.pop("lifecycle_every")
    if not self.acar:
        d.pop("acar")
        d.pop("acar_tol")
    for k, v in ANALYTIC_LATER.items():
        if d[k] == v:
            d.pop(k)
    return d


def ref_cell_identity(self: CellConfig) -> dict:
    d = self.flat()
    d.pop("device")
    d.pop("bases")
    d["train_data"] = self.train_data_value
    if self.base_seed:
        d["base_seed"] = self.base_seed
    for k, v in CELL_LATER.items():
        if d[k] == v:
            d.pop(k)
    if d["router_lr"] is not None and d["router_lr"] == d["lr"]:
        d.pop("router_lr")
    return d


def ref_fusion_identity(self: FusionConfig) -> dict:
    d = asdict(self)
    d.pop("seed")
    d.pop("device")
    if d["specialists"] == "lora":
        d.pop("specialists")
    return d


def ref_fusion_folder_key(self: sfusion.FusionSweepConfig) -> dict:
    d = dataclasses.asdict(self)
    for k in ("seeds", "alpha"):
        d.pop(k)
    d["base"].pop("seed")
    d["base"].pop("device")
    if d["base"]["specialists"] == "lora":
        d["base"].pop("specialists")
    return d


def ref_fusion_point_key(cfg: FusionConfig) -> str:
    return config_hash({"system": "fusion", "v": 2, "trial": ref_fusion_identity(cfg)}, n=16)


def ref_sweep_folder_key(self: grid.SweepConfig) -> dict:
    d = dataclasses.asdict(self)
    for k in ("seeds", "eps", "alpha", "converged_frac"):
        d.pop(k)
    d["solver"] = ref_analytic_identity(self.solver)
    return d


def ref_point_key(spec, solver) -> str:
    return config_hash({"task": spec, "solver": ref_analytic_identity(solver)}, n=16)


def ref_tune_key(spec, solver, tune) -> str:
    return "tune:" + config_hash({"task": spec, "solver": ref_analytic_identity(solver), "tune": tune}, n=16)


def ref_own_key(spec, solver, arm) -> str:
    return config_hash({"own": arm, "task": spec, "solver": ref_analytic_identity(solver)}, n=16)


def _drop_cell_only(cell: dict) -> None:
    for k, v in CELL_ONLY.items():
        if k in cell and cell[k] == v:
            cell.pop(k)


def ref_substrate_folder_key(self: substrate_map.SubstrateSweepConfig) -> dict:
    d = dataclasses.asdict(self)
    for k in ("seeds", "eps", "alpha"):
        d.pop(k)
    _drop_cell_only(d["arms"]["cell"])
    if not self.arms.acar:
        d["arms"].pop("acar")
    for k, v in LATER_CELL_DEFAULTS.items():
        group, fld = NESTED[k]
        if d["arms"]["cell"][group][fld] == v:
            d["arms"]["cell"][group].pop(fld)
    return d


def ref_substrate_point_key(rc: RoutingArms) -> str:
    d = {**dataclasses.asdict(rc), "cell": rc.cell.flat()}
    d["cell"].pop("seed")
    d["cell"].pop("device")
    _drop_cell_only(d["cell"])
    if not rc.acar:
        d.pop("acar")
    for k, v in LATER_CELL_DEFAULTS.items():
        if d["cell"][k] == v:
            d["cell"].pop(k)
    return config_hash({"system": "substrate", "arms": d}, n=16)


def ref_factorial_settings(self: sfact.FactorialConfig) -> dict:
    d = ref_cell_identity(self.base)
    d.pop("cell")
    d.pop("seed")
    d.pop("base_seed", None)
    if self.base.bases != 1:
        d["bases"] = self.base.bases
    return d


def ref_base_fields(self: ModelConfig) -> dict:
    return {k: getattr(self, k) for k in ("vocab", "d_model", "n_layer", "n_head", "d_ff", "seq_len")}


# ---------------------------------------------------------------------------------------------
# The keys of sweeps/analytic_map.py and sweeps/substrate_map.py written with `sandbox.identity` (what
# their functions become; until then they are checked here against the reference)
# ---------------------------------------------------------------------------------------------


def new_point_key(spec, solver) -> str:
    return ident.key({"task": spec, "solver": solver}, 16)


def new_tune_key(spec, solver, tune) -> str:
    return "tune:" + ident.key({"task": spec, "solver": solver, "tune": tune}, 16)


def new_own_key(spec, solver, arm) -> str:
    return ident.key({"own": arm, "task": spec, "solver": solver}, 16)


def new_substrate_point_key(rc: RoutingArms) -> str:
    return ident.key({"system": "substrate", "arms": rc}, 16, view="map-point")


def new_substrate_folder_key(cfg: substrate_map.SubstrateSweepConfig) -> dict:
    d = ident.identity(cfg, "map-folder")
    for k in ("seeds", "eps", "alpha"):     # until these fields carry never(...)
        d.pop(k, None)
    return d


def new_sweep_folder_key(cfg: grid.SweepConfig) -> dict:
    d = ident.identity(cfg)
    for k in ("seeds", "eps", "alpha", "converged_frac"):     # until these fields carry never(...)
        d.pop(k, None)
    return d


# ---------------------------------------------------------------------------------------------
# Drawn configs
# ---------------------------------------------------------------------------------------------


def _build(cls, kw):
    try:
        return cls(**kw)
    except BadInput:
        return None


@st.composite
def analytic_configs(draw):
    kw = dict(
        steps=draw(st.sampled_from([0, 1, 20, 150])), lr=draw(st.sampled_from([0.05, 0.01, 1.0])),
        router=draw(st.sampled_from(["softmax", "sigmoid"])), evo=draw(st.sampled_from(["es", "fixed"])),
        interval=draw(st.sampled_from([5, 10])), lifecycle=draw(st.booleans()),
        lifecycle_every=draw(st.sampled_from([None, 5, 7, 10])), acar=draw(st.booleans()),
        acar_tol=draw(st.sampled_from([0.1, 0.25, 0.5])), inherit_mode=draw(st.sampled_from(["blend", "child"])),
        selection=draw(st.sampled_from(["tournament", "roulette"])), batch=draw(st.sampled_from([0, 4])),
        plasticity=draw(st.sampled_from([0.0, 0.1, 1.0])), crossover_t=draw(st.sampled_from([None, 0.3])),
    )
    return AnalyticConfig(**kw)


@st.composite
def cell_configs(draw, *, map_cell: bool = False):
    lr = draw(st.sampled_from([3e-3, 1e-2]))
    kw = dict(
        cell=draw(st.sampled_from(["B3", "R"] if map_cell else ["B3", "R", "E", "L", "R+E", "R+E+L"])),
        preset=draw(st.sampled_from(["tiny", "small"])), steps=draw(st.sampled_from([10, 100, 200, 5000])),
        seed=draw(st.integers(0, 7)), bases=1 if map_cell else draw(st.integers(1, 4)), lr=lr,
        router_lr=draw(st.sampled_from([None, lr, 0.05])),
        router_kind="auto" if map_cell else draw(st.sampled_from(["auto", "acar"])),
        train_data=draw(st.sampled_from([None, "windows", "fresh"])), device=draw(st.sampled_from(["cpu", "cuda"])),
        router_init=draw(st.sampled_from(["zero", "mass"])), tau_scales=draw(st.sampled_from(["logit", "input"])),
        selection=draw(st.sampled_from(["tournament", "roulette"])), crossover=draw(st.sampled_from(["none", "slerp"])),
        crossover_t=draw(st.sampled_from([None, 0.5])), mutation=draw(st.sampled_from(["svd", "finetune"])),
        finetune_steps=draw(st.sampled_from([1, 3])), finetune_lr=draw(st.sampled_from([0.01, 0.1])),
        inherit_mode=draw(st.sampled_from(["blend", "child"])), interval=draw(st.sampled_from([10, 50])),
        floor_max=draw(st.sampled_from([0.1, 0.2])),
    )
    try:
        return CellConfig.of(**kw)
    except BadInput:
        return None


@st.composite
def fusion_configs(draw):
    specialists = draw(st.sampled_from(["lora", "full"]))
    return FusionConfig(preset=draw(st.sampled_from(["tiny", "small"])), specialists=specialists,
                        specialist_steps=draw(st.sampled_from([1, 30])), seed=draw(st.integers(0, 5)),
                        specialist_lr=draw(st.sampled_from([None, 0.02])), device=draw(st.sampled_from(["cpu", "cuda"])),
                        eval_windows=draw(st.sampled_from([None, 8])))


# ---------------------------------------------------------------------------------------------
# Equivalence
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(analytic_configs(), st.sampled_from([TaskSpec(), TaskSpec(alignment=0.5, slots=4)]))
def test_analytic_keys_equal_the_hand_written(solver, spec):
    assert solver.identity() == ref_analytic_identity(solver)
    assert grid.point_key(spec, solver) == ref_point_key(spec, solver) == new_point_key(spec, solver)
    tune = TuneConfig(widen=3)
    assert grid.tune_key(spec, solver, tune) == ref_tune_key(spec, solver, tune) == new_tune_key(spec, solver, tune)
    assert grid.own_key(spec, solver, "evo") == ref_own_key(spec, solver, "evo") == new_own_key(spec, solver, "evo")


@SETTINGS
@given(analytic_configs(), st.sampled_from([None, "lr", "population"]))
def test_sweep_folder_key_equals_the_hand_written(solver, axis):
    rng = {None: None, "lr": (0.01, 0.1), "population": (4, 8)}[axis]
    cfg = _build(grid.SweepConfig, dict(solver=solver, axis=axis, axis_range=rng, points=2, axis_points=2,
                                        task=TaskSpec(slots=4)))
    if cfg is None:
        return
    assert cfg.folder_key() == ref_sweep_folder_key(cfg) == new_sweep_folder_key(cfg)


@SETTINGS
@given(cell_configs())
def test_cell_identity_equals_the_hand_written(cfg):
    if cfg is None:
        return
    assert cfg.identity() == ref_cell_identity(cfg)
    fcfg = _build(sfact.FactorialConfig, dict(base=cfg))
    if fcfg is not None:
        assert fcfg.settings() == ref_factorial_settings(fcfg)


@SETTINGS
@given(cell_configs(map_cell=True), st.booleans(), st.sampled_from([0.5, 1.0]))
def test_substrate_map_keys_equal_the_hand_written(cell, acar, plasticity):
    if cell is None:
        return
    rc = _build(RoutingArms, dict(cell=cell, acar=acar, plasticity=plasticity))
    if rc is None:
        return
    assert substrate_map.point_key(rc) == ref_substrate_point_key(rc) == new_substrate_point_key(rc)
    cfg = _build(substrate_map.SubstrateSweepConfig, dict(arms=rc, points=2))
    if cfg is not None:
        assert cfg.folder_key() == ref_substrate_folder_key(cfg) == new_substrate_folder_key(cfg)


@SETTINGS
@given(fusion_configs(), st.sampled_from([(1, 3), (10,)]))
def test_fusion_keys_equal_the_hand_written(cfg, steps):
    assert cfg.identity() == ref_fusion_identity(cfg)
    assert sfusion.point_key(cfg) == ref_fusion_point_key(cfg)
    scfg = sfusion.FusionSweepConfig(base=cfg, specialist_steps=steps)
    assert scfg.folder_key() == ref_fusion_folder_key(scfg)


@pytest.mark.parametrize("name", ["tiny", "small", "widened-1536"])
def test_base_fields_equal_the_hand_written(name):
    from substrate.model import preset

    m = preset(name, slots=4, rank=2)
    assert m.base_fields == ref_base_fields(m)


# ---------------------------------------------------------------------------------------------
# The vocabulary on hand cases
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Inner:
    a: int = 1
    b: str = field(default="old", metadata=ident.rules(ident.later("b added later")))


@dataclass(frozen=True)
class _Outer:
    x: int = 0
    device: str = field(default="cpu", metadata=ident.rules(ident.never("where, not what")))
    on: bool = False
    tol: float = field(default=0.5, metadata=ident.rules(ident.unless("on", "only with on")))
    lr: float = 1.0
    lr2: float | None = field(default=None, metadata=ident.rules(ident.same_as("lr", "one rate")))
    half: int = field(default=4, metadata=ident.rules(ident.resolved("halved", "enters halved", name="h"),
                                                       ident.later("zero half is the old default", value=0)))
    inner: _Inner = field(default_factory=_Inner, metadata=ident.rules(
        ident.flat({"inner_a": "a", "inner_b": "b"}, "flag names", views="template")))

    @property
    def halved(self) -> int:
        return self.half // 2


def test_each_rule_kind():
    assert ident.identity(_Outer()) == {"x": 0, "on": False, "lr": 1.0, "lr2": None, "h": 2, "inner": {"a": 1}}
    got = ident.identity(_Outer(on=True, lr2=1.0, half=1, inner=_Inner(b="new"), device="cuda"))
    assert got == {"x": 0, "on": True, "tol": 0.5, "lr": 1.0, "inner": {"a": 1, "b": "new"}}
    assert ident.identity(_Outer(), "template") == {"x": 0, "on": False, "lr": 1.0, "lr2": None, "h": 2, "inner_a": 1}
    assert ident.key(_Outer()) == config_hash(ident.identity(_Outer()))
    assert ident.key({"k": [_Outer()]}, 16) == config_hash({"k": [ident.identity(_Outer())]}, 16)
    assert set(ident.field_rules(_Outer)) == {"device", "tol", "lr2", "half", "inner"}


def test_bad_rules_and_views_are_refused():
    with pytest.raises(ValueError, match="views"):
        ident.later("x", views="nowhere")
    with pytest.raises(ValueError, match="why"):
        ident.never("")
    with pytest.raises(ValueError, match="view"):
        ident.identity(_Outer(), "nowhere")
    with pytest.raises(TypeError):
        ident.identity(_Outer)


def test_every_config_rule_is_declared_with_a_reason():
    """The converted configs carry their rules on their fields, each with its reason."""
    from sandbox.lifecycle import LifecycleConfig
    from sandbox.router import RouterConfig

    for cls in (AnalyticConfig, CellConfig, FusionConfig, sfusion.FusionSweepConfig, RoutingArms, RouterConfig,
                LifecycleConfig, ModelConfig):
        declared = ident.field_rules(cls)
        assert declared, cls.__name__
        assert all(r.why for rs in declared.values() for r in rs)


def test_cache_keys_equal_the_hand_written():
    """The specialists' and full copies' cache keys hash the model config whole (`asdict`), which is
    its identity outside the ``base`` view."""
    from substrate.model import preset
    from substrate.train import TrainConfig

    m, t = preset("tiny", slots=4, rank=2), TrainConfig(steps=5, warmup=1, weight_decay=0.0, grad_clip=0.0)
    old = config_hash({"base": "f" * 16, "cfg": asdict(m), "corpus": "c0", "train": asdict(t)}, n=16)
    assert ident.key({"base": "f" * 16, "cfg": m, "corpus": "c0", "train": t}, 16) == old
    assert ident.identity(m, "base") == ref_base_fields(m) != ident.identity(m)
