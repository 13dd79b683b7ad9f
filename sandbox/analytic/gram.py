"""The closed-form loss in Gram form (see `sandbox.analytic`): ``G``, ``c``, ``e`` of the banks with a
hand-written backward (`_GramTerms`), the quadratic loss of routed gates, its leave-one-out form, and
the same terms on a finite batch of inputs."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sandbox.errors import check
from sandbox.router import RouterConfig, router_gates
from sandbox.tasks import Task, flat_teachers


def _per_row(x: float | Tensor, like: Tensor) -> float | Tensor:
    """A per-row value (a float, or a tensor ``(S,)`` over the leading batch dim of stacked grid
    points) shaped to broadcast against ``like (S, ...)``."""
    if not isinstance(x, Tensor):
        return x
    return x.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class _GramTerms(torch.autograd.Function):
    """Unscaled ``G (B, K, K)`` and ``c (B, M, K)`` of flattened banks, with a hand-written backward.

    Inputs (batch dims flattened to one, B rows): ``Af (B, K r, d)`` (slot k's A in rows
    ``k r .. k r + r``), ``Btf (B, K r, d)`` (likewise B_k^T), ``Uf (B, d, M r*)`` (the U_m side by
    side) and ``Vf (B, M r*, d)`` (the V_m stacked). With ``GA = Af Af^T`` and ``GB = Btf Btf^T``
    (``K r x K r``), ``G_kl`` is the sum of the ``(k, l)`` block of ``GA * GB``; with
    ``X = Btf Uf`` (blocks ``B_k^T U_m``) and ``Y = Af Vf^T`` (blocks ``A_k V_m^T``), ``c_mk`` is the
    sum of the ``(k, m)`` block of ``X * Y``. Four batched matmuls forward and four backward on
    contiguous operands; block sums and spreads are matmuls with `_block_sums` (the big operand on
    the left, so matmul folds its batch without a copy). Autograd through the equivalent einsums
    paid six ``K r x d x K r`` matmuls, permuted copies of the factors and slow strided reductions
    per step, and handed Adam strided gradients (BENCHMARKS.md section 5c).

    Backward, from ``dG`` and ``dc`` (``GA``, ``GB`` symmetric): ``dAf = ((dG + dG^T) (x) GB) Af +
    (dc^T (x) X) Vf`` and ``dBtf = ((dG + dG^T) (x) GA) Btf + (dc^T (x) Y) Uf^T``, where ``(x)``
    spreads a ``K x K`` (or ``K x M``) matrix over the blocks and multiplies element-wise. Checked
    against autograd through the einsum form and against finite differences (`tests/test_analytic.py`).
    """

    @staticmethod
    def forward(ctx, Af: Tensor, Btf: Tensor, Uf: Tensor, Vf: Tensor, K: int, M: int):
        n, Kr, d = Af.shape
        r, rs = Kr // K, Uf.shape[-1] // M
        pk, pm = _block_sums(K, r, Af), _block_sums(M, rs, Af)          # (K, Kr), (M, M r*)
        GA = Af @ Af.transpose(-1, -2)                                   # (B, Kr, Kr)
        GB = Btf @ Btf.transpose(-1, -2)                                 # (B, Kr, Kr)
        G = pk @ ((GA * GB) @ pk.T)                                      # (B, K, K); the big operand left
        X = Btf @ Uf                                                     # (B, Kr, M r*)  blocks B_k^T U_m
        Y = Af @ Vf.transpose(-1, -2)                                    # (B, Kr, M r*)  blocks A_k V_m^T
        c = (pk @ ((X * Y) @ pm.T)).transpose(-1, -2)                    # (B, M, K)
        ctx.save_for_backward(Af, Btf, Uf, Vf, GA, GB, X, Y)
        ctx.blocks = (pk, pm)
        return G, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dG: Tensor, dc: Tensor):
        Af, Btf, Uf, Vf, GA, GB, X, Y = ctx.saved_tensors
        pk, pm = ctx.blocks
        dA = dBt = None
        if dG is not None:
            w = (pk.T @ (dG + dG.transpose(-1, -2))) @ pk                 # (B, Kr, Kr) spread over blocks
            dA = (GB * w) @ Af
            dBt = (GA * w) @ Btf
        if dc is not None:
            wc = (pk.T @ dc.transpose(-1, -2)) @ pm                       # (B, Kr, M r*)
            dY = X * wc
            dX = Y * wc
            dA = dY @ Vf if dA is None else dA.baddbmm_(dY, Vf)          # in place: no copy of dA
            dBt = dX @ Uf.transpose(-1, -2) if dBt is None else dBt.baddbmm_(dX, Uf.transpose(-1, -2))
        return dA, dBt, None, None, None, None


def _block_sums(K: int, r: int, like: Tensor) -> Tensor:
    """``(K, K r)`` zeros and ones: row k sums the r columns of block k (a reduction over a strided
    small dim as a matmul: several times faster than ``sum`` over such dims on the CPU)."""
    return torch.eye(K, dtype=like.dtype, device=like.device).repeat_interleave(r, dim=1)


def gram_terms(A: Tensor, B: Tensor, U: Tensor, V: Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``G (*b, K, K)``, ``c (*b, M, K)``, ``e (*b, M)`` of the quadratic loss (module docstring).

    A ``(*b, K, r, d)``, B ``(*b, K, d, r)``, U ``(*b, M, d, r*)``, V ``(*b, M, r*, d)`` (batch
    dims broadcast); `scale` a float or a per-row tensor ``(S,)`` (stacked grid points). G and c
    come from `_GramTerms` (differentiable in A and B; U and V are constants). A B stored
    transposed, ``B = Bt.transpose(-1, -2)`` with ``Bt (*b, K, r, d)`` contiguous, is read without
    a copy (the solver keeps it so).
    """
    return _gram(A, B, *flat_teachers(U, V), scale)


