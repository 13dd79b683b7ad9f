"""The shared lifecycle: death, inheritance, SVD mutation and slot reallocation on a population.

A `Population` names the K slots of one adapter population (per batch element: seeds, or seeds x
population): unique ids that are never reused, ages (steps since birth) and parent ids (-1 for
founders). The operators are pure functions with an explicit ``torch.Generator``; they act on
that population together with one or more adapter banks (a slot index is the same adapter in
every bank, i.e. in every adapted layer) and the router's per-slot parameters.

One `lifecycle_step` (called when ``cfg.due(step)``):

1. **fitness** (caller, with `fitness`): ``fit_k = agg_m (L_m^{-k} - L_m)``, the loss on domain m
   without slot k minus the loss with all slots. ``global``: equal-weight mean over domains;
   ``per-domain``: ``per_domain_agg`` over domains (``max``: a slot is as fit as its best domain).
2. **death**: the ``n_die`` least fit slots with ``age >= min_age`` die; at least one slot survives.
3. **inheritance** (``blend``): a dying slot's update is blended into its nearest surviving
   neighbour (largest cosine of the updates, summed over layers),
   ``N <- (1 - alpha) N + alpha D``, re-factorised to rank r; ``alpha = 0`` changes nothing.
   (``child``): the newborn in the freed slot is ``alpha D + (1 - alpha) base`` instead.
4. **birth / SVD mutation**: the freed slot gets a new id and a clone of a fit parent (tournament
   among survivors), mutated in its SVD basis: singular values times ``exp(sigma eps)``, singular
   vectors turned by a random rotation ``expm(Omega)`` (skew-symmetric ``Omega``; each vector turns
   by about ``rotation`` radians), rank <= r. With mutation off the base is a fresh LoRA init
   (zero update, trainable A).
5. **reallocation**: the freed slot's router column, bias and floor logit are copied from the
   parent with noise, and the column is pushed toward the domain with the worst current loss.

Deaths are processed in order of fitness, one death rank at a time, vectorised over the batch
(a Python loop over at most ``n_die`` ranks, never over seeds or slots).

Randomness: every operator takes either one ``torch.Generator`` for the whole (flattened) batch or a
sequence of n generators, one per batch element in row-major order. With a sequence, row i's draws
come from generator i alone (`_draw`, `_multinomial`: a loop over rows for the draws only, the maths
stays batched), so a seed's result does not depend on which other seeds share its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from sandbox.adapters import (AdapterBank, lowrank_svd, product_inner, product_norm, rand, randn, refactor, slot_gram,
                              split_factors)
from sandbox import plugins
from sandbox.errors import check, require

Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per flattened batch element (row-major)."""

SCOPES = ("global", "per-domain")
AGGS = ("max", "mean", "median")
MODES = ("blend", "child")
SELECTIONS = ("tournament", "roulette")
CROSSOVERS = ("none", "slerp")
MUTATION_KINDS = ("svd", "finetune", "svd+finetune")

FinetuneLoss = Callable[..., Tensor]
"""``loss(factors, router_params, target, k, generator) -> (*b,)``: the loss per batch element of the target
domain (``target (*b,)`` long, -1 = all domains) under the given adapter factors (same container
as the banks passed to `lifecycle_step`: a dict name -> ``(A, B)``, else one ``(A, B)`` tuple, in
the banks' shapes) and router parameters; ``k`` counts the fine-tune steps of the event (fresh
data per step); ``generator`` is the lifecycle's own (one, or one per row), for drawing that
data (so a run's draws stay a pure function of its lifecycle stream). Must be differentiable in
the factors."""


