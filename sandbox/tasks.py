"""Synthetic task generator: M domains with low-rank true updates, routing contexts and a hidden
slot assignment. Drives the analytic sandbox and the substrate's synthetic domain languages.

Domain structure (kept separate from any readout, so other systems can reuse it):

* true update of domain m: ``D_m = U_m V_m`` with ``U_m (d, r*)``, ``V_m (r*, d)``, rank r*,
  ``||D_m||_F = 1``, factored in balanced SVD form (``U = P sqrt(S)``, ``V = sqrt(S) Q^T``).
* ``overlap`` o in [0, 1]: every domain shares one component. The mix is done on the factors,
  ``U_m ~ o^(1/4) U_shared + (1 - sqrt(o))^(1/2) U_own`` (same for V), so D_m keeps rank r* and
  the cosine between two domains' updates is about ``o`` (the cross terms are nearly orthogonal in
  high d; measured in tests/test_tasks.py).
* routing context of domain m: a unit vector ``c_m`` in R^F; the router sees ``c_m + noise``.
* hidden assignment: M distinct slots out of K, one per domain, random per seed.

Pre-alignment a in [0, 1] (`initial_adapters`): the assigned slot k = assignment[m] starts from
``A_k = sqrt(1 - a^2) A_rand + a V_m / sqrt(s)`` and ``B_k = sqrt(1 - a^2) B_rand + a U_m / sqrt(s)``
(true factors zero-padded from r* to r), so ``s B_k A_k = D_m`` exactly at a = 1 and is an
independent random rank-r matrix of the same expected norm at a = 0. The other K - M slots are
random. The random draws do not depend on a (common random numbers along the alignment axis).
Measured cosine between ``s B_k A_k`` and ``D_m`` (mean over 2,000 seeds, defaults d=32, r=4,
r*=2): see the README table (measured in tests/test_tasks.py).

Every draw comes from ``torch.Generator`` objects seeded from the user seed, one per seed, so a
seed's task never depends on which other seeds share the batch (a resumed sweep recomputes the
same numbers). Only the cheap draws loop over seeds; everything else is batched over ``S``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch

from sandbox.errors import check, require
from sandbox.streams import Purpose, generator


@dataclass(frozen=True)
class TaskSpec:
    """The synthetic task. Field names are CLI flags (``context_noise`` is ``--context-noise``)."""

    domains: int = 4
    """M: number of domains (tasks), each with its own true update."""
    slots: int = 8
    """K: adapter slots in the bank (K >= M; K - M slots are spare)."""
    dim: int = 32
    """d: input and output dimension of the adapted linear map."""
    rank: int = 4
    """r: rank of each adapter."""
    true_rank: int = 2
    """r*: rank of each domain's true update (r* <= r)."""
    alignment: float = 0.0
    """a in [0, 1]: initial assigned adapters from random (0) to the true factors (1)."""
    context_dim: int = 16
    """F: dimension of routing features (domain contexts)."""
    context_noise: float = 0.0
    """sigma: routing features are ``c_m + sigma * N(0, I_F)``."""
    overlap: float = 0.0
    """o in [0, 1]: share of a common component in every domain's update (cosine between domains)."""

    def __post_init__(self) -> None:
        require(isinstance(self.domains, int) and 1 <= self.domains <= 256, "domains", self.domains, "an integer in [1, 256]")
        require(isinstance(self.slots, int) and self.domains <= self.slots <= 1024, "slots", self.slots,
                f"an integer in [domains={self.domains}, 1024]")
        require(isinstance(self.dim, int) and 2 <= self.dim <= 4096, "dim", self.dim, "an integer in [2, 4096]")
        require(isinstance(self.rank, int) and 1 <= self.rank <= self.dim, "rank", self.rank, f"an integer in [1, dim={self.dim}]")
        require(isinstance(self.true_rank, int) and 1 <= self.true_rank <= self.rank, "true_rank", self.true_rank,
                f"an integer in [1, rank={self.rank}]")
        require(_finite(self.alignment) and 0.0 <= self.alignment <= 1.0, "alignment", self.alignment, "a number in [0, 1]")
        require(isinstance(self.context_dim, int) and 1 <= self.context_dim <= 4096, "context_dim", self.context_dim,
                "an integer in [1, 4096]")
        require(_finite(self.context_noise) and 0.0 <= self.context_noise <= 10.0, "context_noise", self.context_noise,
                "a number in [0, 10]")
        require(_finite(self.overlap) and 0.0 <= self.overlap <= 1.0, "overlap", self.overlap, "a number in [0, 1]")


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and float(x) == float(x) and abs(float(x)) != float("inf")


