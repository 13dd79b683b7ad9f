"""Cell names of the 2^3 factorial, the default partial set and the named contrasts."""

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sandbox.factors import (
    CHAIN,
    CONTRASTS,
    DEFAULT_CELLS,
    FULL,
    B3,
    all_cells,
    contrasts_for,
    parse_cell,
    parse_cells,
)
from sandbox.errors import BadInput

letters = st.lists(st.sampled_from("REL"), min_size=1, max_size=3, unique=True)


@given(letters, st.randoms())
def test_order_and_case_do_not_matter(ls, rnd):
    shuffled = ls[:]
    rnd.shuffle(shuffled)
    cased = [c.lower() if rnd.random() < 0.5 else c for c in shuffled]
    assert parse_cell("+".join(cased)) == parse_cell("+".join(ls))


@given(letters)
def test_round_trip(ls):
    c = parse_cell("+".join(ls))
    assert parse_cell(c.name) == c
    assert c.factors == frozenset(ls)


def test_aliases_and_flags():
    assert parse_cell("B3") == parse_cell("b3") == B3 and B3.name == "B3"
    assert parse_cell("R+E+L") == parse_cell("l+e+r") == FULL
    assert FULL.name == "R+E+L"
    c = parse_cell("L+R")
    assert c.name == "R+L" and c.router and c.lifecycle and not c.per_domain


@pytest.mark.parametrize("bad", ["", "X", "R+R", "R+X", "R+", "RE", "B4", "+"])
def test_bad_cells(bad):
    with pytest.raises(BadInput) as e:
        parse_cell(bad)
    msg = e.value.one_line()
    assert "--cell" in msg and "R, E, L" in msg


def test_design():
    cells = all_cells()
    assert len(cells) == 8 and len(set(cells)) == 8
    assert [c.name for c in cells] == ["B3", "R", "E", "L", "R+E", "R+L", "E+L", "R+E+L"]
    assert [c.name for c in DEFAULT_CELLS] == ["B3", "R", "R+E", "R+L", "R+E+L"]
    assert parse_cells("partial") == list(DEFAULT_CELLS)
    assert parse_cells("B3, r+e") == [B3, parse_cell("R+E")]
    with pytest.raises(BadInput):
        parse_cells("R,r")


def test_contrasts_are_one_factor_steps_and_chain_reaches_full():
    by_name = {c.name: c for c in CONTRASTS}
    assert set(by_name) == {"router", "scope", "lifecycle", "lifecycle_global", "system", "scope_alone",
                            "lifecycle_softmax", "lifecycle_softmax_scope", "scope_softmax_lifecycle",
                            "router_under_lifecycle"}
    for c in CONTRASTS:
        if c.name != "system":
            added = c.treated.factors - c.reference.factors
            assert len(added) == 1 and c.reference.factors < c.treated.factors
    # The chain B3 -> R -> R+E -> R+E+L telescopes to the direct system contrast.
    steps = [by_name[n] for n in CHAIN]
    assert steps[0].reference == B3 and steps[-1].treated == FULL
    for a, b in itertools.pairwise(steps):
        assert a.treated == b.reference
    # The study's five named contrasts are estimable from the default five cells; the rest need E, L, E+L.
    assert [c.name for c in contrasts_for(list(DEFAULT_CELLS))] == ["router", "scope", "lifecycle", "lifecycle_global",
                                                                    "system"]
    assert len(contrasts_for(all_cells())) == len(CONTRASTS)
    assert [c.name for c in contrasts_for([B3, parse_cell("R")])] == ["router"]


def test_interactions_are_differences_of_one_factor_gains():
    """RxL = (router gain with L on - with L off), averaged over E; weights sum to 0 and each
    interaction is orthogonal to the others (a 2^3 design)."""
    from sandbox.factors import INTERACTIONS, interactions_for

    assert interactions_for(list(DEFAULT_CELLS)) == [] and len(interactions_for(all_cells())) == 4
    by = {i.name: i.weights() for i in INTERACTIONS}
    v = {c: float(len(c.factors) ** 2 + 3 * c.per_domain) for c in all_cells()}   # any cell values
    gain = lambda ref, tr: v[parse_cell(ref)] - v[parse_cell(tr)]
    rxl = 0.5 * ((gain("L", "R+L") - gain("B3", "R")) + (gain("E+L", "R+E+L") - gain("E", "R+E")))
    assert sum(w * v[c] for c, w in by["RxL"].items()) == pytest.approx(rxl)
    names = list(by)
    for i, a in enumerate(names):
        assert sum(by[a].values()) == pytest.approx(0)
        for b in names[i + 1:]:
            assert sum(by[a][c] * by[b][c] for c in all_cells()) == pytest.approx(0)


def test_cells_command_lists_interactions_only_for_all_eight(capsys):
    from sandbox.app.cli import main

    assert main(["cells", "--cells", "all"]) == 0
    out = capsys.readouterr().out
    assert "interactions" in out and "RxExL" in out
    assert main(["cells", "--cells", "partial"]) == 0
    assert "interactions" not in capsys.readouterr().out