@dataclass(frozen=True)
class LifecycleConfig:
    """The lifecycle (factor L) and the fitness scope (factor E).

    Attributes:
        interval: steps between lifecycle events (`due`).
        n_die: most slots that die per event (at least one slot always survives).
        min_age: slots younger than this many steps never die.
        inherit_alpha: alpha of the inheritance blend, in [0, 1].
        inherit_mode: ``blend`` (dying -> nearest neighbour) or ``child`` (newborn = alpha dying
            + (1 - alpha) base).
        mutation_sigma: log-normal noise on singular values, ``s <- s exp(sigma eps)``.
        rotation: typical angle (radians) by which each singular vector is turned.
        tournament: tournament size for picking a fit parent among the survivors.
        realloc_noise: noise on the reset router parameters (logit units for a unit feature).
        realloc_push: logit increase, relative to the mean domain, of the freed slot on the worst
            domain's mean routing feature.
        scope: fitness scope, ``global`` or ``per-domain``.
        per_domain_agg: aggregator over domains in per-domain scope: ``max``, ``mean``, ``median``.
        death, inheritance, mutation, reallocation: switch each operator on or off.
        selection: how a fit parent is picked among the survivors: ``tournament`` (the fittest of
            ``tournament`` uniform draws) or ``roulette`` (EvoMerge: probability proportional to
            shifted fitness, `roulette_parent`).
        crossover: ``none`` (the newborn starts from one parent) or ``slerp`` (EvoMerge: the
            spherical interpolation of two fit parents' updates, `slerp_factors`).
        crossover_t: the SLERP weight t of the second parent in [0, 1], or None to draw it
            ``U(0, 1)`` per newborn.
        mutation_kind: ``svd`` (singular-value noise and rotation), ``finetune`` (EvoMerge: k
            gradient steps on the target domain for the newborn alone, instead of the SVD noise) or
            ``svd+finetune`` (the fine-tune after the SVD mutation), or a mutation plugin
            (`MutationOperator`: an entry point in molora.mutations or module:Name). Fine-tuning needs a loss
            callback (`lifecycle_step`'s ``finetune``); ``mutation = False`` switches both off.
        finetune_steps: k, gradient steps of the fine-tune.
        finetune_lr: length of each fine-tune step in factor space (normalised gradient descent on
            the newborn's factors of every layer together).
    """

    interval: int = 250
    n_die: int = 1
    min_age: int = 500
    inherit_alpha: float = 0.5
    inherit_mode: str = "blend"
    mutation_sigma: float = 0.1
    rotation: float = 0.05
    tournament: int = 2
    realloc_noise: float = 0.1
    realloc_push: float = 1.0
    scope: str = "global"
    per_domain_agg: str = "max"
    death: bool = True
    inheritance: bool = True
    mutation: bool = True
    reallocation: bool = True
    selection: str = "tournament"
    crossover: str = "none"
    crossover_t: float | None = None
    mutation_kind: str = "svd"
    finetune_steps: int = 1
    finetune_lr: float = 0.01

    def __post_init__(self):
        for name in ("interval", "n_die", "tournament"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, name, v, "an integer >= 1")
        require(isinstance(self.min_age, int) and self.min_age >= 0, "min_age", self.min_age, "an integer >= 0")
        require(_num(self.inherit_alpha) and 0 <= self.inherit_alpha <= 1, "inherit_alpha", self.inherit_alpha, "a number in [0, 1]")
        require(self.inherit_mode in MODES, "inherit_mode", self.inherit_mode, "one of " + ", ".join(MODES))
        for name in ("mutation_sigma", "rotation", "realloc_noise", "realloc_push"):
            v = getattr(self, name)
            require(_num(v) and v >= 0, name, v, "a number >= 0")
        require(self.scope in SCOPES, "scope", self.scope, "one of " + ", ".join(SCOPES))
        require(self.per_domain_agg in AGGS, "per_domain_agg", self.per_domain_agg, "one of " + ", ".join(AGGS))
        for name in ("death", "inheritance", "mutation", "reallocation"):
            require(isinstance(getattr(self, name), bool), name, getattr(self, name), "true or false")
        require(self.selection in SELECTIONS, "selection", self.selection, "one of " + ", ".join(SELECTIONS))
        require(self.crossover in CROSSOVERS, "crossover", self.crossover, "one of " + ", ".join(CROSSOVERS))
        require(self.crossover_t is None or (_num(self.crossover_t) and 0 <= self.crossover_t <= 1), "crossover_t",
                self.crossover_t, "a number in [0, 1], or none (drawn per newborn)")
        if self.mutation_kind not in MUTATION_KINDS:   # a mutation plugin that keeps the protocol, or one line
            mutation_operator(self.mutation_kind)
        require(isinstance(self.finetune_steps, int) and not isinstance(self.finetune_steps, bool)
                and self.finetune_steps >= 1, "finetune_steps", self.finetune_steps, "an integer >= 1")
        require(_num(self.finetune_lr) and self.finetune_lr > 0, "finetune_lr", self.finetune_lr, "a number > 0")

    @property
    def svd_mutation(self) -> bool:
        """Whether newborns get the SVD mutation."""
        return self.mutation and self.mutation_kind in ("svd", "svd+finetune")

    @property
    def plugin_mutation(self) -> bool:
        """Whether newborns get a mutation plugin's ``mutate`` (`MutationOperator`)."""
        return self.mutation and self.mutation_kind not in MUTATION_KINDS

    @property
    def finetunes(self) -> bool:
        """Whether newborns are fine-tuned (needs a loss callback)."""
        return self.mutation and self.mutation_kind in ("finetune", "svd+finetune")

    def due(self, step: int) -> bool:
        """Whether a lifecycle event happens after gradient step ``step`` (every ``interval``)."""
        return step > 0 and step % self.interval == 0


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------------
# Random draws: one generator for the batch, or one per row
# ---------------------------------------------------------------------------------------------


def _rows(generators: Sequence[torch.Generator], n: int) -> list[torch.Generator]:
    gens = list(generators)
    if len(gens) != n or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"expected one torch.Generator or {n} of them (one per batch row), got {len(gens)} items")
    return gens


def _draw(fn: Callable[..., Tensor], shape: tuple[int, ...], generators: Generators, dtype: torch.dtype,
          device) -> Tensor:
    """A random tensor of ``shape = (n, *row)`` from ``fn(shape, generator, dtype, device)`` (`randn`
    or `rand`). One generator: one draw of the whole shape. A sequence of n generators: row i is
    ``fn(row, generators[i])``, so its numbers depend on its own generator only."""
    if isinstance(generators, torch.Generator):
        return fn(shape, generators, dtype, device)
    n, row = shape[0], tuple(shape[1:])
    gens = _rows(generators, n)
    if n == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.stack([fn(row, g, dtype, device) for g in gens])  # (n, *row)


def _multinomial(w: Tensor, size: int, generators: Generators) -> Tensor:
    """``size`` indices per row drawn with replacement from weights ``w (n, K)``: ``(n, size)`` long,
    on the generator's device (per row with a sequence of generators, as in `_draw`)."""
    if isinstance(generators, torch.Generator):
        return torch.multinomial(w.to(generators.device), size, replacement=True, generator=generators)
    gens = _rows(generators, w.shape[0])
    if not gens:
        return torch.empty((0, size), dtype=torch.long, device=w.device)
    rows = [torch.multinomial(w[i].to(g.device), size, replacement=True, generator=g).to(w.device)
            for i, g in enumerate(gens)]
    return torch.stack(rows)  # (n, size)


def _only(generators: Generators, rows: Tensor) -> Generators:
    """The generators with those of rows where ``rows (n,)`` is False swapped for throwaway ones, so a
    row's generator is advanced only by the draws it uses (a single generator is returned as is)."""
    if isinstance(generators, torch.Generator):
        return generators
    return [g if keep else torch.Generator(device=g.device) for g, keep in zip(generators, rows.tolist())]


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


