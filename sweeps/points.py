"""What both map systems share below the map driver (`sweeps.grid`): the grid of points, a point's
plan, and the worker's answer for one (point, seed).

A map spans alignment and at most one more axis; both systems (`sweeps.analytic_map`,
`sweeps.substrate_map`) lay their points out with `grid_points` and key them in the same ledger.
This module imports no system and not the driver, so the systems can use it and the driver can
import the systems.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from optuna.trial import TrialState

from sandbox.options import Range


def axis_values(axis_range: tuple[float, float], n: int, integer: bool) -> np.ndarray:
    """`n` grid values over `axis_range` (rounded to 12 digits: 0.30000000000000004 -> 0.3); an
    integer axis keeps its distinct rounded values."""
    vals = np.round(Range(*axis_range).grid(n), 12)
    return np.unique(np.round(vals).astype(int)) if integer else vals


def grid_points(cfg, axes: dict[str, tuple[float, float, bool]]) -> list[dict]:
    """A map config's points in order (alignment-major): ``[{alignment: a, axis: v}, ...]``; `axes`
    is the system's axis table (name -> (lowest, highest, integer?))."""
    aligns = np.round(Range(*cfg.alignment).grid(cfg.points), 12)
    if cfg.axis is None:
        return [{"alignment": float(a)} for a in aligns]
    integer = axes[cfg.axis][2]
    vals = axis_values(cfg.axis_range, cfg.axis_points, integer)
    return [{"alignment": float(a), cfg.axis: (int(round(v)) if integer else float(v))} for a in aligns for v in vals]


def axes_of(cfg) -> list[str]:
    """Axis columns of a map's tables: alignment first."""
    return ["alignment"] + ([cfg.axis] if cfg.axis else [])


def bounds_of(cfg) -> dict[str, tuple[float, float]]:
    """Each axis's range (the ledger trials' parameter distributions)."""
    b = {"alignment": tuple(cfg.alignment)}
    if cfg.axis:
        b[cfg.axis] = tuple(cfg.axis_range)
    return b


@dataclass
class Point:
    """One planned point of a map: its axis values, ledger key (`point_key`) and evaluation seeds."""

    values: dict
    key: str
    seeds: tuple

    @property
    def row_keys(self) -> list[str]:
        """The ledger keys whose rows results.csv shows for this point."""
        return [self.key]


def check_payload_key(key: str, job: dict) -> None:
    """Refuse a worker payload whose point hashes to another key here than in the define step."""
    from sweeps.worker import CodeMismatch

    if key != job["point_key"]:
        raise CodeMismatch("the point's configuration hashes differently on this worker (another version of "
                           "the code than the define step's); run the same version everywhere")


def seed_outcome(rows: list[dict], delta: float):
    """A worker's result of one (point, seed): its rows, and delta as the trial's value (a
    non-finite delta, a diverged arm, is a FAIL trial that still holds its rows)."""
    from sweeps.worker import Outcome

    ok = math.isfinite(delta)
    return Outcome({"rows": rows, "delta": float(delta) if ok else None}, float(delta) if ok else None,
                   TrialState.COMPLETE if ok else TrialState.FAIL)
