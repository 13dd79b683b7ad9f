"""Oracles shared by several test files: measurements that check production code, used by nothing else."""

from torch import Tensor

from sandbox.adapters import lowrank_svd


def slot_rank(A: Tensor, B: Tensor, rtol: float = 1e-5) -> Tensor:
    """Numerical rank of each slot's product ``B_k A_k``: ``(*b, K)`` long.

    Counts singular values above ``rtol * max(S)`` (and above a tiny absolute floor)."""
    _, S, _ = lowrank_svd(B, A)
    top = S[..., :1]
    return (S > (rtol * top).clamp_min(1e-30)).sum(-1)