# ---------------------------------------------------------------------------------------------
# Operators on factors (one bank, batch flattened to n)
# ---------------------------------------------------------------------------------------------


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x[i, idx[i]]`` for ``x (n, K, ...)``, ``idx (n,)``."""
    return x[torch.arange(x.shape[0], device=x.device), idx]


def _put(x: Tensor, idx: Tensor, value: Tensor, valid: Tensor) -> Tensor:
    """Copy of ``x (n, K, ...)`` with ``x[i, idx[i]] = value[i]`` where ``valid[i]``; others untouched."""
    K = x.shape[1]
    hit = (torch.nn.functional.one_hot(idx, K).bool() & valid.unsqueeze(-1))  # (n, K)
    hit = hit.reshape(*hit.shape, *([1] * (x.dim() - 2)))
    return torch.where(hit, value.unsqueeze(1).to(x.dtype), x)


def blend(A_n: Tensor, B_n: Tensor, A_d: Tensor, B_d: Tensor, alpha: float, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``(1 - alpha) B_n A_n + alpha B_d A_d`` (per row, factor form).

    A ``(n, r, d_in)``, B ``(n, d_out, r)``; the 2r-wide stacked factors are re-factorised by
    `refactor` (QR + small SVD)."""
    L = torch.cat([(1 - alpha) * B_n, alpha * B_d], dim=-1)  # (n, d_out, 2r)
    R = torch.cat([A_n, A_d], dim=-2)  # (n, 2r, d_in)
    return refactor(L, R, rank)


