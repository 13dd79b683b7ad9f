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
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from sandbox.acar import MODES, USAGE_COLUMNS, usage
from sandbox.errors import require
from sandbox.options import Range
from sandbox.results import config_hash
from sandbox.stats import DEFAULT_EPS
from substrate.cell import NESTED
from substrate.routing import ARMS, RoutingArms

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
class SubstrateSweepConfig:
    """A substrate map: the base comparison, the grid, the seeds and the statistics settings."""

    arms: RoutingArms = field(default_factory=RoutingArms)
    alignment: tuple[float, float] = (0.0, 1.0)
    points: int = 3
    axis: str | None = None
    axis_range: tuple[float, float] | None = None
    axis_points: int = 3
    seeds: tuple[int, ...] = (0, 1, 2)
    eps: float = DEFAULT_EPS
    alpha: float = 0.05
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

    @property
    def axes(self) -> list[str]:
        return ["alignment"] + ([self.axis] if self.axis else [])

    def grid_points(self) -> list[dict]:
        aligns = np.round(Range(*self.alignment).grid(self.points), 12)
        if self.axis is None:
            return [{"alignment": float(a)} for a in aligns]
        vals = np.round(Range(*self.axis_range).grid(self.axis_points), 12)
        integer = AXES[self.axis][2]
        vals = np.unique(np.round(vals).astype(int)) if integer else vals
        return [{"alignment": float(a), self.axis: (int(v) if integer else float(v))} for a in aligns for v in vals]

    def bounds(self) -> dict:
        b = {"alignment": tuple(self.alignment)}
        if self.axis:
            b[self.axis] = tuple(self.axis_range)
        return b

    def folder_key(self) -> dict:
        d = dataclasses.asdict(self)
        for k in ("seeds", "eps", "alpha"):
            d.pop(k)
        _drop_cell_only(d["arms"]["cell"])
        if not self.arms.acar:      # only when the acar arm is on, so earlier folders hold
            d["arms"].pop("acar")
        for k, v in LATER_CELL_DEFAULTS.items():   # likewise the lifecycle operators at their built-ins
            group, field = NESTED[k]
            if d["arms"]["cell"][group][field] == v:
                d["arms"]["cell"][group].pop(field)
        return d


#: Cell knobs added after the map's folders and ledgers were first named, at the value those had:
#: left out of `SubstrateSweepConfig.folder_key` and `point_key` at that value (the lifecycle's
#: built-in death and reallocation; the map runs no lifecycle, but its keys hold the whole cell).
LATER_CELL_DEFAULTS = dict(death="least-fit", reallocation="worst-domain")


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


#: Cell settings that only a cell run reads (`substrate.cell.run_cell`), never the routing arms, at
#: their defaults: left out of a map's keys, so folders and ledgers written before them still resume.
CELL_ONLY = {"bases": 1, "train_data": None}


def _drop_cell_only(cell: dict) -> None:
    for k, v in CELL_ONLY.items():
        if k in cell and cell[k] == v:
            cell.pop(k)


def point_key(rc: RoutingArms) -> str:
    """Ledger identity of a point: its full comparison config without the seed (and device)."""
    d = arms_payload(rc)
    d["cell"].pop("seed")
    d["cell"].pop("device")
    _drop_cell_only(d["cell"])
    if not rc.acar:                 # only when the acar arm is on, so earlier ledgers hold
        d.pop("acar")
    for k, v in LATER_CELL_DEFAULTS.items():
        if d["cell"][k] == v:
            d["cell"].pop(k)
    return config_hash({"system": "substrate", "arms": d}, n=16)


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


@dataclass
class SubstrateOutcome:
    results: pd.DataFrame
    summary: pd.DataFrame
    computed: int
    reused: int
    figures: list
    base: dict | None = None


