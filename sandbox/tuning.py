"""A gradient baseline worth beating: grad's optimiser setting chosen per point on tuning seeds.

The map compares routing search with the gradient solution, so the gradient solution must be the
best a careful practitioner would run, not whatever the defaults give. Per point, every
candidate of a log grid (router learning rate x adapter learning rate x Adam beta2) runs the grad
arm on *tuning seeds* that are disjoint from the evaluation seeds (a different task draw and
different initial weights each), and the candidate with the lowest mean excess ratio over those
seeds wins::

    score(c) = mean_s rel_excess_s(c),   rel_excess = (loss_T - floor) / (loss_0 - floor)

rel_excess is bounded (about 1 for a run that learns nothing), so one bad seed cannot dominate
the mean (``rule="median"`` ignores it altogether); a candidate on which any tuning seed diverged is
excluded outright (a stability margin: a learning rate at the edge of divergence on one tuning
seed will diverge on some evaluation seed). Ties go to the earlier candidate (smaller lr). The
evo, restart and beta2 arms then run at grad's tuned setting: each is grad plus one intervention,
so the contrast isolates the intervention. With ``robust`` each of evo and restart is also tuned
on its own, and reported beside the headline as a robustness row.

Every candidate of every point is one row of one stacked batch (`sandbox.analytic.run_points`),
so tuning costs the grad arm's share of the map times the number of candidates per tuning seed,
with no Python loop over candidates.

Example (one point, a 3-candidate grid, 4 tuning seeds)::

    >>> from sandbox.analytic import AnalyticConfig
    >>> from sandbox.tasks import TaskSpec
    >>> tc = TuneConfig(lrs=(0.01, 0.05, 0.2), adapter=(1.0,), seeds=(1000, 1001, 1002, 1003))
    >>> [out] = tune_points([(TaskSpec(alignment=0.5), AnalyticConfig(steps=40))], tc)
    >>> out.chosen.lr in tc.lrs and len(out.table) == 3
    True
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from sandbox.errors import require
from sandbox.tasks import TaskSpec

MODES = ("grid", "off")
RULES = ("mean", "median")
#: Arms that can be tuned on their own for the robustness rows.
ROBUST_ARMS = ("evo", "restart")


@dataclass(frozen=True)
class TuneConfig:
    """How grad's optimiser setting is chosen per point."""

    mode: str = "grid"
    """grid: choose grad's setting per point on the tuning seeds; off: the solver's fixed lr, plasticity, beta2."""
    lrs: tuple[float, ...] = (0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8)
    """Router learning rates tried (a log grid, factor 2)."""
    adapter: tuple[float, ...] = (0.5, 2.0, 8.0)
    """Adapter learning rates tried, as multiples of the point's own adapter lr (lr x plasticity),
    independently of the router's: the point's plasticity sets the grid's centre (1 alone keeps
    the point's adapter lr fixed; a frozen point, plasticity 0, stays frozen)."""
    beta2: tuple[float, ...] = (0.999,)
    """Adam beta2 values tried (e.g. 0.9,0.999)."""
    seeds: tuple[int, ...] = tuple(range(1000, 1005))
    """Tuning seeds: each a task draw and initial weights of its own, disjoint from the evaluation seeds."""
    robust: bool = False
    """Also tune evo and restart on their own and report them at their own best setting (robustness rows)."""
    widen: int = 2
    """Times a grid (router lr, adapter lr) is widened by two more factor-2 values beyond its end for
    a point whose choice sits there, so the choice is interior unless this many widenings did not reach it."""
    rule: str = "mean"
    """How a candidate is scored over the tuning seeds: mean (the quantity the map's mean delta is
    made of) or median of rel_excess; either way a candidate with a diverged seed is excluded."""

    def __post_init__(self) -> None:
        require(self.mode in MODES, "tune", self.mode, "grid or off")
        require(self.rule in RULES, "tune_rule", self.rule, "mean or median")
        for name, vals, lo, hi in (("tune_lr", self.lrs, 0.0, 100.0), ("tune_adapter", self.adapter, 0.0, 1e6)):
            require(len(vals) >= 1 and all(_num(v) and lo < v <= hi for v in vals), name, ",".join(map(str, vals)),
                    f"a comma list of numbers in ({lo:g}, {hi:g}]")
        require(len(self.beta2) >= 1 and all(_num(v) and 0 <= v < 1 for v in self.beta2), "tune_beta2",
                ",".join(map(str, self.beta2)), "a comma list of numbers in [0, 1)")
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "tune_seeds", self.seeds,
                "at least one distinct seed")
        require(isinstance(self.widen, int) and 0 <= self.widen <= 10, "tune_widen", self.widen, "an integer in [0, 10]")

    @property
    def on(self) -> bool:
        return self.mode == "grid"

    def candidates(self, cfg, lrs: Sequence[float] | None = None) -> list:
        """The solver configs tried for a point whose base solver is `cfg` (at the router lrs `lrs`,
        default the grid's): lr-major order."""
        adapter_lr = cfg.lr * cfg.plasticity
        return [dataclasses.replace(cfg, lr=float(lr), plasticity=float(adapter_lr * m / lr), beta2=float(b))
                for lr, m, b in itertools.product(self.lrs if lrs is None else lrs, self.adapter, self.beta2)]

    def check_disjoint(self, seeds: Sequence[int]) -> None:
        """Tuning on an evaluation seed would let the baseline see its test: refused."""
        both = sorted(set(self.seeds) & set(int(s) for s in seeds))
        require(not both, "tune_seeds", ",".join(map(str, both)), "seeds disjoint from the evaluation --seeds")


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class TuneOutcome:
    """The tuned setting of one point."""

    chosen: object                         # the grad arm's AnalyticConfig (lr, plasticity, beta2 set)
    score: float                           # its median rel_excess over the tuning seeds
    table: list[dict] = field(default_factory=list)   # one row per candidate (lr, adapter_lr, beta2, score, ...)
    edge: str = ""                         # "low" / "high" (lr), "adapter-low" / "adapter-high": at a grid's end
    own: dict = field(default_factory=dict)   # robust: {arm: (AnalyticConfig, score)}

    def record(self) -> dict:
        """The JSON form stored in the ledger (`from_record` reads it back)."""
        own = {a: {"lr": c.lr, "plasticity": c.plasticity, "beta2": c.beta2, "score": s} for a, (c, s) in self.own.items()}
        return {"lr": self.chosen.lr, "plasticity": self.chosen.plasticity, "beta2": self.chosen.beta2,
                "score": self.score, "edge": self.edge, "table": self.table, "own": own}

    @staticmethod
    def from_record(base, rec: dict) -> "TuneOutcome":
        pick = lambda r: dataclasses.replace(base, lr=r["lr"], plasticity=r["plasticity"], beta2=r["beta2"])  # noqa: E731
        return TuneOutcome(pick(rec), rec["score"], rec["table"], rec["edge"],
                           {a: (pick(r), r["score"]) for a, r in rec.get("own", {}).items()})


