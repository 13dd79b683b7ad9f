"""Gate diagnostics (`sandbox.gatestats`) on constructed gates whose values are known by hand:
uniform, one-hot (a one-slot monopoly), block-diagonal (each domain its own slots), a floored
sigmoid-like gate, and the columns the tables get."""

import math

import numpy as np
import pytest
import torch

from sandbox.gatestats import COLUMNS, NAMES, columns, domain_matrix, gate_stats, matrix_stats, token_stats

# M = 2 domains, K = 4 slots, 3 tokens per domain.
DOM = np.array([0, 0, 0, 1, 1, 1])


def test_uniform():
    g = np.full((6, 4), 0.25)
    s = gate_stats(g, DOM, own_slots=[0, 2], top=2)
    assert s["entropy"] == pytest.approx(math.log(4))          # log K
    assert s["slots5"] == 4 and s["slots5_domain"] == [4, 4]
    assert s["top4"] == pytest.approx(0.5)                      # top-2 of 4 even slots: 2 / 4
    assert s["mi"] == pytest.approx(0.0, abs=1e-12)
    assert s["own"] == pytest.approx([0.25, 0.25])              # 1 / K by chance
    assert s["mass"] == pytest.approx(1.0) and s["open"] == pytest.approx(1.0)
    assert s["spread"] == pytest.approx(0.0)


def test_one_hot_monopoly():
    g = np.zeros((6, 4))
    g[:, 1] = 1.0                                               # every token on slot 1
    s = gate_stats(g, DOM, own_slots=[1, 3])
    assert s["entropy"] == pytest.approx(0.0)
    assert s["slots5"] == 1 and s["slots5_domain"] == [1, 1]
    assert s["top4"] == pytest.approx(1.0)
    assert s["mi"] == pytest.approx(0.0, abs=1e-12)             # both domains alike: no information
    assert s["own"] == pytest.approx([1.0, 0.0])


def test_block_diagonal_specialisation():
    g = np.zeros((6, 4))
    g[:3, :2] = 0.5                                             # domain 0 on slots 0, 1
    g[3:, 2:] = 0.5                                             # domain 1 on slots 2, 3
    s = gate_stats(g, DOM, own_slots=[0, 3], top=2)
    assert s["entropy"] == pytest.approx(math.log(2))
    assert s["slots5"] == 4 and s["slots5_domain"] == [2, 2]    # pooled: even; per domain: 2 each
    assert s["top4"] == pytest.approx(0.5)
    assert s["mi"] == pytest.approx(math.log(2))                # log M: the slot tells the domain
    assert s["own"] == pytest.approx([0.5, 0.5])
    # with 16 slots and 4 domains on 4 slots each, MI reaches log 4 and top-4 is 1/4
    G = np.kron(np.eye(4), np.full((1, 4), 0.25))               # (4, 16)
    m = matrix_stats(G, own_slots=[0, 4, 8, 12])
    assert m["mi"] == pytest.approx(math.log(4)) and m["top4"] == pytest.approx(0.25)
    assert m["slots5"] == 16 and m["slots5_domain"] == [4] * 4 and m["own"] == pytest.approx([0.25] * 4)


def test_partial_mixture_by_hand():
    # domain 0 on slot 0 only, domain 1 half on slot 0 and half on slot 1 (K = 2):
    # joint P = [[1/2, 0], [1/4, 1/4]], P(m) = 1/2, P(k) = [3/4, 1/4]
    # MI = 1/2 log(1/2 / (1/2 3/4)) + 1/4 log(1/4 / (1/2 3/4)) + 1/4 log(1/4 / (1/2 1/4))
    G = np.array([[1.0, 0.0], [0.5, 0.5]])
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    m = matrix_stats(G, own_slots=[0, 1], top=1)
    assert m["mi"] == pytest.approx(mi)
    assert m["top4"] == pytest.approx(0.75) and m["slots5"] == 2 and m["slots5_domain"] == [1, 2]
    assert m["own"] == pytest.approx([1.0, 0.5])


def test_floored_gates_and_input_dependence():
    # a sigmoid router shut by its anneal: every gate at its floor 0.03, plus 1e-6
    f = np.full(4, 0.03)
    shut = np.tile(f + 1e-6, (6, 1))
    s = token_stats(shut, f)
    assert s["mass"] == pytest.approx(0.12 + 4e-6) and s["open"] == pytest.approx(4e-6) and s["spread"] == 0
    # two tokens whose slot-0 gate is 0.1 and 0.5 above the floor: SD 0.2 on slot 0, 0 elsewhere
    g = np.tile(f, (2, 1))
    g[0, 0] += 0.1
    g[1, 0] += 0.5
    s = token_stats(g, f)
    assert s["open"] == pytest.approx(0.3) and s["spread"] == pytest.approx(0.2 / 4)
    assert s["mass"] == pytest.approx(0.12 + 0.3)


def test_torch_input_and_domain_matrix():
    g = torch.tensor([[0.2, 0.8], [0.4, 0.6], [1.0, 0.0]])
    G = domain_matrix(g, torch.tensor([0, 0, 1]), n_domains=3)
    np.testing.assert_allclose(G[:2], [[0.3, 0.7], [1.0, 0.0]], atol=1e-7)
    assert np.isnan(G[2]).all()                                 # a domain without tokens
    m = matrix_stats(G)                                         # the empty domain is left out
    assert m["slots5_domain"] == [2, 1] and m["own"] is None


def test_columns_flatten():
    g = np.full((6, 4), 0.25)
    s = gate_stats(g, DOM, own_slots=[0, 2])
    cols = columns(s, "after")
    assert set(cols) == {f"gate_{k}_after" for k in NAMES}
    assert cols["gate_slots5_domain_after"] == 4 and cols["gate_own_after"] == pytest.approx(0.25)
    assert math.isnan(columns(gate_stats(g, DOM), "before")["gate_own_before"])   # no specialist slots
    assert set(cols) | set(columns(s, "before")) == set(COLUMNS)
