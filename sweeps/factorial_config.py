"""The factorial's design: its configuration, named settings, ledger study and evaluation trial keys.

`FactorialConfig` (cells x seeds of a cell template, the paired statistics' margin and level, the
sequential design, the router-lr tuning's grid and seeds), the named settings of ``--setting``
(`SETTINGS`, `resolve_setting`), the study name and each evaluation trial's key and folder. The run
loop is `sweeps.factorial`, which re-exports every name here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from sandbox.factors import DEFAULT_CELLS, parse_cell
from sandbox.errors import BadInput, require
from sandbox.options import DEFAULT_SEEDS
from sandbox import identity as ident
from sandbox.stats import DEFAULT_ALPHA, DEFAULT_EPS
from substrate.cell import CellConfig

STUDY = "factorial"


# ---------------------------------------------------------------------------------------------
# The factorial
# ---------------------------------------------------------------------------------------------


#: Named settings of `sandbox factorial --setting NAME`: a bundle of option values (keyword -> value,
#: the command's keywords, so ``cells`` and ``seeds`` beside the cell knobs) taken where the command line
#: does not give the option itself. A setting only fills in options: the run's configuration, folder
#: name and ledger are those of the same command with the values written out, and the manifest records
#: the setting (`resolve_setting`). ``mechanism``: where the study's mechanism is looked for on a CPU,
#: docs/results/2026-12-07-mechanism.md.
SETTINGS: dict[str, dict] = {
    "mechanism": dict(preset="small", steps=200, router_lr=0.9, cells="B3,R", seeds="0,1,2,3,4,5", bases=3),
}


def resolve_setting(name: str, options: dict, given: set[str]) -> dict:
    """Fill `options` (the command's keywords) in place from the named setting `SETTINGS[name]`, except
    the keywords in `given` (options on the command line win), and return the manifest's record
    ``{name, values, applied, overridden}``: the setting's values, those taken, and the command line's
    values where they replaced the setting's. An unknown name is one line naming ``--setting``."""
    if name not in SETTINGS:
        raise BadInput("--setting", name, "one of " + ", ".join(SETTINGS))
    values = SETTINGS[name]
    applied, overridden = {}, {}
    for key, value in values.items():
        if key in given:
            overridden[key] = options.get(key)
        else:
            options[key] = value
            applied[key] = value
    return {"name": name, "values": dict(values), "applied": applied, "overridden": overridden}


#: The most seeds `--seeds-to-resolve` may reach: each seed is one trial per cell (minutes each), so a
#: larger bound is a typo, and planning it would take the define step minutes before any trial starts.
MAX_SEEDS = 10_000

#: Values of `FactorialConfig.tune`.
TUNE_MODES = ("off", "grid")


@dataclass(frozen=True)
class FactorialConfig:
    """A factorial run: `cells` x `seeds` of the cell template `base` (its cell and seed ignored)."""

    base: CellConfig = field(default_factory=CellConfig)
    cells: tuple[str, ...] = tuple(c.name for c in DEFAULT_CELLS)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    eps: float = DEFAULT_EPS
    """Equivalence margin (nats) of the paired statistics."""
    alpha: float = DEFAULT_ALPHA
    """Test level of the paired statistics."""
    seeds_to_resolve: int | None = None
    """Sequential run: add seeds in rounds until every tested contrast is classified or this many
    seeds are reached (`sandbox.sequential`); None = the fixed seeds only."""
    round_seeds: int | None = None
    """Seeds added per round of a sequential run (default: as many as `seeds`; at least 2)."""
    spending: str = "obf"
    """Alpha-spending function of the sequential design: obf (O'Brien-Fleming type) or pocock."""
    tune: str = "off"
    """Router learning rate per cell: off (every cell at --router-lr; the tables say the router lr
    was not tuned) or grid (each cell's router lr chosen on the tuning seeds: lowest mean final
    balanced log-PPL, a candidate with a diverged tuning run excluded; the evaluation seeds then run
    at each cell's choice)."""
    tune_router_lr: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
    """Router learning rates --tune grid tries, as multiples of --lr (10 is the untuned default). Wide
    on purpose: on tiny the sigmoid router chose 1 x and the softmax router 30-100 x, ends of a 1-100 x grid."""
    tune_seeds: tuple[int, ...] = (1000, 1001, 1002)
    """Tuning seeds of --tune grid, disjoint from the evaluation seeds (seed s adapts base s mod --bases)."""

    def __post_init__(self) -> None:
        names = tuple(parse_cell(c, "--cells").name for c in self.cells)
        require(len(names) >= 1 and len(set(names)) == len(names), "cells", ",".join(self.cells), "distinct cells")
        object.__setattr__(self, "cells", names)
        require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds)
                and all(isinstance(s, int) and s >= 0 for s in self.seeds), "seeds", self.seeds,
                "distinct non-negative integers")
        require(isinstance(self.eps, (int, float)) and 0 < self.eps < 10, "eps", self.eps, "a number in (0, 10)")
        require(isinstance(self.alpha, (int, float)) and 0 < self.alpha < 1, "alpha", self.alpha, "a number in (0, 1)")
        from sandbox.sequential import SPENDINGS

        require(self.spending in SPENDINGS, "spending", self.spending, "one of " + ", ".join(SPENDINGS))
        if self.seeds_to_resolve is not None:
            n = self.seeds_to_resolve
            require(isinstance(n, int) and not isinstance(n, bool) and max(2, len(self.seeds)) <= n <= MAX_SEEDS,
                    "seeds_to_resolve", n, f"an integer >= the number of --seeds ({len(self.seeds)}) and >= 2, "
                    f"at most {MAX_SEEDS} (each seed is one trial per cell)")
            require(len(self.seeds) >= 2, "seeds", self.seeds, "at least 2 seeds to start a sequential run")
            require(self.base.bases == 1, "bases", self.base.bases, "1 with --seeds-to-resolve (the sequential "
                    "design adds seeds, the unit of a one-base run; with several bases the unit is the base)")
        if self.round_seeds is not None:
            r = self.round_seeds
            require(isinstance(r, int) and not isinstance(r, bool) and r >= 2, "round_seeds", r,
                    "an integer >= 2 (each round is a stage with its own paired t test)")
        require(self.tune in TUNE_MODES, "tune", self.tune, "one of " + ", ".join(TUNE_MODES))
        grid = tuple(self.tune_router_lr)
        require(len(grid) >= 1 and len(set(grid)) == len(grid)
                and all(isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 for m in grid)
                and len({f"{m:g}" for m in grid}) == len(grid),
                "tune_router_lr", ",".join(map(str, grid)), "distinct positive multiples of --lr")
        object.__setattr__(self, "tune_router_lr", tuple(sorted(float(m) for m in grid)))
        ts = tuple(self.tune_seeds)
        require(len(ts) >= 1 and len(set(ts)) == len(ts)
                and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in ts), "tune_seeds",
                ",".join(map(str, ts)), "distinct non-negative integers")
        object.__setattr__(self, "tune_seeds", ts)
        if self.tune == "grid":   # the grid and the tuning seeds only bind when they are run
            top = max(self.tune_router_lr) * self.base.lr
            require(top <= 1, "tune_router_lr", ",".join(f"{m:g}" for m in self.tune_router_lr),
                    f"multiples of --lr {self.base.lr:g} giving a router lr in (0, 1] (the largest gives {top:g})")
            both = sorted(set(ts) & set(self.seeds))
            require(not both, "tune_seeds", ",".join(map(str, ts)), "seeds disjoint from the evaluation --seeds "
                    f"(both hold {','.join(map(str, both))})")
            require(self.base.router_lr is None, "router_lr", self.base.router_lr, "left out with --tune grid "
                    "(each cell's router lr is chosen from --tune-router-lr), or --tune off")

    def seed_pool(self) -> tuple[int, ...]:
        """The seeds in the order a sequential run adds them: `seeds`, then the smallest non-negative
        integers not among them, up to `seeds_to_resolve` in all (just `seeds` for a fixed run)."""
        pool, taken = list(self.seeds), set(self.seeds)   # a set: linear in the pool, not quadratic
        skip = set(self.tune_seeds) if self.tuning else set()   # tuning seeds never evaluate
        k = 0
        while len(pool) < (self.seeds_to_resolve or 0):
            if k not in taken and k not in skip:
                pool.append(k)
            k += 1
        return tuple(pool)

    def looks(self) -> list[int]:
        """Seeds in the run at each look of a sequential run (`sandbox.sequential.look_schedule`)."""
        from sandbox.sequential import look_schedule

        if self.seeds_to_resolve is None:
            return [len(self.seeds)]
        return look_schedule(len(self.seeds), self.seeds_to_resolve, self.round_seeds or max(2, len(self.seeds)))

    def settings(self) -> dict:
        """The settings every trial shares: the template's identity in the ``template`` view
        (`sandbox.identity`: without cell, seed and device; ``bases`` when it is not 1, since seed s
        adapts base s mod bases, so a one-base factorial keeps its name), and with ``tune`` grid the
        tuning grid and seeds (off, every earlier run, keeps the name it had)."""
        d = ident.identity(self.base, "template")
        if self.tuning:
            d["tune"] = {"router_lr": list(self.tune_router_lr), "seeds": list(self.tune_seeds)}
        return d

    @property
    def tuning(self) -> bool:
        """True when each cell's router lr is chosen on the tuning seeds (``tune`` grid)."""
        return self.tune == "grid"

    def tune_value(self, multiple: float) -> float:
        """The router lr of a grid candidate: `multiple` x the template's ``lr``."""
        return float(multiple) * self.base.lr

    @property
    def bases(self) -> int:
        """Bases the seeds are spread over (the template's ``bases``)."""
        return self.base.bases

    def trial_config(self, cell: str, seed: int, router_lr: float | None = None) -> CellConfig:
        """The (cell, seed) trial: the template's settings, on base ``seed mod bases``; at `router_lr`
        when given (a tuning candidate, or the cell's tuned choice)."""
        if router_lr is None:
            return replace(self.base, cell=cell, seed=seed)
        return replace(self.base, cell=cell, seed=seed, router_lr=float(router_lr))


def study_name(fcfg: FactorialConfig) -> str:
    """The factorial's ledger study: one per shared settings (cells and seeds may differ). With
    ``tune`` grid the candidates and tuning seeds are left out of the name (every tuning trial's key
    names its candidate and seed, every evaluation trial's its router lr), so a widened grid or more
    tuning seeds reuse the finished tuning trials of the same study."""
    d = fcfg.settings()
    if fcfg.tuning:
        d["tune"] = "grid"
    return f"{STUDY}-{ident.key(d)}"


def trial_key(cell: str, seed: int, multiple: float | None = None) -> str:
    """Ledger key of an evaluation trial: ``<cell>/<seed>``, and ``/<multiple>x`` at a tuned router lr."""
    return f"{cell}/{seed}" if multiple is None else f"{cell}/{seed}/{multiple:g}x"


def trial_dir(out: Path, cell: str, seed: int) -> Path:
    return out / "trials" / f"{cell}_s{seed}"