def slerp_factors(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, t: float | Tensor, rank: int,
                  eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of the SLERP of two updates ``X1 = B1 A1`` and ``X2 = B2 A2`` (per row).

    As in EvoMerge/mergekit, each update is one flattened vector: with ``theta`` the angle between
    X1 and X2, the direction is ``sin((1-t) theta)/sin(theta) X1/|X1| + sin(t theta)/sin(theta)
    X2/|X2|`` and the norm is interpolated linearly, ``(1-t)|X1| + t|X2|``. In factor form: the
    direction is ``[c1 B1, c2 B2] [A1; A2]`` (rank <= 2r, inner products from r x r Grams), cut to
    its best rank-``rank`` approximation (Eckart-Young, `lowrank_svd`) whose singular values are then
    rescaled to the interpolated norm, so the result's norm lies between the parents' exactly.
    Nearly (anti)parallel parents (``sin theta < eps``) use the linear blend of the directions; a
    zero parent contributes only its norm. ``t = 0`` / ``t = 1`` return X1 / X2 (re-factorised),
    identical parents return the parent. A ``(n, r, d_in)``, B ``(n, d_out, r)``, ``t`` a float or
    ``(n,)``. Returns ``A (n, rank, d_in)``, ``B (n, d_out, rank)``; nothing ``d_out x d_in`` is formed.
    """
    f64 = torch.float64
    t = torch.as_tensor(t, dtype=f64, device=A1.device).expand(A1.shape[:-2])  # (n,)
    n1 = product_norm(A1, B1).to(f64)
    n2 = product_norm(A2, B2).to(f64)
    tiny = 1e-300
    cos = (product_inner(A1, B1, A2, B2).to(f64) / (n1 * n2).clamp_min(tiny)).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    lin = sin < eps
    safe = torch.where(lin, torch.ones_like(sin), sin)
    w1 = torch.where(lin, 1 - t, torch.sin((1 - t) * theta) / safe)
    w2 = torch.where(lin, t, torch.sin(t * theta) / safe)
    z1, z2 = n1 <= tiny, n2 <= tiny
    w1, w2 = (torch.where(z1, torch.zeros_like(w1), torch.where(z2, torch.ones_like(w1), w1)),
              torch.where(z2, torch.zeros_like(w2), torch.where(z1, torch.ones_like(w2), w2)))
    c1 = (w1 / n1.clamp_min(tiny)).to(B1.dtype)[..., None, None]
    c2 = (w2 / n2.clamp_min(tiny)).to(B2.dtype)[..., None, None]
    U, S, Vh = lowrank_svd(torch.cat([c1 * B1, c2 * B2], dim=-1), torch.cat([A1, A2], dim=-2))
    target = (1 - t) * n1 + t * n2  # (n,)
    kept = S[..., :rank].to(f64).pow(2).sum(-1).sqrt()
    gain = torch.where(kept > tiny, target / kept.clamp_min(tiny), torch.zeros_like(kept))
    A, B = split_factors(U, S * gain.to(S.dtype).unsqueeze(-1), Vh, rank)
    return A.to(A1.dtype), B.to(B1.dtype)


def _expm(x: Tensor, per_row: bool) -> Tensor:
    """``expm`` of ``x (n, m, m)``. torch picks a cheaper Pade degree for a lone matrix than for a
    batch (degree 18 with scaling and squaring for every matrix), so with per-row generators a lone
    row is padded with a zero matrix to take the batch path: its rotation is then bit-identical to
    the same row's inside any batch (on the CPU). One generator keeps torch's own choice."""
    if per_row and x.shape[0] == 1:
        return torch.linalg.matrix_exp(torch.cat([x, torch.zeros_like(x)]))[:1]  # (2, m, m) -> (1, m, m)
    return torch.linalg.matrix_exp(x)


def _rotate(U: Tensor, angle: float, generator: Generators) -> Tensor:
    """Turn orthonormal columns ``U (n, d, q)`` by a random rotation of the span of U plus q
    random directions: ``U' = U + Q (expm(Omega) - I) Q^T U`` with ``Q`` an orthonormal basis of
    ``[U, G]`` (m = 2q columns) and ``Omega`` skew-symmetric with ``N(0, angle^2 / m)`` entries, so
    ``||Omega u|| ~= angle``: each singular vector turns by about ``angle`` radians whatever the rank.
    U' stays orthonormal and may leave U's column space; cost O(d q^2)."""
    n, d, q = U.shape
    G = _draw(randn, (n, d, q), generator, U.dtype, U.device)
    Q, _ = torch.linalg.qr(torch.cat([U, G], dim=-1))  # (n, d, m), m = min(d, 2q)
    m = Q.shape[-1]
    X = _draw(randn, (n, m, m), generator, U.dtype, U.device)
    omega = (X - X.transpose(-1, -2)) * (angle / math.sqrt(2 * m))  # skew-symmetric, entries ~ N(0, angle^2 / m)
    Rm = _expm(omega, not isinstance(generator, torch.Generator)) - torch.eye(m, dtype=U.dtype, device=U.device)  # (n, m, m)
    return U + Q @ (Rm @ (Q.transpose(-1, -2) @ U))


def mutate_svd(A: Tensor, B: Tensor, sigma: float, rotation: float, generator: Generators,
               rank: int | None = None) -> tuple[Tensor, Tensor]:
    """SVD mutation of adapters ``A (n, r, d_in)``, ``B (n, d_out, r)`` (one adapter per row).

    ``B A = U diag(s) V^T`` -> ``U' diag(s exp(sigma eps)) V'^T`` with ``eps ~ N(0, 1)`` per singular
    value and ``U' = rot(U)``, ``V' = rot(V)`` (see `_rotate`), returned as balanced rank-r factors.
    ``sigma = rotation = 0`` returns exact copies of the inputs. ``generator``: one, or n (one per row).
    """
    rank = rank or A.shape[-2]
    if sigma == 0 and rotation == 0:
        return A.clone(), B.clone()
    U, S, Vh = lowrank_svd(B, A)  # (n, d_out, q), (n, q), (n, q, d_in)
    S = S * torch.exp(sigma * _draw(randn, tuple(S.shape), generator, S.dtype, S.device))
    if rotation > 0:
        U = _rotate(U, rotation, generator)
        Vh = _rotate(Vh.transpose(-1, -2), rotation, generator).transpose(-1, -2)
    return split_factors(U, S, Vh, rank)


def fresh_factors(n: int, rank: int, d_in: int, d_out: int, generator: Generators, like: Tensor) -> tuple[Tensor, Tensor]:
    """A fresh LoRA init per row: ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, ``B = 0`` (one generator, or n)."""
    bound = 1 / math.sqrt(d_in)
    A = (_draw(rand, (n, rank, d_in), generator, like.dtype, like.device) * 2 - 1) * bound
    return A, like.new_zeros((n, d_out, rank))


def reallocate(params: dict[str, Tensor], slot: Tensor, parent: Tensor, valid: Tensor, cfg: LifecycleConfig,
               generator: Generators, domain_losses: Tensor | None = None,
               domain_features: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Reset router slot ``slot`` from slot ``parent`` (rows where ``valid``), batch flattened.

    Params are ``W (n, e, F, K)``, ``bias (n, e, K)``, ``phi (n, e, K)`` (``e`` extra individuals
    sharing the population, e.g. the evolution population P; e = 1 otherwise). For each row:
    ``w_slot = w_parent + realloc_noise/sqrt(F) eps + realloc_push u / ||u||^2``, where
    ``u = hbar_{m*} - mean_m hbar_m`` and ``m* = argmax_m domain_losses``, so the slot's logit on
    the worst domain's mean feature rises by ``realloc_push`` relative to the mean domain;
    ``bias``/``phi`` are the parent's plus ``realloc_noise eps``.

    Returns the new params and the target domain per row ``(n,)`` (-1 without domain data).
    ``generator``: one, or n (one per row).
    """
    W = params["W"]
    n, e, F, K = W.shape
    target = torch.full((n,), -1, dtype=torch.long, device=W.device)
    push = W.new_zeros((n, F))
    if domain_losses is not None and domain_features is not None and cfg.realloc_push > 0:
        target = domain_losses.argmax(-1)  # (n,)
        hbar = domain_features.to(W.dtype)  # (n, M, F)
        u = _take(hbar, target) - hbar.mean(-2)  # (n, F)
        push = cfg.realloc_push * u / (u * u).sum(-1, keepdim=True).clamp_min(1e-12)
    out = {}
    for name, x in params.items():
        xs = x.movedim(-1, 1)  # (n, K, e[, F]) slot axis second
        src = _take(xs, parent)  # (n, e[, F])
        noise = _draw(randn, tuple(src.shape), generator, x.dtype, x.device) * cfg.realloc_noise
        if name == "W":
            src = src + noise / math.sqrt(F) + push.unsqueeze(1)
        else:
            src = src + noise
        out[name] = _put(xs, slot, src, valid).movedim(1, -1)
    return out, target


# ---------------------------------------------------------------------------------------------
# Adam state
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reset_adam_state(optimizer: torch.optim.Optimizer, param: Tensor, slot_mask: Tensor, slot_dim: int) -> None:
    """Zero Adam's ``exp_avg``/``exp_avg_sq`` (and ``max_exp_avg_sq``) for the reset slots of ``param``.

    ``slot_mask (*b, K)`` bool; ``param`` has the batch dims first and the slot axis at
    ``slot_dim`` (e.g. -3 for ``A (*b, K, r, d_in)``, -1 for router ``W (*b, F, K)``). The scalar
    ``step`` count is shared by the whole tensor and is left alone.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    nb = slot_mask.dim() - 1
    s = slot_dim % param.dim()
    check(s >= nb and param.shape[s] == slot_mask.shape[-1], "slot_dim", slot_dim, f"the slot axis of a {tuple(param.shape)} parameter")
    shape = list(slot_mask.shape[:nb]) + [1] * (param.dim() - nb)
    shape[s] = slot_mask.shape[-1]
    m = slot_mask.reshape(shape).to(param.device)  # (*b, 1.., K, 1..) aligned with param
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            state[key].masked_fill_(m, 0)


def reset_mask(events: list[dict], batch_shape: tuple[int, ...], n_slots: int,
               kinds: tuple[str, ...] = ("birth", "inherit"), device=None) -> Tensor:
    """``(*b, K)`` bool: slots whose parameters a lifecycle step replaced (for `reset_adam_state`)."""
    mask = torch.zeros((math.prod(batch_shape), n_slots), dtype=torch.bool)
    for ev in events:
        if ev["event"] in kinds:
            mask[ev["batch"], ev["slot"]] = True
    return mask.reshape(*batch_shape, n_slots).to(device) if device is not None else mask.reshape(*batch_shape, n_slots)


# ---------------------------------------------------------------------------------------------
# The composed step
# ---------------------------------------------------------------------------------------------


def _unpack(banks) -> tuple[dict[str, tuple[Tensor, Tensor, float]], str]:
    """Banks as ``{name: (A, B, scale)}`` and the input kind (``bank``, ``tuple`` or ``dict``)."""
    def one(b):
        if isinstance(b, AdapterBank):
            return b.A.detach(), b.B.detach(), b.scale
        A, B = b
        return A, B, 1.0
    if isinstance(banks, dict):
        return {k: one(v) for k, v in banks.items()}, "dict"
    return {"": one(banks)}, "bank" if isinstance(banks, AdapterBank) else "tuple"


def _work(x: Tensor) -> Tensor:
    """Half-precision factors are processed in fp32 (QR/SVD need it) and cast back at the end."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _repack(banks, kind: str, new: dict[str, tuple[Tensor, Tensor]]):
    def one(old, AB):
        if isinstance(old, AdapterBank):
            old.set_factors(*AB)  # in place, so optimisers keep their Parameters
            return old
        return AB
    if kind == "dict":
        return {k: one(banks[k], new[k]) for k in banks}
    return one(banks, new[""])


def _replace_slot(A: Tensor, B: Tensor, d: Tensor, nb: Tensor, parent: Tensor, v: Tensor, cfg: LifecycleConfig,
                  generator: Generators, do_blend: bool, do_child: bool, parent2: Tensor | None = None,
                  t: Tensor | None = None):
    """One layer's part of one death rank: blend the dying slot ``d`` into ``nb`` (blend mode),
    then fill ``d`` with the (mutated) parent clone, or the SLERP of ``parent`` and ``parent2`` at
    ``t`` (crossover), or a fresh init (blended with the dying slot in child mode).
    A ``(n, K, r, d_in)``, B ``(n, K, d_out, r)``; rows with ``v`` False untouched.
    Returns new A, B and ``||child - parent||_F^2``, ``||parent||_F^2`` per row (unscaled)."""
    r, d_in, d_out = A.shape[-2], A.shape[-1], B.shape[-2]
    a = float(cfg.inherit_alpha)
    A_d, B_d = _take(A, d), _take(B, d)
    if do_blend:
        A_nb, B_nb = blend(_take(A, nb), _take(B, nb), A_d, B_d, a, r)
        A, B = _put(A, nb, A_nb, v), _put(B, nb, B_nb, v)
    A_p, B_p = _take(A, parent), _take(B, parent)
    A_b, B_b = A_p, B_p
    if parent2 is not None:
        A_b, B_b = slerp_factors(A_p, B_p, _take(A, parent2), _take(B, parent2), t, r)
    if cfg.svd_mutation:
        A_c, B_c = mutate_svd(A_b, B_b, cfg.mutation_sigma, cfg.rotation, generator, r)
    elif cfg.plugin_mutation:
        A_c, B_c = _plugin_mutate(cfg, A_b, B_b, generator)
    elif cfg.mutation or parent2 is not None:  # fine-tune only, or an unmutated crossover child
        A_c, B_c = A_b.clone(), B_b.clone()
    else:
        A_c, B_c = fresh_factors(A.shape[0], r, d_in, d_out, generator, A)
    if do_child:
        A_c, B_c = blend(A_c, B_c, A_d, B_d, a, r)
    par2 = product_inner(A_p, B_p, A_p, B_p).to(torch.float64)
    diff2 = (product_inner(A_c, B_c, A_c, B_c).to(torch.float64) + par2
             - 2 * product_inner(A_c, B_c, A_p, B_p).to(torch.float64)).clamp_min(0)
    return _put(A, d, A_c, v), _put(B, d, B_c, v), diff2, par2


@dataclass(frozen=True)
class DeathRank:
    """What one death rank of `lifecycle_step` did, per batch row: the record its events are read
    from (`events`). Tensors are ``(n,)`` over the flattened batch; rows where ``valid`` is False had
    no death at this rank.

    Attributes:
        step: the step of the lifecycle event.
        valid: rows with a death at this rank.
        dying, neighbour, parent: slots of the dying adapter, its nearest surviving neighbour and
            the newborn's parent.
        target: the domain the freed router column was pushed toward (-1: none).
        fitness: ``(n, K)`` fitness of every slot.
        old_id, new_id, parent_id, neighbour_id: slot ids (the dying one, the newborn's, ...).
        mutation_size: ``||child - parent|| / ||parent||`` of the newborn (NaN when not mutated).
        alpha: the inheritance alpha in effect (0 without inheritance).
        blended: the dying adapter was blended into its neighbour (``blend`` mode).
        child: the newborn inherited from the dying adapter (``child`` mode).
        uses_parent: the newborn descends from ``parent`` (mutation, crossover or reallocation).
        extra: more columns of the birth events, name -> ``(n,)`` (only with the EvoMerge options).
    """

    step: int
    valid: Tensor
    dying: Tensor
    neighbour: Tensor
    parent: Tensor
    target: Tensor
    fitness: Tensor
    old_id: Tensor
    new_id: Tensor
    parent_id: Tensor
    neighbour_id: Tensor
    mutation_size: Tensor
    alpha: float
    blended: bool
    child: bool
    uses_parent: bool
    extra: dict[str, Tensor] = field(default_factory=dict)

    def events(self) -> list[dict]:
        """Event dicts (rows of ``lifecycle.csv``) for the rows with a death: death, inherit (if
        any), birth."""
        events = []
        d, nb, parent, f = self.dying, self.neighbour, self.parent, self.fitness
        blend_, child, uses = self.blended, self.child, self.uses_parent
        for row in torch.nonzero(self.valid).flatten().tolist():
            base = {"step": self.step, "batch": row, "inherit_alpha": self.alpha}
            blank = {"mutation_size": math.nan, "domain": -1}
            events.append({**base, "event": "death", "slot": int(d[row]), "slot_id": int(self.old_id[row]),
                           "parent_id": -1, "neighbour_id": int(self.neighbour_id[row]) if blend_ else -1,
                           "fitness": float(f[row, d[row]]), **blank,
                           "parent_slot": -1, "neighbour_slot": int(nb[row]) if blend_ else -1})
            if blend_:  # the receiver is the neighbour; its "parent" here is the dying donor
                events.append({**base, "event": "inherit", "slot": int(nb[row]), "slot_id": int(self.neighbour_id[row]),
                               "parent_id": int(self.old_id[row]), "neighbour_id": int(self.neighbour_id[row]),
                               "fitness": float(f[row, nb[row]]), **blank,
                               "parent_slot": int(d[row]), "neighbour_slot": int(nb[row])})
            if child:  # the receiver is the newborn
                events.append({**base, "event": "inherit", "slot": int(d[row]), "slot_id": int(self.new_id[row]),
                               "parent_id": int(self.old_id[row]), "neighbour_id": -1,
                               "fitness": float(f[row, d[row]]), **blank,
                               "parent_slot": int(d[row]), "neighbour_slot": -1})
            events.append({**base, "event": "birth", "slot": int(d[row]), "slot_id": int(self.new_id[row]),
                           "parent_id": int(self.parent_id[row]) if uses else -1, "neighbour_id": -1,
                           "fitness": float(f[row, parent[row]]) if uses else math.nan,
                           "mutation_size": float(self.mutation_size[row]), "domain": int(self.target[row]),
                           "parent_slot": int(parent[row]) if uses else -1, "neighbour_slot": -1,
                           **{k: x[row].item() for k, x in self.extra.items()}})
        return events


def _finetune(new: dict[str, tuple[Tensor, Tensor]], layers: dict, kind: str, rp: dict[str, Tensor] | None,
              router_params: dict[str, Tensor] | None, slot: Tensor, valid: Tensor, target: Tensor,
              cfg: LifecycleConfig, loss_fn: FinetuneLoss, bshape: tuple[int, ...], k0: int, generator: Generators):
    """``cfg.finetune_steps`` normalised gradient steps on the newborn ``slot (n,)`` alone (rows where
    ``valid``): the gradient of ``loss_fn`` is masked to that slot's factors in every layer (every
    other slot, and rows without a birth, are untouched), and each row moves ``finetune_lr`` along
    its own gradient direction. Returns the new factors and the loss per row before and after."""
    n, K = slot.shape[0], next(iter(new.values()))[0].shape[1]
    sel = (torch.nn.functional.one_hot(slot, K).bool() & valid.unsqueeze(-1))  # (n, K)
    rpar = router_params if rp is None else {k: x.reshape(router_params[k].shape) for k, x in rp.items()}
    tgt = target.reshape(bshape)

    def loss_of(fac, j):
        shaped = {name: (A.reshape(*bshape, *A.shape[1:]), B.reshape(*bshape, *B.shape[1:])) for name, (A, B) in fac.items()}
        arg = shaped if kind == "dict" else shaped[""]
        return loss_fn(arg, rpar, tgt, j, generator).reshape(n)

    before = None
    for j in range(cfg.finetune_steps):
        with torch.enable_grad():
            leaves = {name: (A.detach().requires_grad_(True), B.detach().requires_grad_(True)) for name, (A, B) in new.items()}
            loss = loss_of(leaves, k0 + j)
            flat = [x for AB in leaves.values() for x in AB]
            grads = torch.autograd.grad(loss.sum(), flat, allow_unused=True)
        if before is None:
            before = loss.detach().to(torch.float64)
        grads = [torch.zeros_like(x) if g is None else
                 torch.where(sel.reshape(n, K, 1, 1), torch.nan_to_num(g.detach()), torch.zeros_like(g))
                 for x, g in zip(flat, grads)]
        sq = sum(g.to(torch.float64).pow(2).sum((1, 2, 3)) for g in grads)  # (n,)
        step = (cfg.finetune_lr / sq.sqrt().clamp_min(1e-30)).where(sq > 0, torch.zeros_like(sq))  # (n,)
        it = iter(grads)
        new = {name: (A - step.to(A.dtype).reshape(n, 1, 1, 1) * next(it), B - step.to(B.dtype).reshape(n, 1, 1, 1) * next(it))
               for name, (A, B) in new.items()}
    after = loss_of(new, k0 + cfg.finetune_steps).detach().to(torch.float64)
    return new, before, after


@torch.no_grad()
def lifecycle_step(pop: Population, banks, router_params: dict[str, Tensor] | None, fitness: Tensor,
                   cfg: LifecycleConfig, generator: Generators, step: int,
                   domain_losses: Tensor | None = None, domain_features: Tensor | None = None,
                   finetune: FinetuneLoss | None = None):
    """One lifecycle event: death, inheritance, birth with SVD mutation, reallocation.

    Args:
        pop: the population, batch shape ``*b``.
        banks: an `AdapterBank`, a tuple ``(A (*b, K, r, d_in), B (*b, K, d_out, r))`` or a dict
            name -> either (one bank per adapted layer; the same slot dies in every layer).
            AdapterBanks are updated in place (and returned); tuples are returned as new tensors.
        router_params: router dict (``W (*b, *e, F, K)``, ``bias``, ``phi``) or None.
        fitness: ``(*b, K)`` slot fitness (see the function `fitness`).
        generator: one ``torch.Generator`` for the whole batch, or a sequence of ``prod(*b)``
            generators, one per batch element in row-major order of ``*b``. With a sequence, element
            i's result and the state its generator is left in depend only on element i's inputs and
            generator (rows without a death at some rank draw from a throwaway generator), so
            results are independent of the batch composition.
        step: the current step (ages are advanced to it).
        domain_losses: ``(*b, M)`` current per-domain losses (for reallocation), or None.
        domain_features: ``(*b, M, F)`` mean routing feature per domain, or None.
        finetune: the loss callback of ``mutation_kind`` ``finetune`` / ``svd+finetune`` (see
            `FinetuneLoss`); the newborn is tuned on the worst domain of ``domain_losses`` (all
            domains without them). Required when ``cfg.finetunes``.

    EvoMerge options (`LifecycleConfig`): ``selection = roulette`` picks parents by
    `roulette_parent`; ``crossover = slerp`` draws a second parent among the other survivors
    (same selection) and the newborn starts from `slerp_factors` of the two at ``crossover_t``
    (drawn ``U(0, 1)`` when None); their birth events gain ``parent2_id``, ``parent2_slot``,
    ``crossover_t``, and fine-tuned births ``finetune_loss_before`` / ``finetune_loss_after``.
    With the defaults (tournament, no crossover, SVD mutation) the draws and results are exactly
    those of the lifecycle before these options existed.

    Returns:
        ``(pop, banks, router_params, events)``; events are dicts with keys ``step, batch`` (flat
        batch index), ``event`` (death/inherit/birth), ``slot, slot_id, parent_id, neighbour_id,
        fitness, mutation_size, alpha, domain, parent_slot, neighbour_slot`` for ``lifecycle.csv``
        (``*_slot``: the slot index that held ``parent_id`` / ``neighbour_id`` just before the event).
    """
    pop = pop.at(step)
    bshape, K = pop.batch_shape, pop.n_slots
    n = math.prod(bshape)
    if not isinstance(generator, torch.Generator):
        generator = _rows(generator, n)
    layers, kind = _unpack(banks)
    fac = {k: (_work(A).reshape(n, K, *A.shape[-2:]), _work(B).reshape(n, K, *B.shape[-2:]), sc)
           for k, (A, B, sc) in layers.items()}  # (n, K, r, d_in), (n, K, d_out, r)
    f = fitness.reshape(n, K).to(torch.float64)
    events: list[dict] = []
    require(not cfg.finetunes or finetune is not None, "mutation", cfg.mutation_kind,
            "svd here (this system supplies no fine-tune gradient callback)")
    if not cfg.death or K < 2:
        return pop, banks, router_params, events
    order, valid = _death_order(f, pop.ages.reshape(n, K), cfg.n_die, cfg.min_age)
    if not bool(valid.any()):
        return pop, banks, router_params, events

    ids, ages, parents = (t.reshape(n, K).clone() for t in (pop.ids, pop.ages, pop.parents))
    next_id = pop.next_id.reshape(n).clone()
    dead = torch.zeros((n, K), dtype=torch.bool, device=f.device).scatter(-1, order, valid)
    alive = ~dead
    # cosine of whole adapters (all layers): sum_l s_l^2 <B_k A_k, B_j A_j> over norms, (n, K, K)
    gram = sum(sc * sc * slot_gram(A, B).to(torch.float64) for A, B, sc in fac.values())
    nrm = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    cos = gram / (nrm.unsqueeze(-1) * nrm.unsqueeze(-2)).clamp_min(1e-30)
    new = {k: (A, B) for k, (A, B, _) in fac.items()}
    rp = None
    if router_params is not None:
        extra = router_params["bias"].shape[len(bshape):-1]
        e = math.prod(extra)
        rp = {k: v.reshape(n, e, *v.shape[len(bshape) + len(extra):]) for k, v in router_params.items()}  # (n, e, [F,] K)
    a = float(cfg.inherit_alpha)
    do_blend = cfg.inheritance and cfg.inherit_mode == "blend" and a > 0
    do_child = cfg.inheritance and cfg.inherit_mode == "child" and a > 0

    for i in range(order.shape[-1]):
        d, v = order[:, i], valid[:, i]  # (n,) dying slot and whether row i has this death
        if not bool(v.any()):
            continue
        gen = _only(generator, v)  # with per-row generators, rows without this death draw from throwaways
        parent = select_parent(f, alive, cfg, gen)  # (n,)
        parent2 = t = None
        extra: dict[str, Tensor] = {}
        if cfg.crossover == "slerp":  # a second parent among the other survivors (the same if none)
            others = alive & ~torch.nn.functional.one_hot(parent, K).bool()
            parent2 = select_parent(f, torch.where(others.any(-1, keepdim=True), others, alive), cfg, gen)
            t = (torch.full((n,), float(cfg.crossover_t), dtype=torch.float64, device=f.device)
                 if cfg.crossover_t is not None else _draw(rand, (n,), gen, torch.float64, f.device))
            extra = {"parent2_id": _take(ids, parent2), "parent2_slot": parent2, "crossover_t": t}
        nb = torch.where(alive, _take(cos, d), torch.full_like(f, -math.inf)).argmax(-1)  # (n,)
        sq_diff = torch.zeros(n, dtype=torch.float64, device=f.device)  # ||child - parent||^2 over layers
        sq_par = torch.zeros(n, dtype=torch.float64, device=f.device)  # ||parent||^2 over layers
        for name, (A, B) in new.items():
            A, B, diff2, par2 = _replace_slot(A, B, d, nb, parent, v, cfg, gen, do_blend, do_child, parent2, t)
            new[name] = (A, B)
            sq_diff += fac[name][2] ** 2 * diff2
            sq_par += fac[name][2] ** 2 * par2
        target = torch.full((n,), -1, dtype=torch.long, device=f.device)
        if rp is not None and cfg.reallocation:
            dl = domain_losses.reshape(n, -1) if domain_losses is not None else None
            df = domain_features.reshape(n, *domain_features.shape[-2:]) if domain_features is not None else None
            rp, target = reallocate(rp, d, parent, v, cfg, gen, dl, df)
        if cfg.finetunes:
            goal = (domain_losses.reshape(n, -1).argmax(-1) if domain_losses is not None
                    else torch.full((n,), -1, dtype=torch.long, device=f.device))
            new, before, after = _finetune(new, layers, kind, rp, router_params, d, v, goal.to(d.device), cfg, finetune,
                                           bshape, i * (cfg.finetune_steps + 1), gen)
            extra = {**extra, "finetune_loss_before": before, "finetune_loss_after": after}
        mutated = cfg.mutation or parent2 is not None
        msize = (sq_diff / sq_par).sqrt() if mutated else torch.full((n,), math.nan, dtype=torch.float64, device=f.device)
        uses_parent = mutated or (cfg.reallocation and rp is not None)
        old_id, par_id, nb_id = _take(ids, d), _take(ids, parent), _take(ids, nb)
        new_id = next_id.clone()
        ids = _put(ids, d, new_id, v)
        ages = _put(ages, d, torch.zeros_like(new_id), v)
        parents = _put(parents, d, par_id if uses_parent else torch.full_like(par_id, -1), v)
        next_id = next_id + v.long()
        events += DeathRank(step=step, valid=v, dying=d, neighbour=nb, parent=parent, target=target, fitness=f,
                            old_id=old_id, new_id=new_id, parent_id=par_id, neighbour_id=nb_id, mutation_size=msize,
                            alpha=a if cfg.inheritance else 0.0, blended=do_blend, child=do_child,
                            uses_parent=uses_parent, extra=extra).events()

    new_pop = Population(ids.reshape(*bshape, K), ages.reshape(*bshape, K), parents.reshape(*bshape, K),
                         next_id.reshape(bshape), step)
    out = {k: (A.reshape(layers[k][0].shape).to(layers[k][0].dtype), B.reshape(layers[k][1].shape).to(layers[k][1].dtype))
           for k, (A, B) in new.items()}
    if rp is not None:
        rp = {k: v.reshape(router_params[k].shape) for k, v in rp.items()}
    else:
        rp = router_params
    return new_pop, _repack(banks, kind, out), rp, events


def event_rows(events: list[dict], batch_labels: list[Any] | None = None, label: str = "seed") -> list[dict]:
    """Rows for ``lifecycle.csv``; ``batch_labels[batch]`` (e.g. seeds) becomes column ``label``."""
    rows = []
    for ev in events:
        row = dict(ev)
        b = row.pop("batch")
        row[label] = batch_labels[b] if batch_labels is not None else b
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Mutation operators: an extension point (`sandbox.plugins`, group ``mutation``)
# ---------------------------------------------------------------------------------------------


class MutationOperator:
    """The mutation-operator protocol (duck-typed; this class documents it). ``--mutation`` takes
    an entry point name in ``molora.mutations`` or ``module:Name`` of an object with:

        mutate(A, B, cfg, generator) -> (A', B'): the newborn's factors from its parent's (after
            crossover, if any), one adapter per row: ``A (n, r, d_in)``, ``B (n, d_out, r)`` ->
            the same shapes. ``cfg`` is the `LifecycleConfig` (``mutation_sigma``, ``rotation``,
            ...); ``generator`` is one ``torch.Generator`` or a sequence of n (one per row): draw
            with `draw_normal` so a row's numbers depend on its own generator only.

    Death, parent selection, inheritance and reallocation stay the package's; the mutation's
    size is recorded as for SVD (``mutation_size`` in lifecycle.csv). Both systems call it (the
    analytic sandbox with rows = seeds x deaths, the transformer once per adapted layer).
    """

    def mutate(self, A: Tensor, B: Tensor, cfg: LifecycleConfig, generator: Generators) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def draw_normal(shape: tuple[int, ...], generator: Generators, like: Tensor) -> Tensor:
    """``N(0, 1)`` noise of ``shape = (n, ...)`` like `like` (dtype, device): one generator draws
    the whole shape, a sequence of n draws row i from generator i."""
    return _draw(randn, tuple(shape), generator, like.dtype, like.device)


def mutation_operator(kind: str) -> MutationOperator:
    """The mutation plugin ``kind`` names (entry point in ``molora.mutations`` or ``module:Name``)."""
    return plugins.resolve("mutation", kind, "--mutation")


def _plugin_mutate(cfg: LifecycleConfig, A: Tensor, B: Tensor, generator: Generators) -> tuple[Tensor, Tensor]:
    op = mutation_operator(cfg.mutation_kind)
    out = op.mutate(A, B, cfg, generator)
    ok = isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, Tensor) for x in out)
    if not ok or tuple(out[0].shape) != tuple(A.shape) or tuple(out[1].shape) != tuple(B.shape):
        got = tuple(tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__ for x in out) \
            if isinstance(out, tuple) else type(out).__name__
        raise plugins.PluginError("--mutation", cfg.mutation_kind, f"{type(op).__name__}.mutate() returned {got}; "
                                  f"expected (A (n, r, d_in), B (n, d_out, r)) = ({tuple(A.shape)}, {tuple(B.shape)})")
    return out[0].to(A.dtype), out[1].to(B.dtype)


