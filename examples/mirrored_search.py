"""A worked routing-search plugin: elitist random search with mirrored (antithetic) steps.

Each generation proposes ``x +/- sigma u eps_j`` (pairs of opposite steps, ``sigma`` =
``--mutation-scale`` in logit units, ``u`` the package's per-parameter unit) and keeps the best
member if it beats the parent; sigma is never adapted. Mirrored sampling halves the variance of
a step's effect on a locally linear objective (Brockhoff et al. 2010).

    sandbox sweep --evo examples.mirrored_search:MirroredSearch
    sandbox sweep --system substrate --evo examples.mirrored_search:MirroredSearch
"""

from __future__ import annotations

import torch
from torch import Tensor


class MirroredSearch:
    """The ask/tell protocol of `sandbox.evolution.RoutingSearch`; the state is the generators."""

    def init(self, cfg, S: int, D: int, generators: list, dtype) -> dict:
        return {"D": D}

    def ask(self, state: dict, x: Tensor, unit: Tensor, cfg, generators: list) -> Tensor:
        """``(S, P, D)``: member 0 the parent ``x (S, D)``, then mirrored pairs (an odd P - 1 ends
        with an unpaired step)."""
        S, D = x.shape
        lam = cfg.population - 1
        half = (lam + 1) // 2
        eps = torch.stack([torch.randn(half, D, generator=g) for g in generators]).to(x)   # (S, half, D)
        steps = torch.cat([eps, -eps], dim=1)[:, :lam]                                     # (S, lam, D)
        children = x[:, None, :] + cfg.mutation_scale * unit[:, None, :] * steps
        return torch.cat([x[:, None, :], children], dim=1)

    def tell(self, state: dict, population: Tensor, objective: Tensor, cfg, active: Tensor):
        """The best member per seed (the parent wins ties; a non-finite loss never wins)."""
        obj = torch.where(torch.isfinite(objective), objective, torch.full_like(objective, float("inf")))
        idx = obj.argmin(dim=1)                                                             # (S,)
        new = population[torch.arange(population.shape[0]), idx]                           # (S, D)
        return new, idx != 0
