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
    """Times the lr grid is widened (two more factor-2 values beyond the end) for a point whose choice
    sits at the grid's end, so the choice is interior unless this many widenings did not reach it."""
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


def _choose(cands: list, scored: list[tuple[float, int, float]], tc: TuneConfig) -> tuple[int, list[dict]]:
    stable = [i for i, (_, nd, _) in enumerate(scored) if nd == 0] or list(range(len(scored)))
    best = min(stable, key=lambda i: (scored[i][0], i))
    table = [{"lr": c.lr, "adapter_lr": c.lr * c.plasticity, "beta2": c.beta2, "score": s, "diverged": nd,
              "half_drop": d, "chosen": i == best} for i, (c, (s, nd, d)) in enumerate(zip(cands, scored))]
    return best, table


def tune_points(points: Sequence[tuple[TaskSpec, object]], tc: TuneConfig, chunk_rows: int = 2048,
                device=None) -> list[TuneOutcome]:
    """The tuned grad setting of every point ``(spec, solver)``: every candidate of every point on
    the tuning seeds in stacked batches (grad arm only; evo and restart too with ``robust``). A
    point whose choice is at an end of the lr grid gets two more lrs beyond that end, up to
    ``widen`` times; ``edge`` says where a choice stayed at the end."""
    from sandbox.analytic import run_points

    require(tc.on, "tune", tc.mode, "grid (tune_points was called with tuning off)")
    arms = ("grad",) + (ROBUST_ARMS if tc.robust else ())
    lrs = [sorted(tc.lrs) for _ in points]
    cands = [tc.candidates(cfg, ls) for (_, cfg), ls in zip(points, lrs)]
    todo = list(range(len(points)))
    results: list[list] = [[] for _ in points]
    for round_ in range(tc.widen + 1):
        flat = [(points[i][0], c, tc.seeds) for i in todo for c in cands[i][len(results[i]):]]
        res = run_points(flat, arms=arms, chunk_rows=chunk_rows, device=device)
        k = 0
        for i in todo:
            n = len(cands[i]) - len(results[i])
            results[i] += res[k:k + n]
            k += n
        if round_ == tc.widen:
            break
        widen = []
        for i in todo:
            best, _ = _choose(cands[i], _scores(results[i], "grad", tc.seeds, tc.rule), tc)
            lo, hi = lrs[i][0], lrs[i][-1]
            if cands[i][best].lr == hi and lo != hi:
                extra = [hi * 2, hi * 4]
            elif cands[i][best].lr == lo and lo != hi:
                extra = [lo / 2, lo / 4]
            else:
                continue
            extra = [v for v in extra if 0 < v <= 100]
            if extra:
                lrs[i] = sorted(lrs[i] + extra)
                cands[i] += tc.candidates(points[i][1], extra)
                widen.append(i)
        todo = widen
        if not todo:
            break
    out = []
    for i, cs in enumerate(cands):
        best, table = _choose(cs, _scores(results[i], "grad", tc.seeds, tc.rule), tc)
        chosen = cs[best]
        lo, hi = lrs[i][0], lrs[i][-1]
        edge = "low" if chosen.lr == lo and lo != hi else ("high" if chosen.lr == hi and lo != hi else "")
        base = points[i][1].lr * points[i][1].plasticity
        if len(tc.adapter) > 1 and base > 0:      # the adapter grid is not widened: say where it bites
            m = chosen.lr * chosen.plasticity / base
            side = "low" if math.isclose(m, min(tc.adapter)) else ("high" if math.isclose(m, max(tc.adapter)) else "")
            edge = ",".join(x for x in (edge, f"adapter-{side}" if side else "") if x)
        own = {}
        for arm in arms[1:]:
            sc = _scores(results[i], arm, tc.seeds, tc.rule)
            j, _ = _choose(cs, sc, tc)
            own[arm] = (cs[j], sc[j][0])
        out.append(TuneOutcome(chosen, table[best]["score"], table, edge, own))
    return out
