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
2. **death** (``least-fit``): the ``n_die`` least fit slots with ``age >= min_age`` die; at least one
   slot survives.
3. **inheritance** (``blend``): a dying slot's update is blended into its nearest surviving
   neighbour (largest cosine of the updates, summed over layers),
   ``N <- (1 - alpha) N + alpha D``, re-factorised to rank r; ``alpha = 0`` changes nothing.
   (``child``): the newborn in the freed slot is ``alpha D + (1 - alpha) base`` instead.
4. **birth / SVD mutation**: the freed slot gets a new id and a clone of a fit parent (tournament
   among survivors), mutated in its SVD basis: singular values times ``exp(sigma eps)``, singular
   vectors turned by a random rotation ``expm(Omega)`` (skew-symmetric ``Omega``; each vector turns
   by about ``rotation`` radians), rank <= r. With mutation off the base is a fresh LoRA init
   (zero update, trainable A).
5. **reallocation** (``worst-domain``): the freed slot's router column, bias and floor logit are
   copied from the parent with noise, and the column is pushed toward the domain with the worst
   current loss.

Death, inheritance, mutation and reallocation are extension points: the built-in kinds above are
registered by name with `sandbox.plugins` beside plugins (`kinds`: ``--death``, ``--inherit-mode``,
``--reallocation``; `config`: ``--mutation``; docs/plugins.md).

Deaths are processed in order of fitness, one death rank at a time, vectorised over the batch
(a Python loop over at most ``n_die`` ranks, never over seeds or slots).

Randomness: every operator takes either one ``torch.Generator`` for the whole (flattened) batch or a
sequence of n generators, one per batch element in row-major order. With a sequence, row i's draws
come from generator i alone (`_draw`, `_multinomial`: a loop over rows for the draws only, the maths
stays batched), so a seed's result does not depend on which other seeds share its batch.

Modules, one concern each (everything is re-exported here, so ``from sandbox.lifecycle import X``
keeps working): `config` (`LifecycleConfig`, the mutation extension point), `draws` (one generator
or one per row), `population` (ids and ages, fitness, death order, parent selection), `operators`
(blend, SLERP, SVD mutation, the built-in reallocation, Adam-state resets), `kinds` (the death,
inheritance and reallocation extension points: protocols, built-ins, probes, checked calls) and
`step` (`lifecycle_step`, `event_rows`).
"""

from sandbox.lifecycle.config import (AGGS, CROSSOVERS, DEATH_KINDS, MODES, MUTATION_KINDS, REALLOCATION_KINDS, SCOPES,
                                      SELECTIONS, FinetuneLoss, LifecycleConfig, MutationOperator,
                                      check_mutation_operator, draw_normal, draw_uniform, mutation_operator)
from sandbox.lifecycle.draws import Generators
from sandbox.lifecycle.population import (Population, _death_order, fitness, loo_gates, roulette_parent,
                                          roulette_weights, select_parent, tournament_parent)
from sandbox.lifecycle.operators import (blend, fresh_factors, mutate_svd, point_at_worst_domain, reset_adam_state,
                                         reset_mask, slerp_factors)
from sandbox.lifecycle.kinds import (DeathOperator, InheritanceOperator, ReallocationOperator, death_operator,
                                     inheritance_operator, reallocate, reallocation_operator)
from sandbox.lifecycle.step import DeathRank, event_rows, lifecycle_step

__all__ = ["AGGS", "CROSSOVERS", "DEATH_KINDS", "MODES", "MUTATION_KINDS", "REALLOCATION_KINDS", "SCOPES", "SELECTIONS",
           "DeathOperator", "DeathRank", "FinetuneLoss", "Generators", "InheritanceOperator", "LifecycleConfig",
           "MutationOperator", "Population", "ReallocationOperator", "blend", "check_mutation_operator",
           "death_operator", "draw_normal", "draw_uniform", "event_rows", "fitness", "fresh_factors",
           "inheritance_operator", "lifecycle_step", "loo_gates", "mutate_svd", "mutation_operator",
           "point_at_worst_domain", "reallocate", "reallocation_operator", "reset_adam_state", "reset_mask",
           "roulette_parent", "roulette_weights", "select_parent", "slerp_factors", "tournament_parent"]