def check_mutation_operator(obj, value: str) -> None:
    """Probe a mutation plugin once (n = 3 adapters of rank 2, d_in = 5, d_out = 4; one generator
    and one per row)."""
    if not callable(getattr(obj, "mutate", None)):
        raise plugins.PluginError("--mutation", value, f"{type(obj).__name__} has no mutate() method; expected the "
                                  "mutation protocol (mutate(A, B, cfg, generator) -> (A, B); docs/plugins.md)")
    cfg = LifecycleConfig(mutation_kind=value)
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(3, 2, 5, generator=gen, dtype=torch.float64), torch.randn(3, 4, 2, generator=gen, dtype=torch.float64)
    for g in (gen, [torch.Generator().manual_seed(i) for i in range(3)]):
        A2, B2 = _plugin_mutate(cfg, A, B, g)
        if not (torch.isfinite(A2).all() and torch.isfinite(B2).all()):
            raise plugins.PluginError("--mutation", value, f"{type(obj).__name__}.mutate() returned non-finite "
                                      "factors; expected finite A (n, r, d_in), B (n, d_out, r)")


plugins.group("mutation", "mutation operator", "--mutation", "molora.mutations", check_mutation_operator)
for _m in MUTATION_KINDS:   # the built-in kinds are dispatched above; registered so every name resolves one way
    plugins.register("mutation", _m, _m)
