"""The regime map on the transformer: `sandbox sweep --system substrate`.

The same ledger (one trial per (point, seed), resumable), statistics (`sandbox.stats.decompose`:
delta, delta_restart, room, accepted, the same labels) and figures (`figures.report`) as the
analytic map (`sweeps.grid`); the arms are `substrate.routing.run_arms` on one shared frozen base
(`substrate.cell.prepare_substrate`, cached). A point sets the alignment (the starting bank
between random and the per-domain specialists) and at most one more axis from `AXES`.

results.csv: one row per point x seed x arm with ``log_loss`` = balanced held-out log-PPL (so
``delta = log PPL_grad - log PPL_evo``), ``generations``, ``accepted`` (share of generations in
which the search changed the router), ``step_size``, ``diverged``, ``wall_s``. With ``--acar``
(`RoutingArms.acar`) an ``acar`` arm is added (sigma routing on the grad arm's final router and
adapters) with ``mode1..3`` (held-out tokens gated with 1 / 2 / 3 slots), ``mean_slots`` and
``saved_vs_always3``, and summary.csv gets ``delta_acar`` and its statistics (`sandbox.stats.acar_summary`).

`SubstrateMap` is this system behind the map driver (`sweeps.grid.MapSystem`): each missing
(point, seed) is run and recorded as soon as it finishes, so a kill loses at most the trial in
flight; the shared base is prepared (and checked, `base_check`) only when something is missing.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from sandbox.acar import MODES, USAGE_COLUMNS, usage
from sandbox.errors import require
from sandbox.identity import identity, key, never, rules
from sandbox.results import config_hash
from sandbox.stats import DEFAULT_ALPHA, DEFAULT_EPS
from substrate.defaults import GPU_PRESET, PRESET_STEPS
from substrate.routing import ARMS, RoutingArms
from sweeps.points import Point, axes_of, bounds_of, check_payload_key, grid_points, seed_outcome

#: Axes of the substrate map besides alignment: name -> (lowest, highest, integer?).
AXES: dict[str, tuple[float, float, bool]] = {
    "plasticity": (0.0, 100.0, False),
    "population": (3, 4096, True),
    "interval": (1, 100_000, True),
    "steps": (1, 1_000_000, True),
    "mutation_scale": (1e-6, 100.0, False),
}
DEFAULT_STUDY = "substrate-sweep"


@dataclass(frozen=True)
class MapDefaults:
    """The substrate map's defaults on one kind of machine, used where its option is not given
    (`SubstrateSweepConfig.defaults_for`). The steps are the preset's own
    (`substrate.defaults.PRESET_STEPS`, declared there once; `SubstrateSweepConfig.steps_for`)."""

    preset: str
    """Model preset (`substrate.model.PRESETS`)."""
    points: int
    """Alignment points."""
    seeds: tuple[int, ...]
    """Seeds per point."""


#: On a CPU a map that finishes in minutes on 2 cores; with CUDA the GPU preset.
CPU_DEFAULTS = MapDefaults(preset="tiny", points=5, seeds=(0, 1, 2, 3, 4))
GPU_DEFAULTS = MapDefaults(preset=GPU_PRESET, points=5, seeds=(0, 1, 2))


@dataclass(frozen=True)
class SubstrateSweepConfig:
    """A substrate map: the base comparison, the grid, the seeds and the statistics settings."""

    arms: RoutingArms = field(default_factory=RoutingArms)
    alignment: tuple[float, float] = (0.0, 1.0)
    points: int = 3
    axis: str | None = None
    axis_range: tuple[float, float] | None = None
    axis_points: int = 3
    seeds: tuple[int, ...] = field(default=(0, 1, 2), metadata=rules(never("more seeds grow the same map")))
    eps: float = field(default=DEFAULT_EPS, metadata=rules(never("a statistics setting")))
    alpha: float = field(default=DEFAULT_ALPHA, metadata=rules(never("a statistics setting")))
    cache: str = "runs/cache"
    """Folder of the cached corpus, pretrained base and specialists."""

    def __post_init__(self) -> None:
        lo, hi = self.alignment
        require(0.0 <= lo <= hi <= 1.0, "alignment", f"{lo}..{hi}", "LO..HI with 0 <= LO <= HI <= 1")
        require(isinstance(self.points, int) and 1 <= self.points <= 101, "points", self.points, "an integer in [1, 101]")
        if self.axis is not None:
            require(self.axis in AXES, "axis", self.axis, "NAME=LO..HI with NAME one of: " + ", ".join(sorted(AXES)))
            require(self.axis_range is not None, "axis", self.axis, "NAME=LO..HI")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
                "at least one distinct seed")
        for values in self.grid_points():
            point_arms(self, values, self.seeds[0])      # every point must be a valid configuration

    @classmethod
    def defaults_for(cls, device: str) -> MapDefaults:
        """The map's machine-dependent defaults (preset, points, seeds) where it runs: `GPU_DEFAULTS`
        on cuda, `CPU_DEFAULTS` elsewhere; the command takes them where the option is not given."""
        return GPU_DEFAULTS if device == "cuda" else CPU_DEFAULTS

    @staticmethod
    def steps_for(preset: str) -> int:
        """Adaptation steps of each arm on `preset`: the preset's own, 100 for one it does not list."""
        return PRESET_STEPS.get(preset, 100)

    @staticmethod
    def search_every_for(steps: int) -> int:
        """Steps between generations of the routing search when ``--search-every`` is not given: a
        tenth of the arms' steps (at least 1), so every budget gets ten generations."""
        return max(1, steps // 10)

    @property
    def axes(self) -> list[str]:
        return axes_of(self)

    def grid_points(self) -> list[dict]:
        return grid_points(self, AXES)

    def bounds(self) -> dict:
        return bounds_of(self)

    def folder_key(self) -> dict:
        """What names the default folder: the fields after their rules (`sandbox.identity`, view
        ``map-folder``: the cell nested, as the map first wrote it)."""
        return identity(self, "map-folder")


def point_arms(cfg: SubstrateSweepConfig, values: dict, seed: int) -> RoutingArms:
    """The comparison of one (point, seed): the base with alignment, the axis value and the seed."""
    rc = cfg.arms
    cell = dataclasses.replace(rc.cell, alignment=float(values["alignment"]), seed=int(seed))
    ecfg = rc.evolution
    kw = {}
    for k, v in values.items():
        if k == "plasticity":
            kw["plasticity"] = float(v)
        elif k in ("population", "interval", "mutation_scale"):
            ecfg = dataclasses.replace(ecfg, **{k: v})
        elif k == "steps":
            cell = dataclasses.replace(cell, steps=int(v))
    return dataclasses.replace(rc, cell=cell, evolution=ecfg, **kw)


def arms_payload(rc: RoutingArms) -> dict:
    """`rc` as plain data, its cell under flat names (`CellConfig.flat`): a ledger payload and the
    input of `point_key` (`sweeps.systems.run_substrate_point` rebuilds it)."""
    return {**dataclasses.asdict(rc), "cell": rc.cell.flat()}


def point_key(rc: RoutingArms) -> str:
    """Ledger identity of a point: its full comparison config without the seed (and device), the
    cell under its flat names (`sandbox.identity`, view ``map-point``)."""
    return key({"system": "substrate", "arms": rc}, 16, view="map-point")


def seed_rows(res: dict) -> list[dict]:
    """results.csv rows (one per arm) of one (point, seed) from `substrate.routing.run_arms`."""
    rows = []
    for arm, r in res.items():
        ok = r["diverged_step"] < 0 and math.isfinite(r["balanced"])
        gens = r["generations"]
        rows.append({"arm": arm, "log_loss": r["balanced"] if ok else float("nan"),
                     "final_loss": math.exp(r["balanced"]) if ok else float("nan"),
                     "diverged": not ok, "diverged_step": r["diverged_step"], "generations": gens,
                     "accepted": r["accepted"] / gens if gens else 0.0, "unconfirmed": r.get("unconfirmed", 0),
                     "step_size": r["step_size"],
                     "lifecycle_events": 0, "wall_s": r["wall_s"],
                     **(usage(dict(zip(MODES, r["modes"]))) if "modes" in r else {})})
    return rows


def base_check(sub, cell) -> dict:
    """Is the frozen base memorising? Its training-split NLL against the corpus's entropy floor
    (exact on the synthetic domains; real text has no floor, NaN): a base whose training loss sits
    below the floor has learnt the training windows, not the languages, and a map on it measures
    that. Returns ``{train_nll, heldout_nll, floor, memorising}`` (balanced over domains)."""
    import math

    import torch

    from substrate.cell import build_state
    from substrate.train import evaluate

    st = build_state(cell, sub)
    with torch.no_grad():
        train = evaluate(st.model, sub.corpus, "train", None, max_windows=64, device=cell.device)
    floor = float(train.floors.mean())
    tr, held = float(train.nll.mean()), sum(sub.base_nll) / len(sub.base_nll)
    return {"train_nll": tr, "heldout_nll": held, "floor": floor,
            "memorising": bool(math.isfinite(floor) and tr < floor - 0.01)}


def seed_delta(rows: list[dict]) -> float:
    """A trial's value: ``log_loss`` of grad - evo (NaN without both arms)."""
    by = {r["arm"]: r["log_loss"] for r in rows}
    return by["grad"] - by["evo"] if {"grad", "evo"} <= set(by) else float("nan")


class SubstrateMap:
    """The transformer behind the map driver (`sweeps.grid.MapSystem`); `log` reads the base's
    preparation and its memorisation warning."""

    name = "substrate"
    study = DEFAULT_STUDY
    axes_table = AXES

    def __init__(self, cfg: SubstrateSweepConfig, log: Callable[[str], None] | None = None):
        self.cfg, self.log = cfg, log
        self.base: dict | None = None

    def plan(self, points: list[dict], study=None) -> list[Point]:
        cfg = self.cfg
        return [Point(values, point_key(point_arms(cfg, values, cfg.seeds[0])), tuple(cfg.seeds)) for values in points]

    def evaluate(self, pending: list[tuple[Point, list[int]]], trials) -> None:
        from substrate.cell import prepare_substrate
        from substrate.routing import run_arms

        cfg = self.cfg
        sub = prepare_substrate(cfg.arms.cell, cfg.cache, self.log)
        self.base = base = base_check(sub, cfg.arms.cell)
        if base["memorising"] and self.log:
            self.log(f"WARNING: the base is memorising (training NLL {base['train_nll']:.3f} below the entropy "
                     f"floor {base['floor']:.3f}): the map measures a memorised base")
        for plan, missing in pending:
            for seed in missing:
                rows = seed_rows(run_arms(point_arms(cfg, plan.values, seed), sub))
                trials.record(plan, [(seed, rows, seed_delta(rows))])

    def result_columns(self) -> list[str]:
        cols = ["final_loss", "log_loss", "diverged", "diverged_step", "generations", "accepted", "unconfirmed",
                "step_size", "lifecycle_events", "wall_s"]
        return cols + (list(USAGE_COLUMNS) if self.cfg.arms.acar else [])   # the acar arm's mode usage

    def summary_options(self) -> dict:
        # domain-oracle routing is not a proven bound on the transformer: room is reported, no-room never used
        return {"oracle_is_ceiling": False}

    def annotate(self, summary, plans):
        return summary

    def tables(self, plans) -> dict:
        return {}

    def manifest(self) -> dict:
        return {"system": "substrate"}

    def finish(self) -> dict:
        return {"base_check": self.base} if self.base else {}

    def payload(self, plan: Point, seed: int) -> dict:
        """The point's full comparison at `seed` and the shared base's cache (made absolute, so
        workers on a shared filesystem reuse it)."""
        return {"arms": arms_payload(point_arms(self.cfg, plan.values, seed)), "cache": os.path.abspath(self.cfg.cache)}

    @staticmethod
    def run_job(job: dict, ctx) -> object:
        """One (point, seed) on a worker (`sweeps.systems.SYSTEMS`): the base is prepared once per
        worker (cached on disk); refuses a payload that hashes differently here."""
        from sandbox.evolution import EvolutionConfig
        from substrate.cell import CellConfig, prepare_substrate
        from substrate.routing import run_arms

        d = job["arms"]
        rc = RoutingArms(cell=CellConfig.of(**d["cell"]), evolution=EvolutionConfig(**d["evolution"]),
                         **{k: v for k, v in d.items() if k not in ("cell", "evolution")})
        check_payload_key(point_key(rc), job)
        cache = ctx.cache or job["cache"]
        base = config_hash({**rc.cell.identity(), "cell": None, "seed": None, "alignment": None, "cache": str(cache)})
        sub = ctx.substrates.get(base)
        if sub is None:
            sub = ctx.substrates[base] = prepare_substrate(rc.cell, cache, ctx.log)
        rows = seed_rows(run_arms(rc, sub))
        return seed_outcome(rows, seed_delta(rows))


def run_substrate_sweep(cfg: SubstrateSweepConfig, out: Path, storage: str | None = None, study: str | None = None,
                        progress: Callable[[int, int, dict], None] | None = None, figures: bool = True,
                        argv: list[str] | None = None, log: Callable[[str], None] | None = None,
                        overwrite: bool = False):
    """Run (or resume) a substrate map into `out` (`sweeps.grid.run_map` with `SubstrateMap`); returns
    its `sweeps.grid.MapOutcome` (``base``: the base check, when the base was prepared)."""
    from sweeps.grid import run_map

    return run_map(SubstrateMap(cfg, log), out, storage=storage, study=study, progress=progress, figures=figures,
                   argv=argv, overwrite=overwrite)


__all__ = ["ARMS", "AXES", "SubstrateMap", "SubstrateSweepConfig", "run_substrate_sweep", "point_arms", "point_key",
           "seed_rows"]