def task_terms(A: Tensor, B: Tensor, task: Task, scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`gram_terms` of `task`'s teachers, read from `Task.flat_teachers` (flattened once per task)
    when the task is already in A's dtype and device (the solver's copy, `_task_to`)."""
    if task.U.dtype != A.dtype or task.U.device != A.device:
        return gram_terms(A, B, task.U.to(A), task.V.to(A), scale)
    return _gram(A, B, *task.flat_teachers, scale)


def _gram(A: Tensor, B: Tensor, Uf: Tensor, Vf: Tensor, e: Tensor, scale: float | Tensor
          ) -> tuple[Tensor, Tensor, Tensor]:
    check(not (Uf.requires_grad or Vf.requires_grad), "teacher", "requires_grad", "constant U and V")
    K, r, d = A.shape[-3:]
    M = e.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-3], B.shape[:-3], Uf.shape[:-2], Vf.shape[:-2])
    Af = A.expand(*batch, K, r, d).reshape(-1, K * r, d)
    Btf = B.transpose(-1, -2).expand(*batch, K, r, d).reshape(-1, K * r, d)
    Uf = Uf.expand(*batch, *Uf.shape[-2:]).reshape(-1, *Uf.shape[-2:])
    Vf = Vf.expand(*batch, *Vf.shape[-2:]).reshape(-1, *Vf.shape[-2:])
    G, c = _GramTerms.apply(Af, Btf, Uf, Vf, K, M)
    G, c = G.view(*batch, K, K), c.view(*batch, M, K)
    G = _per_row(scale, G) ** 2 * G
    c = _per_row(scale, c) * c
    return G, c, e


def quadratic_loss(gates: Tensor, G: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """``g^T G g - 2 g^T c_m + e_m`` per draw: gates ``(*b, M, N, K)`` -> ``(*b, M, N)``.

    G ``(*b', K, K)``, c ``(*b', M, K)``, e ``(*b', M)`` broadcast against ``*b`` (e.g. a bank
    ``(S, 1)`` against a population of routers ``(S, P)``).
    """
    Gg = gates @ G.unsqueeze(-3)                                       # (*b, M, N, K)
    quad = (Gg * gates).sum(-1)                                        # (*b, M, N)
    lin = (gates * c.unsqueeze(-2)).sum(-1)                            # (*b, M, N)
    return quad - 2 * lin + e.unsqueeze(-1)


def leave_one_out(gates: Tensor, G: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """Loss with slot k's gate set to 0, for every k: ``(*b, M, N, K)`` -> ``(*b, M, N, K)``.

    With ``g' = g - g_k e_k``: ``quad' = quad - 2 g_k (G g)_k + g_k^2 G_kk``, ``lin' = lin - g_k c_k``.
    """
    Gg = gates @ G.unsqueeze(-3)                                       # (*b, M, N, K)
    full = quadratic_loss(gates, G, c, e).unsqueeze(-1)                # (*b, M, N, 1)
    Gkk = torch.diagonal(G, dim1=-2, dim2=-1).unsqueeze(-2).unsqueeze(-2)   # (*b, 1, 1, K)
    return full - 2 * gates * Gg + gates ** 2 * Gkk + 2 * gates * c.unsqueeze(-2)


def domain_losses(rcfg: RouterConfig, params: dict[str, Tensor], A: Tensor, B: Tensor, task: Task,
                  features: Tensor, step: int, scale: float | Tensor, loss_floor: float | Tensor = 0.0) -> Tensor:
    """Expected loss per domain ``(S, *p, M)``: mean over the feature draws of
    ``||W(h) - D_m||^2 + loss_floor`` (the irreducible teacher noise ``sigma^2 d``).

    params with leading ``(S, *p)`` (``*p`` = a population dim or nothing), bank ``(S, K, ...)``,
    features ``(S, M, N, F)``.
    """
    S, M, N, F = features.shape
    extra = params["bias"].ndim - 2                                    # 1 with a population dim
    G, c, e = task_terms(A, B, task, scale)
    for _ in range(extra):
        G, c, e = G.unsqueeze(1), c.unsqueeze(1), e.unsqueeze(1)       # (S, 1, ...)
    feats = features.reshape(S, *([1] * extra), M * N, F)              # (S, [1,] M*N, F)
    gates = router_gates(rcfg, params, feats, step)                    # (S, [P,] M*N, K)
    gates = gates.reshape(*gates.shape[:-2], M, N, gates.shape[-1])    # (S, [P,] M, N, K)
    out = quadratic_loss(gates, G, c, e).mean(-1)                     # (S, [P,] M)
    return out + _per_row(loss_floor, out)


def batch_terms(A: Tensor, B: Tensor, task: Task, scale: float | Tensor, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The quadratic loss's terms on a finite batch: ``(1/n) ||(W - D_m) X_m||_F^2 = g^T G_m g -
    2 g^T c_m + e_m`` with ``X (S, M, d, n)`` the inputs of each domain. Per domain, since each has
    its own inputs: ``G (S, M, K, K)``, ``c (S, M, K)``, ``e (S, M)``. With ``E[X X^T] = n I`` the
    expectation is `gram_terms` (tested by Monte Carlo).

    Block form, as in `_GramTerms`: with ``P = Af X / sqrt(n)`` (rows ``A_k X``) and ``GB = Btf Btf^T``,
    ``G_m`` is the block sum of ``GB * P P^T``; ``c_mk`` the block sum of ``(B_k^T U_m) * (P_k Q_m^T)``
    with ``Q = V_m X / sqrt(n)``; ``e_m = ||U_m Q_m||^2``. Batched matmuls only."""
    S, K, r, d = A.shape
    n = X.shape[-1]
    Xs = X / math.sqrt(n)                                                    # (S, M, d, n)
    Af = A.reshape(S, 1, K * r, d)
    Btf = B.transpose(-1, -2).reshape(S, 1, K * r, d)
    U, V = task.U.to(A), task.V.to(A)                                        # (S, M, d, r*), (S, M, r*, d)
    pk = _block_sums(K, r, A)                                                # (K, K r)
    P = Af @ Xs                                                              # (S, M, K r, n)
    GB = Btf @ Btf.transpose(-1, -2)                                         # (S, 1, K r, K r)
    G = pk @ ((GB * (P @ P.transpose(-1, -2))) @ pk.T)                       # (S, M, K, K)
    Q = V @ Xs                                                               # (S, M, r*, n)
    c = ((Btf @ U) * (P @ Q.transpose(-1, -2))).sum(-1) @ pk.T               # (S, M, K)
    e = (U @ Q).pow(2).sum((-1, -2))                                         # (S, M)
    if isinstance(scale, Tensor):
        sc = scale.to(A.dtype).view(S, 1, 1)
        return sc[..., None] ** 2 * G, sc * c, e
    return scale ** 2 * G, scale * c, e


def batch_domain_losses(rcfg: RouterConfig, params: dict[str, Tensor], A: Tensor, B: Tensor, task: Task,
                        features: Tensor, step: int, scale: float | Tensor, X: Tensor) -> Tensor:
    """`domain_losses` on the finite batch `X` ``(S, M, d, n)`` instead of the expectation: ``(S, *p, M)``."""
    S, M, N, F = features.shape
    extra = params["bias"].ndim - 2
    G, c, e = batch_terms(A, B, task, scale, X)
    for _ in range(extra):
        G, c, e = G.unsqueeze(1), c.unsqueeze(1), e.unsqueeze(1)
    feats = features.reshape(S, *([1] * extra), M * N, F)
    gates = router_gates(rcfg, params, feats, step)
    gates = gates.reshape(*gates.shape[:-2], M, N, gates.shape[-1])           # (S, [P,] M, N, K)
    quad = torch.einsum("...mnk,...mkl,...mnl->...mn", gates, G, gates)
    lin = torch.einsum("...mnk,...mk->...mn", gates, c)
    return (quad - 2 * lin + e.unsqueeze(-1)).mean(-1)                      # (S, [P,] M)