def _scores(results: list[dict], arm: str, seeds: Sequence[int], rule: str) -> list[tuple[float, int, float]]:
    """Per candidate: (score, diverged seeds, median half-budget drop); score = `rule` of rel_excess
    over the seeds that did not diverge (inf when all did)."""
    from sandbox.analytic import result_rows

    out = []
    for res in results:
        rows = result_rows({arm: res[arm]}, seeds)
        rel = np.array([r["rel_excess"] for r in rows], dtype=float)
        half = np.array([r["rel_half"] for r in rows], dtype=float)
        bad = ~np.isfinite(rel) | np.array([r["diverged"] for r in rows], dtype=bool)
        ok = rel[~bad]
        score = float((np.mean if rule == "mean" else np.median)(ok)) if ok.size else math.inf
        drop = float(np.median((half - rel)[~bad])) if (~bad).any() else math.nan
        out.append((score, int(bad.sum()), drop))
    return out


def _choose(cands: list, scored: list[tuple[float, int, float]]) -> tuple[int, list[dict]]:
    """The lowest score among candidates with no diverged seed (all, if every one diverged); ties to
    the earlier candidate. Returns its index and the table of every candidate."""
    stable = [i for i, (_, nd, _) in enumerate(scored) if nd == 0] or list(range(len(scored)))
    best = min(stable, key=lambda i: (scored[i][0], i))
    table = [{"lr": c.lr, "adapter_lr": c.lr * c.plasticity, "beta2": c.beta2, "score": s, "diverged": nd,
              "half_drop": d, "chosen": i == best} for i, (c, (s, nd, d)) in enumerate(zip(cands, scored))]
    return best, table


