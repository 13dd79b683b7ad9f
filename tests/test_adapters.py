"""The adapter bank: the two-matmul mixture against a per-adapter loop, factor-form SVD helpers
against dense linear algebra, inits, save/load and config validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from helpers import slot_rank
from sandbox.adapters import (
    AdapterBank, BankConfig, gated_mixture, init_factors, lowrank_svd, product_inner, product_norm, products,
    refactor, slot_gram, split_factors,
)
from sandbox.errors import BadInput


def loop_mixture(x, A, B, gates, scale):
    """Oracle: ``sum_k gates[..., k] * scale * (B_k A_k x)``, one adapter at a time."""
    out = 0
    for k in range(A.shape[-3]):
        W = B[..., k, :, :] @ A[..., k, :, :]  # (*b, d_out, d_in)
        out = out + gates[..., k:k + 1] * scale * (x @ W.transpose(-1, -2))
    return out


@given(S=st.integers(1, 3), P=st.integers(1, 3), K=st.integers(1, 5), r=st.integers(1, 4),
       d_in=st.integers(1, 9), d_out=st.integers(1, 9), N=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       per_seq=st.booleans())
@settings(max_examples=40)
def test_mixture_matches_loop_oracle(S, P, K, r, d_in, d_out, N, seed, per_seq):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(S, 1, N, d_in, generator=g)  # broadcast over the population dim
    A = torch.randn(S, P, K, r, d_in, generator=g)
    B = torch.randn(S, P, K, d_out, r, generator=g)
    gates = torch.rand(S, P, 1 if per_seq else N, K, generator=g)
    y = gated_mixture(x, A, B, gates, 0.5)
    assert y.shape == (S, P, N, d_out)
    assert_close(y, loop_mixture(x, A, B, gates, 0.5), atol=1e-5, rtol=1e-5)


def test_mixture_gradients_match_loop(gen):
    A = torch.randn(2, 4, 3, 5, generator=gen, requires_grad=True)
    B = torch.randn(2, 4, 6, 3, generator=gen, requires_grad=True)
    gates = torch.rand(2, 7, 4, generator=gen, requires_grad=True)
    x = torch.randn(2, 7, 5, generator=gen)
    w = torch.randn(2, 7, 6, generator=gen)
    grads = torch.autograd.grad((gated_mixture(x, A, B, gates, 2.0) * w).sum(), (A, B, gates))
    ref = torch.autograd.grad((loop_mixture(x, A, B, gates, 2.0) * w).sum(), (A, B, gates))
    for a, b in zip(grads, ref):
        assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_obvious_weights_one_gate_moves_one_adapter():
    # Slot 0 maps e_0 -> 2 e_1, slot 1 maps e_0 -> 3 e_2 (rank 1, d = 3).
    A = torch.zeros(2, 1, 3)
    B = torch.zeros(2, 3, 1)
    A[0, 0, 0], B[0, 1, 0] = 1.0, 2.0
    A[1, 0, 0], B[1, 2, 0] = 1.0, 3.0
    x = torch.tensor([[1.0, 0.0, 0.0]])
    assert_close(gated_mixture(x, A, B, torch.tensor([[1.0, 0.0]]), 1.0), torch.tensor([[0.0, 2.0, 0.0]]))
    assert_close(gated_mixture(x, A, B, torch.tensor([[0.0, 1.0]]), 1.0), torch.tensor([[0.0, 0.0, 3.0]]))
    # raising gate 1 by 0.5 moves only slot 1's output coordinate, by 0.5 * 3 * scale
    lo = gated_mixture(x, A, B, torch.tensor([[0.3, 0.2]]), 0.5)
    hi = gated_mixture(x, A, B, torch.tensor([[0.3, 0.7]]), 0.5)
    assert_close(hi - lo, torch.tensor([[0.0, 0.0, 0.75]]))


def test_init_lora_and_random(gen):
    A, B = init_factors((3,), 4, 2, 10, 6, "lora", gen)
    assert A.shape == (3, 4, 2, 10) and B.shape == (3, 4, 6, 2)
    assert torch.all(B == 0) and A.abs().max() <= 1 / math.sqrt(10) and A.abs().max() > 0
    A, B = init_factors((2, 3), 4, 2, 10, 6, "random", gen, scale=0.25, init_norm=1.5)
    assert_close(torch.linalg.matrix_norm(products(A, B, 0.25)), torch.full((2, 3, 4), 1.5))
    with pytest.raises(BadInput, match="init"):
        init_factors((), 2, 2, 3, 3, "xavier", gen)


def test_factor_form_inner_products_match_dense(gen):
    A = torch.randn(2, 5, 3, 7, generator=gen, dtype=torch.float64)
    B = torch.randn(2, 5, 4, 3, generator=gen, dtype=torch.float64)
    P = products(A, B)  # (2, 5, 4, 7)
    dense = torch.einsum("bkij,blij->bkl", P, P)
    assert_close(slot_gram(A, B), dense)
    assert_close(product_inner(A[:, 0], B[:, 0], A[:, 1], B[:, 1]), dense[:, 0, 1])
    assert_close(product_norm(A, B), torch.linalg.matrix_norm(P))


@given(q=st.integers(1, 6), d_in=st.integers(1, 9), d_out=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
@settings(max_examples=30)
def test_lowrank_svd_matches_dense_svd(q, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(3, d_out, q, generator=g, dtype=torch.float64)
    R = torch.randn(3, q, d_in, generator=g, dtype=torch.float64)
    U, S, Vh = lowrank_svd(L, R)
    dense = torch.linalg.svdvals(L @ R)
    m = min(S.shape[-1], dense.shape[-1])
    assert_close(S[..., :m], dense[..., :m], atol=1e-9, rtol=1e-9)
    assert_close((U * S.unsqueeze(-2)) @ Vh, L @ R, atol=1e-9, rtol=1e-9)


def test_refactor_is_eckart_young(gen):
    L = torch.randn(4, 12, 6, generator=gen, dtype=torch.float64)
    R = torch.randn(4, 6, 9, generator=gen, dtype=torch.float64)
    A, B = refactor(L, R, 2)
    assert A.shape == (4, 2, 9) and B.shape == (4, 12, 2)
    s = torch.linalg.svdvals(L @ R)
    err = torch.linalg.matrix_norm(B @ A - L @ R)
    assert_close(err, s[:, 2:].pow(2).sum(-1).sqrt())
    # balanced: ||A||_F = ||B||_F
    assert_close(torch.linalg.matrix_norm(A), torch.linalg.matrix_norm(B))
    # full rank keeps the product exactly
    A6, B6 = refactor(L, R, 6)
    assert_close(B6 @ A6, L @ R)


def test_zero_product_refactors_to_trainable_factors():
    A = torch.randn(3, 2, 5)
    B = torch.zeros(3, 4, 2)
    A2, B2 = refactor(B, A, 2)
    assert torch.all(B2 == 0)
    assert_close(torch.linalg.vector_norm(A2, dim=-1), torch.full((3, 2), 1 / math.sqrt(3)))
    # rank-deficient: a rank-1 product in rank-2 factors keeps one zero B column, a live A row
    U, S, Vh = lowrank_svd(torch.randn(1, 4, 1), torch.randn(1, 1, 5))
    A1, B1 = split_factors(U, S, Vh, 2)
    assert torch.all(B1[..., 1] == 0) and torch.linalg.vector_norm(A1[0, 1]) > 0.5


def test_slot_rank_oracle(gen):
    """The tests' rank oracle (tests/helpers.py) counts exactly the nonzero singular values."""
    A = torch.randn(2, 3, 4, 8, generator=gen)
    B = torch.randn(2, 3, 6, 4, generator=gen)
    B[0, 1, :, 2:] = 0  # rank 2
    B[1, 2] = 0  # rank 0
    assert slot_rank(A, B).tolist() == [[4, 2, 4], [4, 4, 0]]


