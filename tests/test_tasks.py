"""Task generator: shapes, invariants, alignment cosine curve, overlap, reproducibility per seed."""

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from sandbox.errors import BadInput
from sandbox.adapters import product_inner, product_norm
from sandbox.tasks import Task, TaskSpec, initial_adapters, make_task, noisy_contexts


# Oracles: measurements of what the generator promises (the README's alignment and overlap tables).

def alignment_cosine(task: Task, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Cosine between each domain's assigned adapter ``B_k A_k`` and ``D_m``: ``(S, M)``.

    Scale-free, so it does not need the bank's ``alpha / r``.
    """
    idx = task.assignment
    A_sel = A.gather(1, idx[:, :, None, None].expand(-1, -1, *A.shape[-2:]))   # (S, M, r, d)
    B_sel = B.gather(1, idx[:, :, None, None].expand(-1, -1, *B.shape[-2:]))   # (S, M, d, r)
    inner = product_inner(A_sel, B_sel, task.V, task.U)
    norm_w = product_norm(A_sel, B_sel)
    norm_d = product_norm(task.V, task.U)
    return inner / (norm_w * norm_d)


def domain_cosines(task: Task) -> torch.Tensor:
    """Cosines between the domains' true updates: ``(S, M, M)`` (diagonal 1)."""
    U, V = task.U, task.V
    G = product_inner(V[:, :, None], U[:, :, None], V[:, None], U[:, None])   # (S, M, M)
    n = torch.diagonal(G, dim1=-2, dim2=-1).clamp_min(0).sqrt()               # (S, M)
    return G / (n[:, :, None] * n[:, None, :])


def test_shapes_and_invariants():
    spec = TaskSpec(domains=3, slots=5, dim=12, rank=3, true_rank=2, context_dim=6)
    t = make_task(spec, [1, 2, 3, 4])
    assert t.U.shape == (4, 3, 12, 2) and t.V.shape == (4, 3, 2, 12)
    assert t.contexts.shape == (4, 3, 6) and t.assignment.shape == (4, 3)
    D = t.U @ t.V                                               # dense true updates (S, M, d, d)
    torch.testing.assert_close(torch.linalg.matrix_norm(D), torch.ones(4, 3))
    assert (torch.linalg.matrix_rank(D) == 2).all()
    torch.testing.assert_close(t.contexts.norm(dim=-1), torch.ones(4, 3))
    for row in t.assignment.tolist():
        assert len(set(row)) == 3 and all(0 <= k < 5 for k in row)
    # balanced factorisation: ||U||_F == ||V||_F
    torch.testing.assert_close(t.U.norm(dim=(-1, -2)), t.V.norm(dim=(-1, -2)))
    A, B = initial_adapters(t, spec, scale=0.5)
    assert A.shape == (4, 5, 3, 12) and B.shape == (4, 5, 12, 3)


def test_seed_task_independent_of_batch():
    spec = TaskSpec(alignment=0.4)
    a = make_task(spec, [7, 8, 9])
    b = make_task(spec, [9])
    torch.testing.assert_close(a.U[2], b.U[0])
    torch.testing.assert_close(a.contexts[2], b.contexts[0])
    assert a.assignment[2].tolist() == b.assignment[0].tolist()
    Aa, Ba = initial_adapters(a, spec)
    Ab, Bb = initial_adapters(b, spec)
    torch.testing.assert_close(Aa[2], Ab[0])
    torch.testing.assert_close(Ba[2], Bb[0])


def test_product_inner_matches_dense(gen):
    B1, A1 = torch.randn(3, 10, 2, generator=gen), torch.randn(3, 2, 10, generator=gen)
    B2, A2 = torch.randn(3, 10, 4, generator=gen), torch.randn(3, 4, 10, generator=gen)
    dense = ((B1 @ A1) * (B2 @ A2)).sum((-1, -2))
    torch.testing.assert_close(product_inner(A1, B1, A2, B2), dense)


def test_alignment_cosine_curve_monotone_with_end_points():
    """The measured curve that the README documents: cosine(s B_k A_k, D_m) against a."""
    grid = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]
    means = []
    for a in grid:
        spec = TaskSpec(alignment=a)
        t = make_task(spec, range(300))
        A, B = initial_adapters(t, spec, scale=0.5)
        means.append(alignment_cosine(t, A, B).mean().item())
    assert abs(means[0]) < 0.01          # random: ~0 (sd of the mean ~0.002)
    assert means[-1] == pytest.approx(1.0, abs=1e-5)
    assert all(x < y for x, y in zip(means, means[1:]))
    assert 0.2 < means[2] < 0.35          # a = 0.5 gives ~0.26 (roughly a^2)


