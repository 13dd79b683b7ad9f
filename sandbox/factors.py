"""Cells of the 2^3 factorial over router rewrite (R), evaluation scope (E) and lifecycle (L).

A cell is the set of factors switched on, written with ``+``: ``B3`` is the empty cell (the static
baseline), ``R+E+L`` the whole system. Order and case do not matter (``L+R`` == ``r+l``). The canonical
spelling orders letters R, E, L: ``R+E+L``, ``R+L``.

Named contrasts pair two cells by seed; delta = metric(b) - metric(a) is reported by the
statistics module with the sign convention of the metric (for log-PPL: log PPL_a - log PPL_b,
positive = cell b better).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from sandbox.errors import BadInput

FACTORS: dict[str, str] = {
    "R": "router rewrite (sigmoid gate, floor, anneal, post-stack hidden states)",
    "E": "per-domain leave-one-out evaluation scope",
    "L": "lifecycle (death, inheritance, SVD mutation, reallocation)",
}
ORDER = ("R", "E", "L")
_ALLOWED = "factor letters R, E, L joined by '+' (each at most once), or B3 (none); the whole system is R+E+L"


@dataclass(frozen=True)
class Cell:
    """A set of factors. Construct with `parse_cell`; compare and hash by the factor set."""

    factors: frozenset[str]

    @property
    def name(self) -> str:
        if not self.factors:
            return "B3"
        return "+".join(f for f in ORDER if f in self.factors)

    @property
    def router(self) -> bool:
        return "R" in self.factors

    @property
    def per_domain(self) -> bool:
        return "E" in self.factors

    @property
    def lifecycle(self) -> bool:
        return "L" in self.factors

    def __str__(self) -> str:
        return self.name

    def __lt__(self, other: "Cell") -> bool:  # design order: fewer factors first, then R<E<L
        return _sort_key(self) < _sort_key(other)


def _sort_key(c: Cell) -> tuple:
    return (len(c.factors), tuple(ORDER.index(f) for f in sorted(c.factors, key=ORDER.index)))


def parse_cell(text: str, flag: str = "--cell") -> Cell:
    """Parse a cell name: ``B3``, or letters from R/E/L joined by ``+`` in any order/case."""
    s = str(text).strip()
    if s.upper() == "B3" or s.lower() == "none":
        return Cell(frozenset())
    if not s:
        raise BadInput(flag, text, _ALLOWED)
    parts = [p.strip().upper() for p in re.split(r"\+", s)]
    if any(p not in FACTORS for p in parts) or len(set(parts)) != len(parts):
        raise BadInput(flag, text, _ALLOWED)
    return Cell(frozenset(parts))


def parse_cells(text: str, flag: str = "--cells") -> list[Cell]:
    """Comma-separated cells (``B3,R,R+E``), or ``all`` (2^3) or ``partial`` (the default five)."""
    s = str(text).strip()
    if s.lower() == "all":
        return all_cells()
    if s.lower() in ("partial", "default"):
        return list(DEFAULT_CELLS)
    items = [p for p in (x.strip() for x in s.split(",")) if p]
    if not items:
        raise BadInput(flag, text, "a comma list of cells (e.g. B3,R,R+E), 'partial' or 'all'")
    cells = [parse_cell(p, flag) for p in items]
    if len(set(cells)) != len(cells):
        raise BadInput(flag, text, "each cell at most once")
    return cells


def all_cells() -> list[Cell]:
    """The full 2^3 design in design order: B3, R, E, L, R+E, R+L, E+L, R+E+L."""
    cells = [Cell(frozenset(c)) for k in range(4) for c in itertools.combinations(ORDER, k)]
    return sorted(cells)


B3 = parse_cell("B3")
FULL = parse_cell("R+E+L")
#: The study's partial design: the chain B3 -> R -> R+E -> R+E+L plus R+L.
DEFAULT_CELLS: tuple[Cell, ...] = tuple(parse_cell(c) for c in ("B3", "R", "R+E", "R+L", "R+E+L"))


@dataclass(frozen=True)
class Contrast:
    """A paired comparison: `treated` vs `reference`, delta = improvement of treated over reference."""

    name: str
    reference: Cell
    treated: Cell
    description: str


CONTRASTS: tuple[Contrast, ...] = (
    Contrast("router", B3, parse_cell("R"), "router rewrite: R vs B3"),
    Contrast("scope", parse_cell("R"), parse_cell("R+E"), "per-domain scope: R+E vs R"),
    Contrast("lifecycle", parse_cell("R+E"), FULL, "lifecycle: R+E+L vs R+E"),
    Contrast("lifecycle_global", parse_cell("R"), parse_cell("R+L"), "lifecycle under global scope: R+L vs R"),
    Contrast("system", B3, FULL, "the whole system: R+E+L vs B3"),
    # Contrasts only the three extra cells of the 2^3 design (E, L, E+L; `--cells all`) make possible.
    Contrast("scope_alone", B3, parse_cell("E"), "E without R or L: E vs B3 (zero by construction: E acts through L)"),
    Contrast("lifecycle_softmax", B3, parse_cell("L"), "L without R: L vs B3 (lifecycle under the softmax router)"),
    Contrast("lifecycle_softmax_scope", parse_cell("E"), parse_cell("E+L"),
             "L without R under per-domain scope: E+L vs E"),
    Contrast("scope_softmax_lifecycle", parse_cell("L"), parse_cell("E+L"),
             "E without R, acting through L: E+L vs L"),
    Contrast("router_under_lifecycle", parse_cell("L"), parse_cell("R+L"), "router with the lifecycle on: R+L vs L"),
)


@dataclass(frozen=True)
class Interaction:
    """An interaction of the 2^3 design as a per-seed contrast over all eight cells.

    With ``x_f = +1`` if factor f is on in a cell and ``-1`` if off, the per-seed value is
    ``sum_cells w_c log PPL_c`` with ``w_c = -prod_{f in factors} x_f / 2^(3 - |factors|)``: for two
    factors A, B it is (A's improvement with B on - A's improvement with B off), averaged over the
    third factor; for all three, the A x B interaction with C on minus with C off. Positive = the
    factors help more together than apart (the sign convention of every delta).
    """

    name: str
    factors: tuple[str, ...]
    description: str

    def weights(self) -> dict[Cell, float]:
        w = {}
        for c in all_cells():
            sign = 1.0
            for f in self.factors:
                sign *= 1.0 if f in c.factors else -1.0
            w[c] = -sign / 2 ** (len(ORDER) - len(self.factors))
        return w


INTERACTIONS: tuple[Interaction, ...] = (
    Interaction("RxE", ("R", "E"), "router x scope: router gain with E on - with E off (mean over L)"),
    Interaction("RxL", ("R", "L"), "router x lifecycle: router gain with L on - with L off (mean over E)"),
    Interaction("ExL", ("E", "L"), "scope x lifecycle: scope gain with L on - with L off (mean over R)"),
    Interaction("RxExL", ("R", "E", "L"), "three-way: the R x E interaction with L on - with L off"),
)

#: One-factor steps from B3 to R+E+L; their sum should match the direct `system` contrast.
CHAIN: tuple[str, ...] = ("router", "scope", "lifecycle")


def contrasts_for(cells: list[Cell]) -> list[Contrast]:
    """The named contrasts whose two cells are both present in `cells`."""
    have = set(cells)
    return [c for c in CONTRASTS if c.reference in have and c.treated in have]


def interactions_for(cells: list[Cell]) -> list[Interaction]:
    """The interactions, when all eight cells are present (none otherwise)."""
    return list(INTERACTIONS) if set(all_cells()) <= set(cells) else []
