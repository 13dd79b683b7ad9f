"""Parsing shared by every command: ranges, seed lists, axes, checked ints."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.errors import BadInput
from sandbox.options import (
    Range,
    check_int,
    format_range,
    parse_axis,
    parse_range,
    parse_seeds,
)

finite = st.floats(min_value=-1e9, max_value=1e9, allow_nan=False, allow_infinity=False)


@given(finite, finite)
def test_range_round_trip(a, b):
    lo, hi = min(a, b), max(a, b)
    r = Range(lo, hi)
    assert parse_range(format_range(r), "--x") == r


@given(st.floats(min_value=0, max_value=1), st.floats(min_value=0, max_value=1))
def test_range_within_bounds_accepted_and_ordered(a, b):
    lo, hi = min(a, b), max(a, b)
    r = parse_range(f"{lo!r}..{hi!r}", "--alignment", 0, 1)
    assert (r.lo, r.hi) == (lo, hi)


@given(finite, finite)
def test_reversed_range_rejected(a, b):
    if a == b:
        return
    lo, hi = min(a, b), max(a, b)
    with pytest.raises(BadInput) as e:
        parse_range(f"{hi!r}..{lo!r}", "--alignment")
    assert e.value.flag == "--alignment"


@pytest.mark.parametrize("text", ["1.5..2", "1..0", "-1", "-0.1..0.5", "0..1.0001", "a..b", "", "0...1", "nan", "0..inf"])
def test_bad_alignment_ranges(text):
    with pytest.raises(BadInput) as e:
        parse_range(text, "--alignment", 0, 1)
    msg = e.value.one_line()
    assert "--alignment" in msg and "\n" not in msg and "0 <= LO <= HI <= 1" in msg


def test_single_value_is_point_range_and_grid():
    r = parse_range("0.25", "--alignment", 0, 1)
    assert r.is_point and r.grid(7).tolist() == [0.25]
    g = parse_range("0..1", "--alignment", 0, 1).grid(5)
    assert g.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]


def format_seeds(seeds: list[int]) -> str:
    """An explicit seed list as a user writes it (a comma list; one seed takes a trailing comma)."""
    return ",".join(str(s) for s in seeds) + ("," if len(seeds) == 1 else "")


@given(st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=8, unique=True))
def test_seed_list_round_trip(seeds):
    assert parse_seeds(format_seeds(seeds)) == seeds


@given(st.integers(min_value=1, max_value=50))
def test_seed_count(n):
    assert parse_seeds(str(n)) == list(range(n))
    assert parse_seeds(f"n={n}") == list(range(n))


@pytest.mark.parametrize("text", ["0", "-3", "1,1", "a,b", ",", "1.5", "", "42,-1"])
def test_bad_seeds(text):
    with pytest.raises(BadInput) as e:
        parse_seeds(text)
    assert e.value.flag == "--seeds"


def test_axis_parsing():
    axes = {"context_noise": (0.0, None), "overlap": (0.0, 1.0)}
    assert parse_axis("context-noise=0..2", "--axis", axes) == ("context_noise", Range(0.0, 2.0))
    with pytest.raises(BadInput, match="NAME one of: context_noise, overlap"):
        parse_axis("bogus=0..1", "--axis", axes)
    with pytest.raises(BadInput, match="--axis overlap"):
        parse_axis("overlap=0..2", "--axis", axes)
    with pytest.raises(BadInput):
        parse_axis("overlap", "--axis", axes)


def test_checked_numbers():
    assert check_int(3, "--points", 1) == 3
    with pytest.raises(BadInput, match=r"--points 0: expected an integer 1 <= N"):
        check_int(0, "--points", 1)