def test_exact_alignment_reproduces_update():
    spec = TaskSpec(alignment=1.0, dim=10, slots=6)
    t = make_task(spec, [3, 5])
    s = 0.25
    A, B = initial_adapters(t, spec, scale=s)
    W = s * B @ A                                               # (S, K, d, d)
    picked = W.gather(1, t.assignment[:, :, None, None].expand(-1, -1, 10, 10))
    torch.testing.assert_close(picked, t.U @ t.V, atol=1e-5, rtol=1e-4)


def test_random_slots_do_not_depend_on_alignment():
    s0, s1 = TaskSpec(alignment=0.0), TaskSpec(alignment=0.7)
    t = make_task(s0, [11, 12])
    A0, B0 = initial_adapters(t, s0)
    A1, B1 = initial_adapters(t, s1)
    spare = torch.ones(2, s0.slots, dtype=torch.bool)
    spare.scatter_(1, t.assignment, False)
    torch.testing.assert_close(A0[spare], A1[spare])
    assert not torch.allclose(A0[~spare], A1[~spare])


@pytest.mark.parametrize("overlap", [0.0, 0.3, 0.7, 1.0])
def test_overlap_sets_domain_cosine(overlap):
    t = make_task(TaskSpec(overlap=overlap), range(300))
    c = domain_cosines(t)
    off = c[:, ~torch.eye(4, dtype=torch.bool)]
    assert off.mean().item() == pytest.approx(overlap, abs=0.03)


def test_noisy_contexts_common_random_numbers():
    t = make_task(TaskSpec(), [1, 2])
    x = noisy_contexts(t, 0.5, 7)
    y = noisy_contexts(t, 0.5, 7)
    assert x.shape == (2, 4, 7, 16)
    torch.testing.assert_close(x, y)
    z = noisy_contexts(t, 0.5, 7, salt=1)
    assert not torch.allclose(x, z)
    torch.testing.assert_close(noisy_contexts(t, 0.0, 3), t.contexts[:, :, None].expand(-1, -1, 3, -1))
    # noise scale: sample sd of (x - c) is the noise level
    big = noisy_contexts(t, 0.5, 2000)
    assert (big - t.contexts[:, :, None]).std().item() == pytest.approx(0.5, rel=0.03)


@pytest.mark.parametrize("field, value, flag", [
    ("slots", 2, "--slots"), ("alignment", -1.0, "--alignment"), ("alignment", 1.5, "--alignment"),
    ("overlap", 2.0, "--overlap"), ("true_rank", 9, "--true-rank"), ("context_noise", float("nan"), "--context-noise"),
    ("dim", 0, "--dim"),
])
def test_spec_validation_names_flag(field, value, flag):
    with pytest.raises(BadInput) as e:
        TaskSpec(**{field: value})
    assert e.value.flag == flag


@given(st.floats(0, 1), st.integers(0, 10_000))
def test_alignment_cosine_bounded(a, seed):
    spec = TaskSpec(alignment=a, dim=8, slots=5, domains=3)
    t = make_task(spec, [seed])
    A, B = initial_adapters(t, spec)
    c = alignment_cosine(t, A, B)
    assert torch.isfinite(c).all() and (c.abs() <= 1 + 1e-5).all()
    assert np.isclose(float(a), spec.alignment)