def test_bank_module_forward_and_svd(gen):
    bank = AdapterBank(BankConfig(n_slots=3, rank=2, d_in=5, d_out=4, lora_alpha=4.0, batch_shape=(2,)),
                       init="random", generator=gen)
    assert bank.scale == 2.0
    x = torch.randn(2, 6, 5, generator=gen)
    gates = torch.rand(2, 6, 3, generator=gen)
    assert_close(bank(x, gates), loop_mixture(x, bank.A, bank.B, gates, 2.0), atol=1e-5, rtol=1e-5)
    U, S, Vh = bank.svd()
    assert_close((U * S.unsqueeze(-2)) @ Vh, bank.products().detach(), atol=1e-5, rtol=1e-5)
    loss = bank(x, gates).square().sum()
    loss.backward()
    assert bank.A.grad is not None and bank.B.grad is not None


def test_save_load_roundtrip(tmp_path, gen):
    bank = AdapterBank(BankConfig(3, 2, 5, 4, lora_alpha=3.0, batch_shape=(2,)), init="random", generator=gen)
    path = bank.save(tmp_path / "bank.pt")
    back = AdapterBank.load(path)
    assert back.cfg == bank.cfg
    assert torch.equal(back.A, bank.A) and torch.equal(back.B, bank.B)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BadInput, match="junk.pt"):
        AdapterBank.load(tmp_path / "junk.pt")


def test_config_validation_names_flags():
    with pytest.raises(BadInput, match="--rank"):
        BankConfig(rank=0)
    with pytest.raises(BadInput, match="--lora-alpha"):
        BankConfig(lora_alpha=-1.0)
    assert BankConfig(rank=4).lora_alpha == 4.0