@dataclass(frozen=True)
class Task:
    """A batch of S tasks (one per seed); tensors have the seed dim first.

    Attributes:
        U: ``(S, M, d, r*)`` left true factors.   V: ``(S, M, r*, d)`` right true factors.
        contexts: ``(S, M, F)`` unit routing contexts.   assignment: ``(S, M)`` long, distinct slots.
        seeds: the user seeds, in batch order.
    """

    U: torch.Tensor
    V: torch.Tensor
    contexts: torch.Tensor
    assignment: torch.Tensor
    seeds: tuple[int, ...]

    @functools.cached_property
    def flat_teachers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`flat_teachers` of this task's U, V, computed once per task."""
        return flat_teachers(self.U, self.V)


def flat_teachers(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teachers as the Gram form reads them: U ``(*b, M, d, r*)`` side by side ``(*b, d, M r*)``,
    V ``(*b, M, r*, d)`` stacked ``(*b, M r*, d)`` and ``||U_m V_m||_F^2 (*b, M)`` (from r* x r* Grams)."""
    M, d, rs = U.shape[-3:]
    energy = ((U.transpose(-1, -2) @ U) * (V @ V.transpose(-1, -2))).sum((-1, -2))
    return U.movedim(-3, -2).reshape(*U.shape[:-3], d, M * rs), V.reshape(*V.shape[:-3], M * rs, d), energy


def _balanced(U: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale ``U V`` to unit Frobenius norm and refactor it as ``P sqrt(S), sqrt(S) Q^T``.

    U ``(*b, d, r)``, V ``(*b, r, d)``; uses QR of the thin factors and an r x r SVD (no d x d).
    """
    Qu, Ru = torch.linalg.qr(U)                      # (*b, d, r), (*b, r, r)
    Qv, Rv = torch.linalg.qr(V.transpose(-1, -2))    # (*b, d, r), (*b, r, r)
    P, s, Wh = torch.linalg.svd(Ru @ Rv.transpose(-1, -2))  # UV = Qu (Ru Rv^T) Qv^T
    s = s / s.norm(dim=-1, keepdim=True)             # unit Frobenius norm
    root = s.sqrt()
    U_new = (Qu @ P) * root.unsqueeze(-2)                                     # (*b, d, r)
    V_new = root.unsqueeze(-1) * (Wh @ Qv.transpose(-1, -2))                  # (*b, r, d)
    return U_new, V_new


def make_task(spec: TaskSpec, seeds: Sequence[int]) -> Task:
    """Draw one task per seed; see the module docstring for the construction.

    Returns a `Task` with U ``(S, M, d, r*)``, V ``(S, M, r*, d)``, contexts ``(S, M, F)``,
    assignment ``(S, M)``. The task does not depend on ``spec.alignment``.
    """
    seeds = tuple(int(s) for s in seeds)
    require(len(seeds) >= 1, "seeds", seeds, "at least one seed")
    M, K, d, rs, F = spec.domains, spec.slots, spec.dim, spec.true_rank, spec.context_dim
    Us, Vs, Cs, As = [], [], [], []
    for seed in seeds:  # draws only; each seed has its own stream
        g = generator(Purpose.TASK, seed)
        Us.append(torch.randn(M + 1, d, rs, generator=g))   # index M is the shared component
        Vs.append(torch.randn(M + 1, rs, d, generator=g))
        Cs.append(torch.randn(M, F, generator=g))
        As.append(torch.randperm(K, generator=g)[:M])
    U0, V0 = torch.stack(Us), torch.stack(Vs)              # (S, M+1, d, r*), (S, M+1, r*, d)
    w = spec.overlap ** 0.5                                  # cosine between domains ~ w^2 = overlap
    U = w ** 0.5 * U0[:, M:] + (1 - w) ** 0.5 * U0[:, :M]  # (S, M, d, r*)
    V = w ** 0.5 * V0[:, M:] + (1 - w) ** 0.5 * V0[:, :M]  # (S, M, r*, d)
    U, V = _balanced(U, V)
    C = torch.stack(Cs)
    C = C / C.norm(dim=-1, keepdim=True)
    return Task(U=U, V=V, contexts=C, assignment=torch.stack(As), seeds=seeds)


def random_factors(spec: TaskSpec, seeds: Sequence[int], scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bank factors ``A (S, K, r, d)``, ``B (S, K, d, r)`` with ``E ||s B_k A_k||_F^2 = 1``.

    Entries are N(0, sigma^2) with ``sigma^2 = 1 / (d s sqrt(r))``: then
    ``E ||B A||_F^2 = d^2 r sigma^4`` and ``s^2 d^2 r sigma^4 = 1``, the norm of a true update.
    """
    K, r, d = spec.slots, spec.rank, spec.dim
    sigma = (1.0 / (d * scale * r ** 0.5)) ** 0.5
    As, Bs = [], []
    for seed in seeds:
        g = generator(Purpose.ADAPTERS, seed)
        As.append(torch.randn(K, r, d, generator=g) * sigma)
        Bs.append(torch.randn(K, d, r, generator=g) * sigma)
    return torch.stack(As), torch.stack(Bs)


def initial_adapters(task: Task, spec: TaskSpec, seeds: Sequence[int] | None = None,
                     scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial bank ``A (S, K, r, d)``, ``B (S, K, d, r)`` pre-aligned by ``spec.alignment``.

    For domain m and its slot k = assignment[m]:
    ``A_k = sqrt(1-a^2) A_rand,k + a [V_m; 0] / sqrt(s)``, ``B_k = sqrt(1-a^2) B_rand,k + a [U_m, 0] / sqrt(s)``,
    so ``s B_k A_k = D_m`` at a = 1. `scale` is the bank's ``s = alpha / r``.
    """
    seeds = task.seeds if seeds is None else tuple(int(s) for s in seeds)
    require(tuple(seeds) == task.seeds, "seeds", seeds, f"the task's seeds {task.seeds}")
    check(_finite(scale) and scale > 0, "scale", scale, "a positive number")
    a = float(spec.alignment)
    A, B = random_factors(spec, seeds, scale)               # (S, K, r, d), (S, K, d, r)
    S, M = task.assignment.shape
    r, rs = spec.rank, spec.true_rank
    Vt = torch.zeros(S, M, r, spec.dim)
    Vt[:, :, :rs] = task.V / scale ** 0.5                     # (S, M, r, d), zero-padded rows
    Ut = torch.zeros(S, M, spec.dim, r)
    Ut[:, :, :, :rs] = task.U / scale ** 0.5                  # (S, M, d, r), zero-padded columns
    idx = task.assignment                                     # (S, M)
    keep = (1.0 - a * a) ** 0.5
    A_sel = A.gather(1, idx[:, :, None, None].expand(-1, -1, r, spec.dim))
    B_sel = B.gather(1, idx[:, :, None, None].expand(-1, -1, spec.dim, r))
    A = A.scatter(1, idx[:, :, None, None].expand(-1, -1, r, spec.dim), keep * A_sel + a * Vt)
    B = B.scatter(1, idx[:, :, None, None].expand(-1, -1, spec.dim, r), keep * B_sel + a * Ut)
    return A, B


def noisy_contexts(task: Task, noise: float, draws: int, salt: int = 0) -> torch.Tensor:
    """Routing features ``c_m + noise * N(0, I_F)``: ``(S, M, draws, F)``.

    The noise comes from each seed's own stream (``salt`` selects a fresh set, e.g. per step), so
    both arms of a paired comparison see the same draws (common random numbers).
    """
    require(isinstance(draws, int) and draws >= 1, "draws", draws, "an integer >= 1")
    S, M, F = task.contexts.shape
    eps = []
    for seed in task.seeds:
        g = generator(Purpose.CONTEXT_NOISE, seed, int(salt))
        eps.append(torch.randn(M, draws, F, generator=g))
    return task.contexts[:, :, None, :] + float(noise) * torch.stack(eps)   # (S, M, N, F)
