"""The routing ceiling: exact best gates on the simplex and in the box, against brute force."""

import itertools

import pytest
import torch
from hypothesis import given, strategies as st

from sandbox.oracle import best_gates, feasible_set, project_simplex, quadratic


def _brute(G, c, kind):
    """Enumerate every face: solve the KKT system on it, keep the best feasible point."""
    K = c.shape[-1]
    best, value = None, float("inf")
    if kind == "simplex":
        faces = [list(f) for r in range(1, K + 1) for f in itertools.combinations(range(K), r)]
        for f in faces:
            n = len(f)
            A = torch.zeros(n + 1, n + 1, dtype=G.dtype)
            A[:n, :n], A[:n, n], A[n, :n] = 2 * G[f][:, f], 1, 1
            rhs = torch.cat([2 * c[f], torch.ones(1, dtype=G.dtype)])
            sol = torch.linalg.lstsq(A, rhs[:, None]).solution[:n, 0]
            if (sol >= -1e-10).all() and abs(float(sol.sum()) - 1) < 1e-8:
                g = torch.zeros(K, dtype=G.dtype)
                g[f] = sol
                v = float(quadratic(g, G, c))
                if v < value:
                    best, value = g, v
    else:
        for combo in itertools.product((0, 1, 2), repeat=K):     # at 0, at 1, free
            free = [k for k in range(K) if combo[k] == 2]
            fixed = [k for k in range(K) if combo[k] < 2]
            g = torch.tensor([float(v) if v < 2 else 0.0 for v in combo], dtype=G.dtype)
            if free:
                rhs = c[free] - (G[free][:, fixed] @ g[fixed] if fixed else 0)
                sol = torch.linalg.lstsq(G[free][:, free], rhs[:, None]).solution[:, 0]
                if not ((sol >= -1e-10) & (sol <= 1 + 1e-10)).all():
                    continue
                g[free] = sol
            v = float(quadratic(g, G, c))
            if v < value:
                best, value = g, v
    return best, value


@given(st.integers(2, 5), st.integers(1, 7), st.integers(0, 10_000), st.sampled_from(["simplex", "box"]))
def test_best_gates_match_brute_force(K, inner, seed, kind):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(K, inner, generator=gen, dtype=torch.float64)
    G = X @ X.T                                                   # PSD, singular when inner < K
    c = 2 * torch.randn(K, generator=gen, dtype=torch.float64)
    g = best_gates(G, c, kind)
    _, want = _brute(G, c, kind)
    assert float(quadratic(g, G, c)) <= want + 1e-9
    if kind == "simplex":
        assert (g >= 0).all() and abs(float(g.sum()) - 1) < 1e-12
    else:
        assert ((g >= 0) & (g <= 1)).all()


def test_batched_equals_one_at_a_time(gen):
    X = torch.randn(6, 3, 5, 4, generator=gen, dtype=torch.float64)
    G = X @ X.transpose(-1, -2)                                    # (6, 3, 5, 5)
    c = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
    for kind in ("simplex", "box"):
        batch = best_gates(G, c, kind)
        for i in range(6):
            for j in range(3):
                one = best_gates(G[i, j], c[i, j], kind)
                assert abs(float(quadratic(batch[i, j], G[i, j], c[i, j]) - quadratic(one, G[i, j], c[i, j]))) < 1e-10


def test_simplex_projection_is_exact(gen):
    y = torch.randn(50, 6, generator=gen, dtype=torch.float64) * 3
    p = project_simplex(y)
    assert torch.allclose(p.sum(-1), torch.ones(50, dtype=torch.float64)) and (p >= 0).all()
    # optimality: no feasible point is closer (check against random simplex points)
    q = torch.distributions.Dirichlet(torch.ones(6, dtype=torch.float64)).sample((50, 200))
    assert ((y[:, None] - q).norm(dim=-1) >= (y - p).norm(dim=-1, keepdim=True) - 1e-12).all()


def test_feasible_sets():
    assert feasible_set("softmax") == "simplex" and feasible_set("sigmoid") == "box"
    with pytest.raises(Exception):
        feasible_set("tanh")


def test_same_input_same_bits(gen):
    """The solver is deterministic (LAPACK's default least-squares driver was not, in the last bit)."""
    X = torch.randn(10, 4, 8, 6, generator=gen, dtype=torch.float64)
    G, c = X @ X.transpose(-1, -2), torch.randn(10, 4, 8, generator=gen, dtype=torch.float64)
    for kind in ("simplex", "box"):
        first = best_gates(G, c, kind)
        assert all(torch.equal(first, best_gates(G, c, kind)) for _ in range(10))
