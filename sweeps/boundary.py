"""Boundary search: let an Optuna sampler spend sweep points where the regime changes.

A second study ``<study>-boundary`` in the same storage holds one trial per proposed point; the
sampler (TPE, seeded) suggests alignment (and the second axis, if any) within the sweep's ranges
and is told ``| |mean delta| - eps |`` over the seeds: the distance of the mean delta to the edge
of the equivalence band. Minimising it concentrates points where ``ties`` turns into ``beats`` or
``degrades`` (a sign change crosses both edges). Plain ``|mean delta|`` would be drawn into flat
regions where the search never changes anything (delta exactly 0), which teach nothing. Each
point's seeds are computed through the ledger (the map driver's `ensure`), so the boundary study
and the grid share results and a resumed search computes nothing twice. A proposal interrupted
before it was told is left RUNNING in the boundary study and not counted; the next run proposes
afresh.
"""

from __future__ import annotations

import math

import numpy as np
import optuna
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import TrialState


def _distributions(cfg, axes: dict) -> dict:
    d = {"alignment": FloatDistribution(*cfg.alignment)} if cfg.alignment[0] < cfg.alignment[1] else {}
    if cfg.axis and cfg.axis_range[0] < cfg.axis_range[1]:
        lo, hi = cfg.axis_range
        d[cfg.axis] = IntDistribution(int(math.ceil(lo)), int(math.floor(hi))) if axes[cfg.axis][2] else FloatDistribution(lo, hi)
    return d


def propose_points(cfg, store, study: optuna.Study, *, ensure, point_id, axes: dict
                   ) -> tuple[list[dict[str, float]], int]:
    """Run the boundary search up to ``cfg.trials`` told proposals.

    Returns every told point and the number of (point, seed) trials computed here.

    `store` is the storage holding `study` (the ledger); the boundary study lives beside it. The
    map driver (`sweeps.grid.run_map`) passes its own parts in (``ensure(done, values)`` computes
    and records a point's missing seeds, adds them to `done` and returns how many it computed;
    `point_id(values)` is a point's ledger key, `axes` the system's axis table), so this module
    does not import the driver that calls it.
    """
    from sweeps import ledger

    bstudy = ledger.open_study(store, study.study_name + "-boundary", direction="minimize",
                               sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=4),
                               metric=ledger.METRICS["boundary"])
    dists = _distributions(cfg, axes)
    fixed = {"alignment": float(cfg.alignment[0])}
    if cfg.axis:
        fixed[cfg.axis] = cfg.axis_range[0]
    done = ledger.finished(study)
    told = [t for t in bstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    computed = 0
    for _ in range(max(0, cfg.trials - len(told))):
        trial = bstudy.ask(dists)
        values = {**fixed, **{k: (int(v) if isinstance(dists[k], IntDistribution) else float(v))
                              for k, v in trial.params.items()}}
        values = {"alignment": values["alignment"], **{k: v for k, v in values.items() if k != "alignment"}}
        computed += ensure(done, values)
        deltas = _deltas(cfg, done, point_id(values))
        trial.set_user_attr("values", values)
        trial.set_user_attr("point", ledger.point_label(values))
        bstudy.tell(trial, float(abs(abs(np.mean(deltas)) - cfg.eps)) if deltas else float("inf"))
    points = []
    for t in bstudy.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))[: max(cfg.trials, 0)]:
        v = t.user_attrs.get("values")
        if v is not None and v not in points:
            points.append(v)
    return sorted(points, key=lambda v: tuple(v.values())), computed


def _deltas(cfg, done: dict, key: str) -> list[float]:
    out = []
    for s in cfg.seeds:
        d = done.get(f"{key}:{s}", {}).get("delta")
        if d is not None and math.isfinite(d):
            out.append(float(d))
    return out
