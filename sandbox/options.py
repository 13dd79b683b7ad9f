"""Option parsing shared by every command: ranges, seed lists, integer/float values.

Grammar:
    range   := NUMBER | NUMBER ".." NUMBER          e.g. "0..1", "0.5", "1e-3..1e-1"
    seeds   := INT ("," INT)*  (an explicit list)   e.g. "42,137,2026"
             | "n=" COUNT | COUNT                   a count of seeds: "5" -> 0,1,2,3,4
    axis    := NAME "=" range                       e.g. "context_noise=0..1"

A single value is the degenerate range (v, v). All parsers raise `BadInput` naming the flag.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from sandbox.errors import BadInput

_NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_RANGE_RE = re.compile(rf"^\s*({_NUM})\s*(?:\.\.\s*({_NUM})\s*)?$")

DEFAULT_SEEDS = (42, 137, 2026)


@dataclass(frozen=True)
class Range:
    """A closed interval [lo, hi]; lo == hi is a single value."""

    lo: float
    hi: float

    @property
    def is_point(self) -> bool:
        return self.lo == self.hi

    def grid(self, points: int) -> np.ndarray:
        """`points` evenly spaced values from lo to hi (one value if the range is a point)."""
        if self.is_point:
            return np.array([self.lo])
        return np.linspace(self.lo, self.hi, points)

    def __str__(self) -> str:
        return format_range(self)


def format_range(r: Range) -> str:
    """Inverse of `parse_range`: ``Range(0, 1)`` -> ``"0..1"``, points as one number."""
    def fmt(v: float) -> str:
        v = float(v)
        return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)
    return fmt(r.lo) if r.is_point else f"{fmt(r.lo)}..{fmt(r.hi)}"


def parse_range(text: str, flag: str, lo: float | None = None, hi: float | None = None) -> Range:
    """Parse ``LO..HI`` or a single value, checking ``lo <= LO <= HI <= hi`` (bounds optional)."""
    bounds = _bounds_text(lo, hi)
    allowed = f"a number or LO..HI with {bounds}" if bounds else "a number or LO..HI with LO <= HI"
    m = _RANGE_RE.match(str(text))
    if not m or "..." in str(text):
        raise BadInput(flag, text, allowed)
    a = float(m.group(1))
    b = float(m.group(2)) if m.group(2) is not None else a
    if not (math.isfinite(a) and math.isfinite(b)) or a > b:
        raise BadInput(flag, text, allowed)
    if (lo is not None and a < lo) or (hi is not None and b > hi):
        raise BadInput(flag, text, allowed)
    return Range(a, b)


def _bounds_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"{lo:g} <= LO <= HI <= {hi:g}"
    if lo is not None:
        return f"{lo:g} <= LO <= HI"
    if hi is not None:
        return f"LO <= HI <= {hi:g}"
    return ""


#: At most this many seeds (as a count or a list): every seed is a trial, and a mistyped count such
#: as 1000000000 must be an error, not a MemoryError an hour later.
MAX_SEEDS = 10_000
#: Largest seed value (torch generators take seeds below 2**63 in every code path here).
MAX_SEED = 2**63 - 1


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """Seeds as an explicit comma list (``42,137,2026``) or a count (``5`` or ``n=5`` -> 0..4).

    A single bare integer is a count, so ``--seeds 3`` means three seeds 0, 1, 2; write ``42,`` for
    the single seed 42. Seeds must be distinct non-negative integers up to `MAX_SEED`, at most
    `MAX_SEEDS` of them.
    """
    allowed = (f"a count in 1..{MAX_SEEDS} (e.g. 5) or a comma list of at most {MAX_SEEDS} distinct integers in "
               f"0..2**63-1 (e.g. 42,137,2026)")
    s = str(text).strip()
    if s.startswith("n="):
        s = s[2:]
    if "," not in s:
        if not re.fullmatch(r"\d{1,19}", s) or not 1 <= int(s) <= MAX_SEEDS:
            raise BadInput(flag, text, allowed)
        return list(range(int(s)))
    parts = [p.strip() for p in s.split(",")]
    if parts and parts[-1] == "":
        parts = parts[:-1]
    if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
        raise BadInput(flag, text, allowed)
    if len(parts) > MAX_SEEDS or any(len(p) > 19 for p in parts):
        raise BadInput(flag, text, allowed)
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds) or max(seeds) > MAX_SEED:
        raise BadInput(flag, text, allowed)
    return seeds


def parse_axis(text: str, flag: str, allowed_names: dict[str, tuple[float | None, float | None]]) -> tuple[str, Range]:
    """Parse ``NAME=LO..HI`` where NAME is one of `allowed_names` (name -> (lo, hi) bounds).

    Dashes and underscores in NAME are interchangeable (``context-noise`` == ``context_noise``).
    """
    names = ", ".join(sorted(allowed_names))
    if "=" not in str(text):
        raise BadInput(flag, text, f"NAME=LO..HI with NAME one of: {names}")
    name, _, rng = str(text).partition("=")
    name = name.strip().replace("-", "_")
    if name not in allowed_names:
        raise BadInput(flag, text, f"NAME=LO..HI with NAME one of: {names}")
    lo, hi = allowed_names[name]
    return name, parse_range(rng, f"{flag} {name}", lo, hi)


def check_int(value: int, flag: str, lo: int | None = None, hi: int | None = None) -> int:
    """Check an integer option lies in [lo, hi]."""
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadInput(flag, value, f"an integer {_bounds_text(lo, hi).replace('LO <= HI', 'N')}")
    return value


def parse_numbers(text: str, flag: str) -> tuple[float, ...]:
    """A comma list of finite numbers (``0.1,0.2,0.4``); the range check is the config's."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        vals = ()
    if not vals or not all(math.isfinite(v) for v in vals):
        raise BadInput(flag, text, "a comma list of numbers, e.g. 0.1,0.2,0.4")
    return vals
