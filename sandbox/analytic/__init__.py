"""The analytic sandbox: closed-form loss of a routed LoRA mixture and the `grad` / `evo` solvers.

Model. For an input of domain m with routing features h, the adapted map is
``W(h) = sum_k g_k(h) s B_k A_k`` (``s = alpha / r``), and the teacher is ``D_m = U_m V_m``. With
isotropic inputs ``x ~ N(0, I_d)``, ``E ||(W - D_m) x||^2 = ||W - D_m||_F^2``, so no x is sampled.
In Gram form (nothing of size d x d is formed):

    ||W - D_m||^2 = g^T G g - 2 g^T c_m + e_m
    G_kl  = s^2 tr((B_k^T B_l)(A_l A_k^T))        (K x K, from r x r blocks)
    c_mk  = s   tr((B_k^T U_m)(V_m A_k^T))        (r x r* blocks)
    e_m   = ||U_m V_m||_F^2 = 1

Features for domain m are ``c_m + context_noise * N(0, I_F)`` with `draws` fixed draws per domain
(common random numbers; `fresh_noise` draws a new set every step). Domain loss = mean over its
draws; the objective is the balanced (equal-weight) mean over domains; reported final losses use
separate evaluation draws (`eval_draws`), so a population search cannot overfit the draws it
selected on. Everything runs in float64 (losses near 0 cancel in ``gGg - 2gc + e``).

Arms, from the same task and the same initial weights per seed (common random numbers); the
events of evo, restart and oracle fall on the search's schedule (every `interval` steps, flag
``--search-every``); the lifecycle's on its own (`AnalyticConfig.life_interval`, by default the same):
* ``grad``: Adam on the router parameters, and on the adapter factors with learning rate
  ``lr * plasticity`` (0 freezes the adapters), for `steps` steps.
* ``evo``: the same steps plus, at every event, one generation of evolutionary search on the
  router parameters (`sandbox.evolution`, method `evo`; population P including the current
  parameters, so the search objective never gets worse). The router's Adam state is kept when a
  child is accepted (``reset_on_accept`` resets it for those seeds, the original behaviour). With
  `lifecycle` on, `sandbox.lifecycle.lifecycle_step` also runs on the adapters at its events,
  with leave-one-out fitness computed in Gram form.
* ``restart`` (control): the grad steps with the router's Adam state reset at every event, no
  search: what an optimiser restart alone does.
* ``acar`` (only with ``acar=True``, ``--acar``): sigma routing (ACAR, `sandbox.acar`)
  on the grad arm's final router and adapters: for each (domain, context draw) the top-3 slots of
  the router's logits, sigma from the agreement of their predictions, 1 / 2 / 3 of them gated
  equally; inference only (no gradient reaches it), so it follows the grad trajectory like the
  ceiling and its rows count the inputs gated with 1, 2 and 3 slots.
* ``oracle`` (ceiling, not a method): the exact best gates per domain (`sandbox.oracle`: on the
  simplex for softmax, in the box ``[0, 1]`` for sigmoid). With ``oracle="ceiling"`` (default) the
  arm follows the grad arm's trajectory and its final loss uses the best gates for grad's final
  adapters. Each domain's loss is a convex quadratic of the gates, so by Jensen the best constant
  gates beat any router's gates averaged over the feature draws: ``room = log loss_grad -
  log loss_oracle >= 0`` always, the most any routing could add to the gradient solution's
  adapters. ``oracle="replace"`` instead replaces the routing by the best gates at every event and
  trains the adapters under them: a stronger intervention, but not a ceiling (hard gates chosen
  for half-trained adapters lock in; measured below the grad arm at a = 0).
Loss evaluations are counted per arm (one per gradient step, P per generation, K + 1 per
lifecycle fitness pass); ``budget="evals"`` gives the grad arm extra steps to match evo's count.
A seed whose loss turns NaN/inf is marked diverged at that step and frozen; the others go on.

Modules, one concern each (everything is re-exported here, so ``from sandbox.analytic import X``
and ``sandbox.analytic.X`` keep working): `config` (`AnalyticConfig`, the arms), `gram` (the loss
in Gram form), `rows` (grid points stacked as rows, the shared start), `adam` (the per-row Adam),
`events` (a search generation, a lifecycle event), `oracle` (the best and ACAR gates of final
adapters), `solver` (`solve_rows`), `result` (`ArmResult`, results.csv rows) and `arms`
(`run_points`, `run_arms`).
"""

from sandbox.analytic.config import (ALL_ARMS, ARMS, BUDGETS, DTYPE, LOG_CLAMP, ORACLES, AnalyticConfig,
                                     evo_evaluations, router_config)
from sandbox.analytic.gram import (batch_domain_losses, batch_terms, domain_losses, gram_terms, leave_one_out,
                                   quadratic_loss, task_terms)
from sandbox.analytic.rows import Rows, Solver, State, group_key, initial_rows_state, initial_state, stack_rows
from sandbox.analytic.events import _generation, lifecycle_generator
from sandbox.analytic.oracle import _acar_losses
from sandbox.analytic.result import ArmResult, result_rows, split_result
from sandbox.analytic.solver import solve_rows
from sandbox.analytic.arms import CHUNK_ROWS, run_arms, run_points
from sandbox.tasks import make_task  # noqa: F401  (was importable from here)

__all__ = ["ALL_ARMS", "ARMS", "BUDGETS", "CHUNK_ROWS", "DTYPE", "LOG_CLAMP", "ORACLES", "AnalyticConfig",
           "ArmResult", "Rows", "Solver", "State", "batch_domain_losses", "batch_terms", "domain_losses",
           "evo_evaluations", "gram_terms", "group_key", "initial_rows_state", "initial_state", "leave_one_out",
           "lifecycle_generator", "quadratic_loss", "result_rows", "router_config", "run_arms", "run_points",
           "solve_rows", "split_result", "stack_rows", "task_terms"]
