"""Evolutionary search on the routing channel: a population of router parameter vectors.

One generation, for every seed at once (tensors ``(S, P, D)``, no loop over seeds or individuals
in the arithmetic):

1. population: member 0 is the current vector ``x`` (elitism), members ``p >= 1`` are
   ``x + mutation_scale * sigma * eps_p`` with ``eps_p ~ N(0, I_D)`` and ``sigma (S, D)`` a
   per-parameter scale (`mutation_scales`);
2. the caller evaluates all ``(S, P)`` members in one batched call (the search objective);
3. selection: the member with the lowest objective (ties go to the lowest index, so the current
   vector wins ties); because member 0 is the current vector, the search objective never gets
   worse (non-finite objectives are never selected over a finite one).

The noise draws come from one generator per seed, so a seed's search does not depend on which
other seeds share the batch (a resumed sweep reproduces an uninterrupted one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sandbox.errors import require


@dataclass(frozen=True)
class EvolutionConfig:
    """Evolutionary routing search. Field names are CLI flags."""

    population: int = 16
    """P: individuals per generation, including the current parameters (member 0)."""
    mutation_scale: float = 0.5
    """Mutation step, in units of each parameter tensor's own scale (see `mutation_scales`)."""
    interval: int = 25
    """Gradient steps between two generations."""

    def __post_init__(self) -> None:
        require(isinstance(self.population, int) and 2 <= self.population <= 4096, "population", self.population,
                "an integer in [2, 4096]")
        require(isinstance(self.mutation_scale, (int, float)) and math.isfinite(self.mutation_scale)
                and 0 < self.mutation_scale <= 100, "mutation_scale", self.mutation_scale, "a number in (0, 100]")
        require(isinstance(self.interval, int) and self.interval >= 1, "interval", self.interval, "an integer >= 1")


def mutation_scales(params: dict[str, Tensor], batch_ndim: int = 1, floor: float = 1.0) -> dict[str, Tensor]:
    """Per-parameter mutation scale: each tensor's RMS over its own entries, at least `floor`.

    With unit-norm routing features h, noise of size sigma on every entry of ``W (F, K)`` moves
    each logit ``h W_k`` by N(0, sigma^2), and noise on ``bias`` moves it directly; so the default
    floor 1 makes ``mutation_scale`` the logit change of a mutation while the router is small,
    and a large tensor mutates in proportion to itself.
    Returns tensors shaped like `params` (the scale broadcast over each tensor's entries).
    """
    out = {}
    for name, p in params.items():
        dims = tuple(range(batch_ndim, p.ndim))
        rms = p.detach().pow(2).mean(dim=dims, keepdim=True).sqrt()          # (*b, 1, ...)
        out[name] = rms.clamp_min(floor).expand_as(p)
    return out


def propose(x: Tensor, sigma: Tensor, cfg: EvolutionConfig, generators: Sequence[torch.Generator]) -> Tensor:
    """Population ``(S, P, D)`` around ``x (S, D)``: member 0 is ``x``, the rest mutated.

    ``sigma (S, D)`` is the per-parameter scale; one generator per seed draws ``(P - 1, D)``.
    """
    S, D = x.shape
    require(len(generators) == S, "generators", len(generators), f"one per seed ({S})")
    eps = torch.stack([torch.randn(cfg.population - 1, D, generator=g) for g in generators])   # (S, P-1, D)
    eps = eps.to(dtype=x.dtype, device=x.device)
    children = x[:, None, :] + cfg.mutation_scale * sigma[:, None, :] * eps                    # (S, P-1, D)
    return torch.cat([x[:, None, :], children], dim=1)                                        # (S, P, D)


def select(population: Tensor, objective: Tensor) -> tuple[Tensor, Tensor]:
    """Best member per seed: ``population (S, P, D)``, ``objective (S, P)`` (lower is better).

    Non-finite objectives count as +inf; ``argmin`` returns the first minimum, so the current
    vector (member 0) wins ties. Returns ``(best (S, D), index (S,))``.
    """
    obj = torch.where(torch.isfinite(objective), objective, torch.full_like(objective, float("inf")))
    idx = obj.argmin(dim=1)                                                                   # (S,)
    best = population.gather(1, idx[:, None, None].expand(-1, 1, population.shape[-1]))[:, 0]  # (S, D)
    return best, idx
