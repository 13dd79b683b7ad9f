"""Slot identities (`Population`), leave-one-out fitness, the order of death and the selection of
a fit parent (tournament or roulette)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sandbox.errors import require
from sandbox.lifecycle.config import AGGS, SCOPES, LifecycleConfig
from sandbox.lifecycle.draws import Generators, _multinomial


@dataclass(frozen=True, eq=False)
class Population:
    """Slot identities for a batch of populations of K slots.

    Attributes:
        ids: ``(*b, K)`` long, unique within a batch element, never reused.
        ages: ``(*b, K)`` long, steps since birth as of ``step``.
        parents: ``(*b, K)`` long, the parent's id, -1 for founders and fresh births.
        next_id: ``(*b,)`` long, the next id to hand out.
        step: the step the ages refer to.
    """

    ids: Tensor
    ages: Tensor
    parents: Tensor
    next_id: Tensor
    step: int = 0

    @classmethod
    def founders(cls, batch_shape: tuple[int, ...], n_slots: int, device=None) -> "Population":
        """Slots ``0..K-1`` with age 0 and no parents at step 0."""
        ids = torch.arange(n_slots, device=device).expand(*batch_shape, n_slots).clone()  # (*b, K)
        return cls(ids, torch.zeros_like(ids), torch.full_like(ids, -1),
                   torch.full(tuple(batch_shape), n_slots, dtype=torch.long, device=device), 0)

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.ids.shape[:-1])

    @property
    def n_slots(self) -> int:
        return self.ids.shape[-1]

    def at(self, step: int) -> "Population":
        """The same population with ages advanced to ``step``."""
        return replace(self, ages=self.ages + (step - self.step), step=step)


# ---------------------------------------------------------------------------------------------
# Fitness and death
# ---------------------------------------------------------------------------------------------


def loo_gates(gates: Tensor) -> Tensor:
    """Leave-one-out gates: ``(*b, N, K)`` -> ``(*b, K, N, K)`` with slot k's gate zeroed in row k."""
    K = gates.shape[-1]
    keep = 1 - torch.eye(K, dtype=gates.dtype, device=gates.device)  # (K, K)
    return gates.unsqueeze(-3) * keep.unsqueeze(-2)  # (*b, 1, N, K) * (K, 1, K) -> (*b, K, N, K)


def fitness(loo_loss: Tensor, full_loss: Tensor, scope: str = "global", agg: str = "max") -> Tensor:
    """Slot fitness ``(*b, K)`` from leave-one-out losses.

    Args:
        loo_loss: ``(*b, K, M)``, loss on domain m with slot k switched off.
        full_loss: ``(*b, M)``, loss on domain m with every slot.
        scope: ``global`` = equal-domain-weight mean over m of ``loo - full``;
            ``per-domain`` = ``agg`` over m of ``loo - full``.
    """
    require(scope in SCOPES, "scope", scope, "one of " + ", ".join(SCOPES))
    require(agg in AGGS, "per_domain_agg", agg, "one of " + ", ".join(AGGS))
    delta = loo_loss - full_loss.unsqueeze(-2)  # (*b, K, M)
    if scope == "global" or agg == "mean":
        return delta.mean(-1)
    if agg == "max":
        return delta.amax(-1)
    return delta.median(-1).values


def _death_order(fit: Tensor, ages: Tensor, n_die: int, min_age: int) -> tuple[Tensor, Tensor]:
    """Dying slots in order of fitness: ``slots (n, D)`` long, ``valid (n, D)`` bool, D = min(n_die, K-1).

    Eligible slots (``age >= min_age``) sort by fitness (NaN = least fit, ties by slot index);
    ineligible slots sort last. Row i keeps ``min(n_die, K - 1, #eligible)`` deaths."""
    K = fit.shape[-1]
    D = min(n_die, K - 1)
    eligible = ages >= min_age
    f = torch.where(torch.isnan(fit), torch.full_like(fit, -math.inf), fit).clamp(max=torch.finfo(fit.dtype).max)
    score = torch.where(eligible, f, torch.full_like(f, math.inf))
    order = torch.sort(score, dim=-1, stable=True).indices[..., :D]  # (n, D)
    allowed = eligible.sum(-1, keepdim=True).clamp(max=D)  # (n, 1)
    valid = torch.arange(D, device=fit.device) < allowed  # (n, D)
    return order, valid


def tournament_parent(fit: Tensor, alive: Tensor, size: int, generator: Generators) -> Tensor:
    """Pick a parent per row ``(n,)``: the fittest of ``size`` slots drawn uniformly (with
    replacement) among ``alive (n, K)``. Rows with no alive slot get slot 0. ``generator``: one, or
    n (one per row)."""
    w = alive.to(torch.float64) + (~alive.any(-1, keepdim=True)).to(torch.float64)  # no all-zero rows
    cand = _multinomial(w, size, generator).to(fit.device)  # (n, size)
    f = torch.where(torch.isnan(fit), torch.full_like(fit, -math.inf), fit).gather(-1, cand)
    return cand.gather(-1, f.argmax(-1, keepdim=True)).squeeze(-1)


def roulette_weights(fit: Tensor, alive: Tensor) -> Tensor:
    """Selection probabilities ``(n, K)`` of roulette (fitness-proportional) selection.

    Fitness is shifted so every survivor has a positive weight: ``w_k = f_k - min f + (max f -
    min f) / n_alive`` over the alive slots with finite fitness (the least fit survivor keeps a
    small chance); equal fitness gives a uniform draw. Dying slots (``alive`` False) and NaN
    fitness get weight 0; a row without any usable slot falls back to uniform over the alive slots
    (or all slots). Rows sum to 1."""
    f = fit.to(torch.float64)
    ok = alive & torch.isfinite(f)
    big = torch.finfo(torch.float64).max
    lo = torch.where(ok, f, torch.full_like(f, big)).amin(-1, keepdim=True)
    hi = torch.where(ok, f, torch.full_like(f, -big)).amax(-1, keepdim=True)
    n_ok = ok.sum(-1, keepdim=True).clamp_min(1)
    spread = (hi - lo).clamp_min(0)
    w = torch.where(ok, f - lo + spread / n_ok, torch.zeros_like(f))
    w = torch.where(ok & (spread == 0), torch.ones_like(f), w)  # all survivors equally fit: uniform
    empty = w.sum(-1, keepdim=True) <= 0
    fallback = alive.to(torch.float64) + (~alive.any(-1, keepdim=True)).to(torch.float64)
    w = torch.where(empty, fallback, w)
    return w / w.sum(-1, keepdim=True)


def roulette_parent(fit: Tensor, alive: Tensor, generator: Generators) -> Tensor:
    """Pick a parent per row ``(n,)`` with probability `roulette_weights` (one draw per row)."""
    return _multinomial(roulette_weights(fit, alive), 1, generator).to(fit.device).squeeze(-1)


def select_parent(fit: Tensor, alive: Tensor, cfg: "LifecycleConfig", generator: Generators) -> Tensor:
    """A fit parent per row by the configured selection (``tournament`` or ``roulette``)."""
    if cfg.selection == "roulette":
        return roulette_parent(fit, alive, generator)
    return tournament_parent(fit, alive, cfg.tournament, generator)