def run_substrate_sweep(cfg: SubstrateSweepConfig, out: Path, storage: str | None = None, study: str | None = None,
                        progress: Callable[[int, int, dict], None] | None = None, figures: bool = True,
                        argv: list[str] | None = None, log: Callable[[str], None] | None = None,
                        overwrite: bool = False) -> SubstrateOutcome:
    """Run (or resume) a substrate map into `out`: every missing (point, seed) is run and recorded
    as soon as it finishes, so a kill loses at most the trial in flight. A folder holding another
    configuration is refused before anything runs; `overwrite` empties it first
    (`sandbox.results.open_run_dir`)."""
    from sandbox import stats
    from sandbox.results import RunDir, open_run_dir
    from substrate.cell import prepare_substrate
    from substrate.routing import run_arms
    from sweeps import ledger

    out = Path(out)
    open_run_dir(out, "sweep", cfg, overwrite)
    store = ledger.storage_for(out, storage)
    st = ledger.open_study(store, study or DEFAULT_STUDY, metric=ledger.METRICS["substrate"])
    run = RunDir.create(out, command="sweep", config=cfg, seeds=list(cfg.seeds), argv=argv,
                        extra={"axes": cfg.axes, "system": "substrate", "study": study or DEFAULT_STUDY,
                               "storage": ledger.safe_url(storage) if storage else str(out / "trials.journal"), "eps": cfg.eps, "alpha": cfg.alpha})
    points = cfg.grid_points()
    done = ledger.finished(st)
    total = len(points) * len(cfg.seeds)
    computed = reused = 0
    sub, base = None, None
    for values in points:
        key = point_key(point_arms(cfg, values, cfg.seeds[0]))
        for seed in cfg.seeds:
            if ledger.trial_key(key, seed) in done:
                reused += 1
            else:
                if sub is None:
                    sub = prepare_substrate(cfg.arms.cell, cfg.cache, log)
                    base = base_check(sub, cfg.arms.cell)
                    if base["memorising"] and log:
                        log(f"WARNING: the base is memorising (training NLL {base['train_nll']:.3f} below the entropy "
                            f"floor {base['floor']:.3f}): the map measures a memorised base")
                rows = seed_rows(run_arms(point_arms(cfg, values, seed), sub))
                by = {r["arm"]: r["log_loss"] for r in rows}
                delta = by["grad"] - by["evo"] if {"grad", "evo"} <= set(by) else float("nan")
                ledger.record(st, key, values, cfg.bounds(), [(seed, rows, delta)],
                              ledger.labels("substrate", values, "evo vs grad"))
                done[ledger.trial_key(key, seed)] = {"rows": rows, "delta": delta}
                computed += 1
            if progress:
                progress(computed + reused, total, values)
    table = []
    for i, values in enumerate(points):
        key = point_key(point_arms(cfg, values, cfg.seeds[0]))
        for seed in cfg.seeds:
            for r in done[ledger.trial_key(key, seed)]["rows"]:
                table.append({"point": i, "seed": int(seed), **values, **r})
    cols = ["point", "seed", "arm", *cfg.axes, "final_loss", "log_loss", "diverged", "diverged_step", "generations",
            "accepted", "unconfirmed", "step_size", "lifecycle_events", "wall_s"]
    if cfg.arms.acar:               # the acar arm's mode usage (NaN on the other arms)
        cols += list(USAGE_COLUMNS)
    results = pd.DataFrame(table, columns=cols).sort_values(["point", "seed", "arm"], kind="stable").reset_index(drop=True)
    run.write_csv("results.csv", results)
    # domain-oracle routing is not a proven bound on the transformer: room is reported, no-room never used
    summary = stats.decompose(results, by=["point", *cfg.axes], eps=cfg.eps, alpha=cfg.alpha, oracle_is_ceiling=False)
    run.write_csv("summary.csv", summary)
    figs = []
    if figures:
        from figures.report import build_report

        figs = list(build_report(out))
    run.finish(computed=computed, reused=reused, points=len(points), **({"base_check": base} if base else {}))
    return SubstrateOutcome(results, summary, computed, reused, figs, base)


__all__ = ["ARMS", "AXES", "SubstrateSweepConfig", "run_substrate_sweep", "point_arms", "point_key", "seed_rows"]
