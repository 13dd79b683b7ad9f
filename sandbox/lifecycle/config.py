"""`LifecycleConfig` (factor L and the fitness scope, factor E), its option lists, the fine-tune
callback's type, and the mutation extension point the config validates (`MutationOperator`,
registered with `sandbox.plugins` as group ``mutation``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from sandbox import plugins
from sandbox.adapters import rand, randn
from sandbox.errors import require
from sandbox.identity import RUNS, later, rules
from sandbox.lifecycle.draws import Generators, _draw


SCOPES = ("global", "per-domain")
AGGS = ("max", "mean", "median")
MODES = ("blend", "child")
SELECTIONS = ("tournament", "roulette")
CROSSOVERS = ("none", "slerp")
MUTATION_KINDS = ("svd", "finetune", "svd+finetune")
DEATH_KINDS = ("least-fit",)
REALLOCATION_KINDS = ("worst-domain",)

FinetuneLoss = Callable[..., Tensor]
"""``loss(factors, router_params, target, k, generator) -> (*b,)``: the loss per batch element of the target
domain (``target (*b,)`` long, -1 = all domains) under the given adapter factors (same container
as the banks passed to `lifecycle_step`: a dict name -> ``(A, B)``, else one ``(A, B)`` tuple, in
the banks' shapes) and router parameters; ``k`` counts the fine-tune steps of the event (fresh
data per step); ``generator`` is the lifecycle's own (one, or one per row), for drawing that
data (so a run's draws stay a pure function of its lifecycle stream). Must be differentiable in
the factors."""


#: Identity rules (`sandbox.identity`) of the operators added after the first cell folders were written:
#: the EvoMerge options (a cell's run identity), and the death and reallocation plugins' kinds (every key
#: that holds a lifecycle, the map's included).
_EVOMERGE = later("an EvoMerge option added after the first cell folders: left out at the value those runs had",
                  views=RUNS)
_OPERATOR = later("an operator kind added after the first folders and ledgers: left out at the built-in, the "
                  "operator every earlier run had")


@dataclass(frozen=True)
class LifecycleConfig:
    """The lifecycle (factor L) and the fitness scope (factor E).

    Attributes:
        interval: steps between lifecycle events (`due`).
        n_die: most slots that die per event (at least one slot always survives).
        min_age: slots younger than this many steps never die.
        inherit_alpha: alpha of the inheritance blend, in [0, 1].
        inherit_mode: ``blend`` (dying -> nearest neighbour) or ``child`` (newborn = alpha dying
            + (1 - alpha) base), or an inheritance plugin (`sandbox.lifecycle.kinds.InheritanceOperator`:
            an entry point in molora.inheritances or module:Name).
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
        death_kind: which slots die: ``least-fit`` (the ``n_die`` least fit slots with ``age >=
            min_age``), or a death plugin (`sandbox.lifecycle.kinds.DeathOperator`: an entry point in
            molora.deaths or module:Name).
        reallocation_kind: where a freed slot's router column points: ``worst-domain`` (the parent's
            column plus noise, pushed toward the domain with the worst current loss), or a
            reallocation plugin (`sandbox.lifecycle.kinds.ReallocationOperator`: an entry point in
            molora.reallocations or module:Name).
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
    selection: str = field(default="tournament", metadata=rules(_EVOMERGE))
    crossover: str = field(default="none", metadata=rules(_EVOMERGE))
    crossover_t: float | None = field(default=None, metadata=rules(_EVOMERGE))
    mutation_kind: str = field(default="svd", metadata=rules(_EVOMERGE))
    finetune_steps: int = field(default=1, metadata=rules(_EVOMERGE))
    finetune_lr: float = field(default=0.01, metadata=rules(_EVOMERGE))
    death_kind: str = field(default="least-fit", metadata=rules(_OPERATOR))
    reallocation_kind: str = field(default="worst-domain", metadata=rules(_OPERATOR))

    def __post_init__(self):
        for name in ("interval", "n_die", "tournament"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, name, v, "an integer >= 1")
        require(isinstance(self.min_age, int) and self.min_age >= 0, "min_age", self.min_age, "an integer >= 0")
        require(_num(self.inherit_alpha) and 0 <= self.inherit_alpha <= 1, "inherit_alpha", self.inherit_alpha, "a number in [0, 1]")
        if self.inherit_mode not in MODES:   # an inheritance plugin that keeps the protocol, or one line
            plugins.resolve("inheritance", self.inherit_mode, "--inherit-mode")
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
        if self.death_kind not in DEATH_KINDS:   # likewise a death plugin ...
            plugins.resolve("death", self.death_kind, "--death")
        if self.reallocation_kind not in REALLOCATION_KINDS:   # ... and a reallocation plugin
            plugins.resolve("reallocation", self.reallocation_kind, "--reallocation")
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


class MutationOperator:
    """The mutation-operator protocol (duck-typed; this class documents it). ``--mutation`` takes
    an entry point name in ``molora.mutations`` or ``module:Name`` of an object with:

        mutate(A, B, cfg, generator) -> (A', B'): the newborn's factors from its parent's (after
            crossover, if any), one adapter per row: ``A (n, r, d_in)``, ``B (n, d_out, r)`` ->
            the same shapes. ``cfg`` is the `LifecycleConfig` (``mutation_sigma``, ``rotation``,
            ...); ``generator`` is one ``torch.Generator`` or a sequence of n (one per row): draw
            with `draw_normal` so a row's numbers depend on its own generator only.

    Parent selection stays the package's (death, inheritance and reallocation have extension
    points of their own, `sandbox.lifecycle.kinds`); the mutation's size is recorded as for SVD
    (``mutation_size`` in lifecycle.csv). Both systems call it (the analytic sandbox with rows =
    seeds x deaths, the transformer once per adapted layer).
    """

    def mutate(self, A: Tensor, B: Tensor, cfg: LifecycleConfig, generator: Generators) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def draw_normal(shape: tuple[int, ...], generator: Generators, like: Tensor) -> Tensor:
    """``N(0, 1)`` noise of ``shape = (n, ...)`` like `like` (dtype, device): one generator draws
    the whole shape, a sequence of n draws row i from generator i."""
    return _draw(randn, tuple(shape), generator, like.dtype, like.device)


def draw_uniform(shape: tuple[int, ...], generator: Generators, like: Tensor) -> Tensor:
    """``U(0, 1)`` numbers of ``shape = (n, ...)`` like `like`, drawn as `draw_normal` draws."""
    return _draw(rand, tuple(shape), generator, like.dtype, like.device)


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
