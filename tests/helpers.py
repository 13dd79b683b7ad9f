"""Oracles shared by several test files: measurements that check production code, used by nothing else."""

import torch
from torch import Tensor

from sandbox.adapters import lowrank_svd


def slot_rank(A: Tensor, B: Tensor, rtol: float = 1e-5) -> Tensor:
    """Numerical rank of each slot's product ``B_k A_k``: ``(*b, K)`` long.

    Counts singular values above ``rtol * max(S)`` (and above a tiny absolute floor)."""
    _, S, _ = lowrank_svd(B, A)
    top = S[..., :1]
    return (S > (rtol * top).clamp_min(1e-30)).sum(-1)


def gram_terms_einsum(A: Tensor, B: Tensor, U: Tensor, V: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The quadratic loss's ``G, c, e`` written as plain einsums, differentiated by autograd: the
    reference for `sandbox.analytic.gram_terms` and its hand-written backward."""
    gb = torch.einsum("...kor,...lop->...klrp", B, B)               # (*b, K, K, r, r)
    ga = torch.einsum("...kri,...lpi->...klrp", A, A)
    G = scale ** 2 * (gb * ga).sum((-1, -2))
    btu = torch.einsum("...kdi,...mdj->...mkij", B, U)              # (*b, M, K, r, r*)
    vat = torch.einsum("...mjd,...kid->...mkij", V, A)
    c = scale * (btu * vat).sum((-1, -2))
    e = ((U @ V) ** 2).sum((-1, -2))
    return G, c, e