def _widened(values: list[float], chosen: float, lo_cap: float, hi_cap: float) -> list[float]:
    """Two more factor-2 values beyond the end of `values` where `chosen` sits (none if interior)."""
    lo, hi = values[0], values[-1]
    if lo == hi:
        return []
    extra = [hi * 2, hi * 4] if math.isclose(chosen, hi) else ([lo / 2, lo / 4] if math.isclose(chosen, lo) else [])
    return [v for v in extra if lo_cap < v <= hi_cap]


def tune_points(points: Sequence[tuple[TaskSpec, object]], tc: TuneConfig, chunk_rows: int = 2048,
                device=None) -> list[TuneOutcome]:
    """The tuned grad setting of every point ``(spec, solver)``: every candidate of every point on
    the tuning seeds in stacked batches (grad arm only; evo and restart too with ``robust``). A
    point whose choice is at an end of the router-lr or adapter-lr grid gets two more values beyond
    that end (crossed with the other grid), up to ``widen`` times; ``edge`` says where a choice
    stayed at an end."""
    from sandbox.analytic import run_points

    require(tc.on, "tune", tc.mode, "grid (tune_points was called with tuning off)")
    arms = ("grad",) + (ROBUST_ARMS if tc.robust else ())
    lrs = [sorted(tc.lrs) for _ in points]
    mults = [sorted(tc.adapter) if cfg.lr * cfg.plasticity > 0 else [1.0] for _, cfg in points]
    runs: list[dict] = [{} for _ in points]          # (lr, mult, beta2) -> {arm: ArmResult}
    grids = lambda i: [(lr, m, b) for lr in lrs[i] for m in mults[i] for b in tc.beta2]   # noqa: E731
    def cand(i, key):
        cfg = points[i][1]
        lr, m, b = key
        return dataclasses.replace(cfg, lr=float(lr), plasticity=float(cfg.lr * cfg.plasticity * m / lr), beta2=float(b))

    def best_of(i):
        keys = grids(i)
        cs = [cand(i, k) for k in keys]
        best, table = _choose(cs, _scores([runs[i][k] for k in keys], "grad", tc.seeds, tc.rule))
        return keys, cs, best, table

    todo = list(range(len(points)))
    for round_ in range(tc.widen + 1):
        pending = [(i, k) for i in todo for k in grids(i) if k not in runs[i]]
        res = run_points([(points[i][0], cand(i, k), tc.seeds) for i, k in pending], arms=arms,
                         chunk_rows=chunk_rows, device=device, diagnostics=False)
        for (i, k), r in zip(pending, res):
            runs[i][k] = r
        if round_ == tc.widen:
            break
        again = []
        for i in todo:
            keys, _, best, _ = best_of(i)
            lr, m, _ = keys[best]
            more_lr, more_m = _widened(lrs[i], lr, 0.0, 100.0), _widened(mults[i], m, 0.0, 1e6)
            if more_lr or more_m:
                lrs[i], mults[i] = sorted(lrs[i] + more_lr), sorted(mults[i] + more_m)
                again.append(i)
        todo = again
        if not todo:
            break
    out = []
    for i in range(len(points)):
        keys, cs, best, table = best_of(i)
        lr, m, _ = keys[best]
        sides = [f"{name}{'-' if name else ''}{side}" for name, v, grid in (("", lr, lrs[i]), ("adapter", m, mults[i]))
                 for side in (("low",) if len(grid) > 1 and math.isclose(v, grid[0]) else ())
                 + (("high",) if len(grid) > 1 and math.isclose(v, grid[-1]) else ())]
        own = {}
        for arm in arms[1:]:
            sc = _scores([runs[i][k] for k in keys], arm, tc.seeds, tc.rule)
            j, _ = _choose(cs, sc)
            own[arm] = (cs[j], sc[j][0])
        out.append(TuneOutcome(cs[best], table[best]["score"], table, ",".join(sides), own))
    return out
