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
events of evo, restart and oracle fall on the same schedule (every `interval` steps):
* ``grad``: Adam on the router parameters, and on the adapter factors with learning rate
  ``lr * plasticity`` (0 freezes the adapters), for `steps` steps.
* ``evo``: the same steps plus, at every event, one generation of evolutionary search on the
  router parameters (`sandbox.evolution`, method `evo`; population P including the current
  parameters, so the search objective never gets worse). The router's Adam state is kept when a
  child is accepted (``reset_on_accept`` resets it for those seeds, the original behaviour). With
  `lifecycle` on, `sandbox.lifecycle.lifecycle_step` also runs on the adapters at those events,
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
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from sandbox import acar as acr
from sandbox import evolution as evo
from sandbox import lifecycle as lc
from sandbox import oracle as orc
from sandbox.errors import check, require
from sandbox.router import (RouterConfig, init_router_params, kind_of, params_to_vector, router_gates, router_logits,
                            vector_to_params)
from sandbox.streams import Purpose, generator
from sandbox.tasks import Task, TaskSpec, flat_teachers, initial_adapters, make_task, noisy_contexts

DTYPE = torch.float64
BUDGETS = ("steps", "evals")
ARMS = ("grad", "evo", "restart", "beta2", "oracle")
#: Every arm: the map's four and ``acar`` (added by ``AnalyticConfig.acar``).
ALL_ARMS = ARMS + ("acar",)
ORACLES = ("ceiling", "replace")
_EVAL_SALT = 1_000_003
LOSS_FLOOR = 1e-12  # clamp before log: exact-fit losses cancel to ~1e-16 in float64


@dataclass(frozen=True)
class AnalyticConfig:
    """Solver knobs. Field names are CLI flags (``mutation_scale`` is ``--mutation-scale``)."""

    steps: int = 150
    """T: gradient steps per arm (budget "steps")."""
    lr: float = 0.05
    """Adam learning rate of the router parameters (with tuning on, the centre the tuner's grid
    replaces: the grad arm's tuned value is what every arm runs at)."""
    beta2: float = 0.999
    """Adam's second-moment decay (every tensor, every arm but ``beta2``)."""
    control_beta2: float = 0.9
    """Adam beta2 of the ``beta2`` control arm: grad with a short second-moment memory and no reset,
    so the restart's effect (which zeroes that memory) is explained, not just measured."""
    accept_tol: float = 1e-3
    """A search generation counts as accepted (and, for es, replaces the router) only if it cuts
    the router's excess objective (loss minus the loss floor) by at least this share."""
    plasticity: float = 0.1
    """Adapter learning rate = lr * plasticity; 0 freezes the adapters (only routing moves). The
    default 0.1 follows the common MoE-LoRA practice of a faster router than adapters."""
    router: str = "softmax"
    """Router kind: softmax (B3 baseline), sigmoid (the rewrite, floor + annealed temperature), or a
    router plugin: a name in the entry point group molora.routers or module:Name (docs/plugins.md)."""
    evo: str = "es"
    """Routing search: es ((1+lambda)-ES, 1/5th rule), cma (CMA-ES via cmaes), fixed (unadapted steps),
    or a search plugin: a name in the entry point group molora.searches or module:Name (docs/plugins.md)."""
    population: int = 16
    """P: individuals per evolutionary generation (member 0 is the current router)."""
    mutation_scale: float = 0.1
    """Step size in logit units: the initial sigma of es / cma, the fixed step of fixed."""
    interval: int = 10
    """Gradient steps between generations (and restarts, oracle replacements, lifecycle events)."""
    reset_on_accept: bool = False
    """Reset the router's Adam state of a seed whose router the search replaced (off: kept)."""
    oracle: str = "ceiling"
    """Oracle arm: ceiling (best gates for the grad arm's final adapters, a true bound) or replace
    (routing replaced by the best gates at every event, adapters trained under them)."""
    lifecycle: bool = False
    """Run the adapter lifecycle (death, inheritance, mutation, reallocation) in the evo arm."""
    scope: str = "per-domain"
    """Lifecycle fitness scope: per-domain (leave-one-out, max over domains) or global."""
    budget: str = "steps"
    """steps: equal gradient steps; evals: the grad arm gets extra steps to match evo's evaluations."""
    draws: int = 8
    """Routing-feature noise draws per domain for the training objective (1 when noise is 0)."""
    eval_draws: int = 64
    """Fresh noise draws per domain for the reported final loss."""
    fresh_noise: bool = False
    """Draw new training noise every step instead of a fixed set."""
    lora_alpha: float = 4.0
    """LoRA alpha; the bank scale is s = lora_alpha / rank."""
    loss_floor: float = 0.01
    """Irreducible loss sigma^2 d added to every loss (teacher noise, like an entropy floor under
    log-PPL); keeps log losses finite and comparable when a fit is exact. 0 disables it."""
    selection: str = "tournament"
    """Lifecycle parent selection: tournament, or roulette (EvoMerge: fitness-proportional)."""
    crossover: str = "none"
    """Lifecycle crossover: none, or slerp (EvoMerge: a newborn is the SLERP of two fit parents)."""
    crossover_t: float | None = None
    """SLERP weight of the second parent in [0, 1]; none draws it U(0, 1) per newborn."""
    mutation: str = "svd"
    """Newborn mutation: svd, finetune (EvoMerge: gradient steps on its target domain, the newborn
    alone, on the closed-form loss), svd+finetune, or a mutation plugin: a name in the entry point
    group molora.mutations or module:Name (docs/plugins.md)."""
    finetune_steps: int = 1
    """Gradient steps of the fine-tune mutation."""
    finetune_lr: float = 0.01
    """Length of each fine-tune step in factor space (normalised gradient descent)."""
    batch: int = 0
    """0: train on the exact expected loss; n > 0: every gradient step and every search generation
    sees n fresh inputs x ~ N(0, I_d) per domain instead (an unbiased, noisy estimate: gradient and
    selection noise); reported losses stay exact."""
    acar: bool = False
    """Add the acar arm: sigma routing (ACAR) over the grad arm's final router (top-3 of its logits)
    and adapters, paired against grad; counts the inputs gated with 1, 2 and 3 slots."""
    acar_tol: float = acr.DEFAULT_TOL
    """ACAR agreement tolerance: two slots' predictions agree when their RMS difference is at most
    this times the larger RMS prediction (`sandbox.acar`)."""

    def __post_init__(self) -> None:
        require(isinstance(self.steps, int) and 0 <= self.steps <= 1_000_000, "steps", self.steps, "an integer in [0, 1000000]")
        require(_pos(self.lr) and self.lr <= 100, "lr", self.lr, "a number in (0, 100]")
        require(_num(self.beta2) and 0 <= self.beta2 < 1, "beta2", self.beta2, "a number in [0, 1)")
        require(_num(self.control_beta2) and 0 <= self.control_beta2 < 1, "control_beta2", self.control_beta2,
                "a number in [0, 1)")
        require(_num(self.accept_tol) and 0 <= self.accept_tol < 1, "accept_tol", self.accept_tol, "a number in [0, 1)")
        require(_num(self.plasticity) and 0 <= self.plasticity <= 100, "plasticity", self.plasticity, "a number in [0, 100]")
        kind_of(RouterConfig(kind=self.router))   # softmax, sigmoid or a router plugin (sandbox.plugins)
        require(isinstance(self.lifecycle, bool), "lifecycle", self.lifecycle, "true or false")
        require(isinstance(self.reset_on_accept, bool), "reset_on_accept", self.reset_on_accept, "true or false")
        require(self.oracle in ORACLES, "oracle", self.oracle, "ceiling or replace")
        require(self.budget in BUDGETS, "budget", self.budget, "steps or evals")
        require(self.scope in lc.SCOPES, "scope", self.scope, "per-domain or global")
        require(isinstance(self.draws, int) and 1 <= self.draws <= 4096, "draws", self.draws, "an integer in [1, 4096]")
        require(isinstance(self.eval_draws, int) and 1 <= self.eval_draws <= 65536, "eval_draws", self.eval_draws,
                "an integer in [1, 65536]")
        require(_pos(self.lora_alpha) and self.lora_alpha <= 1e6, "lora_alpha", self.lora_alpha, "a number in (0, 1e6]")
        require(_num(self.loss_floor) and 0 <= self.loss_floor <= 100, "loss_floor", self.loss_floor, "a number in [0, 100]")
        require(isinstance(self.acar, bool), "acar", self.acar, "true or false")
        require(isinstance(self.batch, int) and not isinstance(self.batch, bool) and 0 <= self.batch <= 65536,
                "batch", self.batch, "an integer in [0, 65536] (0: the exact expected loss)")
        require(_num(self.acar_tol) and 0 <= self.acar_tol <= 10, "acar_tol", self.acar_tol, "a number in [0, 10]")
        self.evolution  # validates evo, population, mutation_scale, interval
        self.lifecycle_config  # validates the lifecycle options (selection, crossover, mutation, ...)

    def identity(self) -> dict:
        """The fields that name a point (ledger key, default folder): every field, with the ACAR
        options left out while the acar arm is off, so keys from before they existed hold."""
        d = dataclasses.asdict(self)
        if not self.acar:
            d.pop("acar")
            d.pop("acar_tol")
        return d

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms a sweep point runs: the map's four, and acar when `acar` is on."""
        return ALL_ARMS if self.acar else ARMS

    def scale(self, spec: TaskSpec) -> float:
        """The bank scale ``s = lora_alpha / rank``."""
        return self.lora_alpha / spec.rank

    @property
    def evolution(self) -> evo.EvolutionConfig:
        return evo.EvolutionConfig(population=self.population, mutation_scale=self.mutation_scale,
                                   interval=self.interval, method=self.evo)

    @property
    def lifecycle_config(self) -> lc.LifecycleConfig:
        """The shared lifecycle at the generation events; a slot must live one interval to die."""
        return lc.LifecycleConfig(interval=self.interval, min_age=self.interval, scope=self.scope,
                                  selection=self.selection, crossover=self.crossover, crossover_t=self.crossover_t,
                                  mutation_kind=self.mutation, finetune_steps=self.finetune_steps,
                                  finetune_lr=self.finetune_lr)


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pos(x: object) -> bool:
    return _num(x) and x > 0


def router_config(spec: TaskSpec, cfg: AnalyticConfig) -> RouterConfig:
    """The shared router for this sandbox: F = context_dim, K = slots, anneal over `steps`."""
    return RouterConfig(kind=cfg.router, n_features=spec.context_dim, n_slots=spec.slots, anneal_steps=cfg.steps)


# ---------------------------------------------------------------------------------------------
# Closed-form loss
# ---------------------------------------------------------------------------------------------


def _per_row(x: float | Tensor, like: Tensor) -> float | Tensor:
    """A per-row value (a float, or a tensor ``(S,)`` over the leading batch dim of stacked grid
    points) shaped to broadcast against ``like (S, ...)``."""
    if not isinstance(x, Tensor):
        return x
    return x.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


class _GramTerms(torch.autograd.Function):
    """Unscaled ``G (B, K, K)`` and ``c (B, M, K)`` of flattened banks, with a hand-written backward.

    Inputs (batch dims flattened to one, B rows): ``Af (B, K r, d)`` (slot k's A in rows
    ``k r .. k r + r``), ``Btf (B, K r, d)`` (likewise B_k^T), ``Uf (B, d, M r*)`` (the U_m side by
    side) and ``Vf (B, M r*, d)`` (the V_m stacked). With ``GA = Af Af^T`` and ``GB = Btf Btf^T``
    (``K r x K r``), ``G_kl`` is the sum of the ``(k, l)`` block of ``GA * GB``; with
    ``X = Btf Uf`` (blocks ``B_k^T U_m``) and ``Y = Af Vf^T`` (blocks ``A_k V_m^T``), ``c_mk`` is the
    sum of the ``(k, m)`` block of ``X * Y``. Four batched matmuls forward and four backward on
    contiguous operands; block sums and spreads are matmuls with `_block_sums` (the big operand on
    the left, so matmul folds its batch without a copy). Autograd through the equivalent einsums
    paid six ``K r x d x K r`` matmuls, permuted copies of the factors and slow strided reductions
    per step, and handed Adam strided gradients (BENCHMARKS.md section 5c).

    Backward, from ``dG`` and ``dc`` (``GA``, ``GB`` symmetric): ``dAf = ((dG + dG^T) (x) GB) Af +
    (dc^T (x) X) Vf`` and ``dBtf = ((dG + dG^T) (x) GA) Btf + (dc^T (x) Y) Uf^T``, where ``(x)``
    spreads a ``K x K`` (or ``K x M``) matrix over the blocks and multiplies element-wise. Checked
    against autograd through the einsum form and against finite differences (`tests/test_analytic.py`).
    """

    @staticmethod
    def forward(ctx, Af: Tensor, Btf: Tensor, Uf: Tensor, Vf: Tensor, K: int, M: int):
        n, Kr, d = Af.shape
        r, rs = Kr // K, Uf.shape[-1] // M
        pk, pm = _block_sums(K, r, Af), _block_sums(M, rs, Af)          # (K, Kr), (M, M r*)
        GA = Af @ Af.transpose(-1, -2)                                   # (B, Kr, Kr)
        GB = Btf @ Btf.transpose(-1, -2)                                 # (B, Kr, Kr)
        G = pk @ ((GA * GB) @ pk.T)                                      # (B, K, K); the big operand left
        X = Btf @ Uf                                                     # (B, Kr, M r*)  blocks B_k^T U_m
        Y = Af @ Vf.transpose(-1, -2)                                    # (B, Kr, M r*)  blocks A_k V_m^T
        c = (pk @ ((X * Y) @ pm.T)).transpose(-1, -2)                    # (B, M, K)
        ctx.save_for_backward(Af, Btf, Uf, Vf, GA, GB, X, Y)
        ctx.blocks = (pk, pm)
        return G, c

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dG: Tensor, dc: Tensor):
        Af, Btf, Uf, Vf, GA, GB, X, Y = ctx.saved_tensors
        pk, pm = ctx.blocks
        dA = dBt = None
        if dG is not None:
            w = (pk.T @ (dG + dG.transpose(-1, -2))) @ pk                 # (B, Kr, Kr) spread over blocks
            dA = (GB * w) @ Af
            dBt = (GA * w) @ Btf
        if dc is not None:
            wc = (pk.T @ dc.transpose(-1, -2)) @ pm                       # (B, Kr, M r*)
            dY = X * wc
            dX = Y * wc
            dA = dY @ Vf if dA is None else dA.baddbmm_(dY, Vf)          # in place: no copy of dA
            dBt = dX @ Uf.transpose(-1, -2) if dBt is None else dBt.baddbmm_(dX, Uf.transpose(-1, -2))
        return dA, dBt, None, None, None, None


def _block_sums(K: int, r: int, like: Tensor) -> Tensor:
    """``(K, K r)`` zeros and ones: row k sums the r columns of block k (a reduction over a strided
    small dim as a matmul: several times faster than ``sum`` over such dims on the CPU)."""
    return torch.eye(K, dtype=like.dtype, device=like.device).repeat_interleave(r, dim=1)


def gram_terms(A: Tensor, B: Tensor, U: Tensor, V: Tensor, scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``G (*b, K, K)``, ``c (*b, M, K)``, ``e (*b, M)`` of the quadratic loss (module docstring).

    A ``(*b, K, r, d)``, B ``(*b, K, d, r)``, U ``(*b, M, d, r*)``, V ``(*b, M, r*, d)`` (batch
    dims broadcast); `scale` a float or a per-row tensor ``(S,)`` (stacked grid points). G and c
    come from `_GramTerms` (differentiable in A and B; U and V are constants). A B stored
    transposed, ``B = Bt.transpose(-1, -2)`` with ``Bt (*b, K, r, d)`` contiguous, is read without
    a copy (the solver keeps it so).
    """
    return _gram(A, B, *flat_teachers(U, V), scale)


def task_terms(A: Tensor, B: Tensor, task: Task, scale: float | Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`gram_terms` of `task`'s teachers, read from `Task.flat_teachers` (flattened once per task)
    when the task is already in A's dtype and device (the solver's copy, `_task_to`)."""
    if task.U.dtype != A.dtype or task.U.device != A.device:
        return gram_terms(A, B, task.U.to(A), task.V.to(A), scale)
    return _gram(A, B, *task.flat_teachers, scale)


def _gram(A: Tensor, B: Tensor, Uf: Tensor, Vf: Tensor, e: Tensor, scale: float | Tensor
          ) -> tuple[Tensor, Tensor, Tensor]:
    check(not (Uf.requires_grad or Vf.requires_grad), "teacher", "requires_grad", "constant U and V")
    K, r, d = A.shape[-3:]
    M = e.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-3], B.shape[:-3], Uf.shape[:-2], Vf.shape[:-2])
    Af = A.expand(*batch, K, r, d).reshape(-1, K * r, d)
    Btf = B.transpose(-1, -2).expand(*batch, K, r, d).reshape(-1, K * r, d)
    Uf = Uf.expand(*batch, *Uf.shape[-2:]).reshape(-1, *Uf.shape[-2:])
    Vf = Vf.expand(*batch, *Vf.shape[-2:]).reshape(-1, *Vf.shape[-2:])
    G, c = _GramTerms.apply(Af, Btf, Uf, Vf, K, M)
    G, c = G.view(*batch, K, K), c.view(*batch, M, K)
    G = _per_row(scale, G) ** 2 * G
    c = _per_row(scale, c) * c
    return G, c, e


def quadratic_loss(gates: Tensor, G: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """``g^T G g - 2 g^T c_m + e_m`` per draw: gates ``(*b, M, N, K)`` -> ``(*b, M, N)``.

    G ``(*b', K, K)``, c ``(*b', M, K)``, e ``(*b', M)`` broadcast against ``*b`` (e.g. a bank
    ``(S, 1)`` against a population of routers ``(S, P)``).
    """
    Gg = gates @ G.unsqueeze(-3)                                       # (*b, M, N, K)
    quad = (Gg * gates).sum(-1)                                        # (*b, M, N)
    lin = (gates * c.unsqueeze(-2)).sum(-1)                            # (*b, M, N)
    return quad - 2 * lin + e.unsqueeze(-1)


def leave_one_out(gates: Tensor, G: Tensor, c: Tensor, e: Tensor) -> Tensor:
    """Loss with slot k's gate set to 0, for every k: ``(*b, M, N, K)`` -> ``(*b, M, N, K)``.

    With ``g' = g - g_k e_k``: ``quad' = quad - 2 g_k (G g)_k + g_k^2 G_kk``, ``lin' = lin - g_k c_k``.
    """
    Gg = gates @ G.unsqueeze(-3)                                       # (*b, M, N, K)
    full = quadratic_loss(gates, G, c, e).unsqueeze(-1)                # (*b, M, N, 1)
    Gkk = torch.diagonal(G, dim1=-2, dim2=-1).unsqueeze(-2).unsqueeze(-2)   # (*b, 1, 1, K)
    return full - 2 * gates * Gg + gates ** 2 * Gkk + 2 * gates * c.unsqueeze(-2)


def domain_losses(rcfg: RouterConfig, params: dict[str, Tensor], A: Tensor, B: Tensor, task: Task,
                  features: Tensor, step: int, scale: float | Tensor, floor: float | Tensor = 0.0) -> Tensor:
    """Expected loss per domain ``(S, *p, M)``: mean over the feature draws of
    ``||W(h) - D_m||^2 + floor`` (floor = irreducible teacher noise ``sigma^2 d``).

    params with leading ``(S, *p)`` (``*p`` = a population dim or nothing), bank ``(S, K, ...)``,
    features ``(S, M, N, F)``.
    """
    S, M, N, F = features.shape
    extra = params["bias"].ndim - 2                                    # 1 with a population dim
    G, c, e = task_terms(A, B, task, scale)
    for _ in range(extra):
        G, c, e = G.unsqueeze(1), c.unsqueeze(1), e.unsqueeze(1)       # (S, 1, ...)
    feats = features.reshape(S, *([1] * extra), M * N, F)              # (S, [1,] M*N, F)
    gates = router_gates(rcfg, params, feats, step)                    # (S, [P,] M*N, K)
    gates = gates.reshape(*gates.shape[:-2], M, N, gates.shape[-1])    # (S, [P,] M, N, K)
    out = quadratic_loss(gates, G, c, e).mean(-1)                     # (S, [P,] M)
    return out + _per_row(floor, out)


def batch_terms(A: Tensor, B: Tensor, task: Task, scale: float | Tensor, X: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The quadratic loss's terms on a finite batch: ``(1/n) ||(W - D_m) X_m||_F^2 = g^T G_m g -
    2 g^T c_m + e_m`` with ``X (S, M, d, n)`` the inputs of each domain. Per domain, since each has
    its own inputs: ``G (S, M, K, K)``, ``c (S, M, K)``, ``e (S, M)``. With ``E[X X^T] = n I`` the
    expectation is `gram_terms` (tested by Monte Carlo).

    Block form, as in `_GramTerms`: with ``P = Af X / sqrt(n)`` (rows ``A_k X``) and ``GB = Btf Btf^T``,
    ``G_m`` is the block sum of ``GB * P P^T``; ``c_mk`` the block sum of ``(B_k^T U_m) * (P_k Q_m^T)``
    with ``Q = V_m X / sqrt(n)``; ``e_m = ||U_m Q_m||^2``. Batched matmuls only."""
    S, K, r, d = A.shape
    M, n = X.shape[1], X.shape[-1]
    Xs = X / math.sqrt(n)                                                    # (S, M, d, n)
    Af = A.reshape(S, 1, K * r, d)
    Btf = B.transpose(-1, -2).reshape(S, 1, K * r, d)
    U, V = task.U.to(A), task.V.to(A)                                        # (S, M, d, r*), (S, M, r*, d)
    pk = _block_sums(K, r, A)                                                # (K, K r)
    P = Af @ Xs                                                              # (S, M, K r, n)
    GB = Btf @ Btf.transpose(-1, -2)                                         # (S, 1, K r, K r)
    G = pk @ ((GB * (P @ P.transpose(-1, -2))) @ pk.T)                       # (S, M, K, K)
    Q = V @ Xs                                                               # (S, M, r*, n)
    c = ((Btf @ U) * (P @ Q.transpose(-1, -2))).sum(-1) @ pk.T               # (S, M, K)
    e = (U @ Q).pow(2).sum((-1, -2))                                         # (S, M)
    if isinstance(scale, Tensor):
        sc = scale.to(A.dtype).view(S, 1, 1)
        return sc[..., None] ** 2 * G, sc * c, e
    return scale ** 2 * G, scale * c, e


def batch_domain_losses(rcfg: RouterConfig, params: dict[str, Tensor], A: Tensor, B: Tensor, task: Task,
                        features: Tensor, step: int, scale: float | Tensor, X: Tensor) -> Tensor:
    """`domain_losses` on the finite batch `X` ``(S, M, d, n)`` instead of the expectation: ``(S, *p, M)``."""
    S, M, N, F = features.shape
    extra = params["bias"].ndim - 2
    G, c, e = batch_terms(A, B, task, scale, X)
    for _ in range(extra):
        G, c, e = G.unsqueeze(1), c.unsqueeze(1), e.unsqueeze(1)
    feats = features.reshape(S, *([1] * extra), M * N, F)
    gates = router_gates(rcfg, params, feats, step)
    gates = gates.reshape(*gates.shape[:-2], M, N, gates.shape[-1])           # (S, [P,] M, N, K)
    quad = torch.einsum("...mnk,...mkl,...mnl->...mn", gates, G, gates)
    lin = torch.einsum("...mnk,...mk->...mn", gates, c)
    return (quad - 2 * lin + e.unsqueeze(-1)).mean(-1)                      # (S, [P,] M)


# ---------------------------------------------------------------------------------------------
# Solvers
# ---------------------------------------------------------------------------------------------


@dataclass
class State:
    """Trainable state for S seeds: router params ``(S, ...)`` and bank A ``(S, K, r, d)``, B ``(S, K, d, r)``."""

    params: dict[str, Tensor]
    A: Tensor
    B: Tensor

    def clone(self) -> "State":
        return State({k: v.clone() for k, v in self.params.items()}, self.A.clone(), self.B.clone())

    def to(self, device: torch.device | str) -> "State":
        return State({k: v.to(device) for k, v in self.params.items()}, self.A.to(device), self.B.to(device))


def initial_state(task: Task, spec: TaskSpec, cfg: AnalyticConfig) -> State:
    """The shared starting point of both arms: pre-aligned bank and a fresh router, per seed."""
    scale = cfg.scale(spec)
    A, B = initial_adapters(task, spec, scale=scale)
    rcfg = router_config(spec, cfg)
    per_seed = [init_router_params(rcfg, (), generator(Purpose.ROUTER_INIT, s)) for s in task.seeds]
    params = {k: torch.stack([p[k] for p in per_seed]).to(DTYPE) for k in per_seed[0]}
    return State(params, A.to(DTYPE), B.to(DTYPE))


@dataclass
class ArmResult:
    """Outcome of one arm for S seeds (tensors over the seed dim)."""

    arm: str
    final_loss: Tensor          # (S,) balanced expected loss on the evaluation draws (nan if diverged)
    domain_loss: Tensor         # (S, M)
    initial_loss: Tensor        # (S,) same measure at the shared starting point
    loss_evals: int             # loss evaluations per seed
    grad_steps: int
    diverged: Tensor            # (S,) bool
    diverged_step: Tensor       # (S,) long, -1 if not diverged
    curve: Tensor               # (S, grad_steps) training objective per step
    generations: int = 0        # events on the arm's schedule (searches, restarts, oracle replacements)
    accepted: Tensor | None = None   # (S,) long: generations in which the search replaced the router
    step_size: Tensor | None = None  # (S,) the search's final step size (es / cma), logit units
    events: list = field(default_factory=list)
    modes: Tensor | None = None      # (S, 3) long: inputs gated with 1, 2, 3 slots (acar arm)
    excess: Tensor | None = None          # (S,) final loss minus the loss floor (computed without it)
    initial_excess: Tensor | None = None  # (S,) the same at the shared start
    half_excess: Tensor | None = None     # (S,) the same at half the step budget (convergence probe)
    oracle_excess: Tensor | None = None   # (S,) best constant gates for this arm's own final adapters
    search_gain: Tensor | None = None     # (S,) summed objective gains of the search's generations
    wall_s: float = float("nan")          # solver seconds of the rows this result covers

    def accepted_share(self) -> Tensor:
        """(S,) share of generations whose gain reached ``accept_tol`` (0 for non-search arms)."""
        S = self.final_loss.shape[0]
        if self.accepted is None or self.generations == 0:
            return torch.zeros(S, dtype=DTYPE)
        return self.accepted.to(DTYPE) / self.generations

    def lifecycle_events(self, seeds: Sequence[int]) -> list[int]:
        """Lifecycle events per seed, in the order of `seeds` (one grid point's result)."""
        return [sum(1 for ev in self.events if ev["seed"] == s) for s in seeds]


def evo_evaluations(spec: TaskSpec, cfg: AnalyticConfig) -> int:
    """Loss evaluations per seed of the evo arm: T + n_gen P (+ n_life (K + 1) with the lifecycle,
    which skips an event at the very last step)."""
    n_gen = cfg.steps // cfg.interval
    n_life = (cfg.steps - 1) // cfg.interval if cfg.steps else 0
    return cfg.steps + n_gen * cfg.population + (n_life * (spec.slots + 1) if cfg.lifecycle else 0)


def _features(rows: "Rows", salt: int, draws: int, device: torch.device | None = None) -> Tensor:
    """Routing features of every row ``(S, M, N, F)``: the contexts when the group is noise-free,
    else each point's own noise level on its own rows (each seed's own stream). Drawn on the CPU
    (the rows' task stays there), then moved to `device`."""
    if not rows.noisy:
        return rows.task.contexts[:, :, None, :].to(DTYPE).to(device)             # (S, M, 1, F)
    parts = [noisy_contexts(rows.part_task(i), spec.context_noise, draws, salt) for i, (spec, _) in
             enumerate(rows.parts)]
    return torch.cat(parts).to(DTYPE).to(device)                                   # (S, M, N, F)


class _Adam:
    """Adam with a per-seed step count, so a seed's moments can be reset on their own."""

    def __init__(self, tensors: dict[str, Tensor], lrs: dict[str, float | Tensor], S: int, betas=(0.9, 0.999),
                 eps=1e-8):
        """``betas[1]`` may be a per-row tensor ``(S,)`` (stacked tuning candidates)."""
        self.lrs, self.b1, self.b2, self.eps = lrs, betas[0], betas[1], eps
        self.m = {k: torch.zeros_like(v) for k, v in tensors.items()}
        self.v = {k: torch.zeros_like(v) for k, v in tensors.items()}
        self.t = {k: torch.zeros(S, dtype=DTYPE, device=v.device) for k, v in tensors.items()}

    @torch.no_grad()
    def step(self, tensors: dict[str, Tensor], grads: dict[str, Tensor], alive: Tensor) -> None:
        """One Adam step in place; rows not `alive` get no update (their step is 0, their step count
        stops; their moments, which nothing reads again, are not masked). Seven passes over each
        tensor (lerp_, mul_, addcmul_, sqrt, add_, mul, addcdiv_) and no host sync: at hundreds of
        stacked rows the adapter update is memory-bound, so every pass over the factors counts.
        The bias corrections are folded into per-row factors,
        ``lr / c1 * m / (sqrt(v / c2) + eps) = (lr sqrt(c2) / c1) * m / (sqrt(v) + eps sqrt(c2))``.
        Gradients must be finite (the solver zeroes non-finite entries first)."""
        live = alive.to(DTYPE)                                               # (S,)
        for k, g in grads.items():
            shape = (-1,) + (1,) * (g.ndim - 1)
            self.t[k] += live
            t = self.t[k].clamp_min(1)                                       # (S,)
            self.m[k].lerp_(g, 1 - self.b1)                                  # b1 m + (1 - b1) g
            if isinstance(self.b2, Tensor):                                  # per-row decay (S,)
                b2 = self.b2.view(shape)
                self.v[k].mul_(b2).addcmul_(g, g * (1 - b2))                 # b2 v + (1 - b2) g^2
            else:
                self.v[k].mul_(self.b2).addcmul_(g, g, value=1 - self.b2)    # b2 v + (1 - b2) g^2
            root = (1 - self.b2 ** t).sqrt()                                 # (S,) sqrt(c2)
            step = (self.lrs[k] * live * root / (1 - self.b1 ** t)).view(shape)
            denom = self.v[k].sqrt().add_((self.eps * root).view(shape))
            tensors[k].addcdiv_(self.m[k] * step, denom, value=-1.0)

    def reset(self, keys: Sequence[str], seeds_mask: Tensor) -> None:
        for k in keys:
            shape = (-1,) + (1,) * (self.m[k].ndim - 1)
            keep = (~seeds_mask).to(DTYPE)
            self.m[k].mul_(keep.view(shape))
            self.v[k].mul_(keep.view(shape))
            self.t[k].mul_(keep)


# ---------------------------------------------------------------------------------------------
# Grid points stacked on the batch dimension
# ---------------------------------------------------------------------------------------------


def group_key(spec: TaskSpec, cfg: AnalyticConfig) -> tuple[TaskSpec, AnalyticConfig]:
    """Points with equal keys share every tensor shape and schedule, so their rows can be stacked:
    the key is the point with its per-row knobs blanked, keeping whether routing noise is on (it
    sets the number of draws) and whether the adapters train (it sets the optimised tensors)."""
    s = dataclasses.replace(spec, alignment=0.0, overlap=0.0, context_noise=float(spec.context_noise > 0))
    c = dataclasses.replace(cfg, lr=1.0, plasticity=float(cfg.plasticity > 0), mutation_scale=1.0, loss_floor=0.0,
                            lora_alpha=1.0, beta2=0.999, control_beta2=0.9)
    return s, c


@dataclass
class Rows:
    """The rows (point, seed) of one or more grid points that share a `group_key`, stacked on the
    leading batch dim in point order; per-row knobs are tensors ``(S,)``."""

    task: Task
    parts: list                 # [(TaskSpec, AnalyticConfig)] per point, in row order
    sizes: list                 # rows per point
    scale: Tensor               # (S,) bank scale lora_alpha / rank
    floor: Tensor               # (S,) loss floor
    lr: Tensor                  # (S,) router learning rate
    adapter_lr: Tensor          # (S,) adapter learning rate lr * plasticity
    step0: Tensor               # (S,) initial search step (mutation_scale)
    beta2: Tensor               # (S,) Adam beta2 of the arms
    control_beta2: Tensor       # (S,) Adam beta2 of the beta2 control arm

    @property
    def spec(self) -> TaskSpec:
        return self.parts[0][0]

    @property
    def cfg(self) -> AnalyticConfig:
        return self.parts[0][1]

    @property
    def noisy(self) -> bool:
        return self.spec.context_noise > 0

    def bounds(self, i: int) -> tuple[int, int]:
        lo = sum(self.sizes[:i])
        return lo, lo + self.sizes[i]

    def part_task(self, i: int) -> Task:
        lo, hi = self.bounds(i)
        t = self.task
        return Task(U=t.U[lo:hi], V=t.V[lo:hi], contexts=t.contexts[lo:hi], assignment=t.assignment[lo:hi],
                    seeds=t.seeds[lo:hi])


def stack_rows(points: Sequence[tuple[TaskSpec, AnalyticConfig, Sequence[int]]],
               tasks: Sequence[Task] | None = None) -> Rows:
    """Stack points ``(spec, cfg, seeds)`` of one `group_key` into `Rows` (tasks drawn unless given)."""
    keys = {group_key(spec, cfg) for spec, cfg, _ in points}
    require(len(keys) == 1, "points", len(keys), "points of one group_key (equal shapes and schedules)")
    tasks = list(tasks) if tasks is not None else [make_task(spec, seeds) for spec, _, seeds in points]
    cat = lambda name: torch.cat([getattr(t, name) for t in tasks])               # noqa: E731
    task = Task(U=cat("U"), V=cat("V"), contexts=cat("contexts"), assignment=cat("assignment"),
                seeds=tuple(s for t in tasks for s in t.seeds))
    per_row = lambda f: torch.cat([torch.full((len(t.seeds),), float(f(spec, cfg)), dtype=DTYPE)  # noqa: E731
                                   for (spec, cfg, _), t in zip(points, tasks)])
    return Rows(task=task, parts=[(spec, cfg) for spec, cfg, _ in points], sizes=[len(t.seeds) for t in tasks],
                scale=per_row(lambda sp, c: c.scale(sp)), floor=per_row(lambda sp, c: c.loss_floor),
                lr=per_row(lambda sp, c: c.lr), adapter_lr=per_row(lambda sp, c: c.lr * c.plasticity),
                step0=per_row(lambda sp, c: c.mutation_scale), beta2=per_row(lambda sp, c: c.beta2),
                control_beta2=per_row(lambda sp, c: c.control_beta2))


def initial_rows_state(rows: Rows) -> State:
    """`initial_state` of every point, stacked: each point alone would start from the same."""
    states = [initial_state(rows.part_task(i), spec, cfg) for i, (spec, cfg) in enumerate(rows.parts)]
    return State({k: torch.cat([s.params[k] for s in states]) for k in states[0].params},
                 torch.cat([s.A for s in states]), torch.cat([s.B for s in states]))


def split_result(res: ArmResult, rows: Rows) -> list[ArmResult]:
    """One `ArmResult` per point of `rows` (row slices; events re-indexed to the point's rows)."""
    out = []
    per_seed = ("final_loss", "domain_loss", "initial_loss", "diverged", "diverged_step", "curve", "accepted",
                "step_size", "modes", "excess", "initial_excess", "half_excess", "oracle_excess", "search_gain")
    for i in range(len(rows.parts)):
        lo, hi = rows.bounds(i)
        evs = [{k: v for k, v in e.items() if k != "row"} for e in res.events if lo <= e["row"] < hi]
        sliced = {k: (None if getattr(res, k) is None else getattr(res, k)[lo:hi]) for k in per_seed}
        out.append(dataclasses.replace(res, events=evs, wall_s=res.wall_s * (hi - lo) / max(len(rows.task.seeds), 1),
                                       **sliced))
    return out


def solve_rows(rows: Rows, arm: str, state: State | None = None, with_ceiling: bool = False,
               with_acar: bool = False, device: torch.device | str | None = None,
               diagnostics: bool = True) -> ArmResult:
    """Run one arm for every row of `rows` (stacked grid points x seeds) at once.

    ``with_ceiling`` (grad arm only) also returns, as ``result.ceiling``, the ``oracle`` arm in
    ceiling mode: it follows the grad trajectory exactly, so it is the best gates for this run's
    final adapters, without running the same steps twice. ``with_acar`` (grad arm only) likewise
    returns the ``acar`` arm as ``result.acar`` (ACAR's gates on grad's final router and adapters).

    The loss floor is a constant: every gradient, search selection and lifecycle fitness is
    computed on the *excess* loss (loss minus the floor), so the trajectories do not depend on it
    bit for bit; the floor is added to the reported losses only. Besides the final losses, every
    arm records its excess at the start (``initial_excess``), at half the budget (``half_excess``,
    on the evaluation draws) and the excess of the best constant routing of its own final adapters
    (``oracle_excess``, `sandbox.oracle`: the per-arm routing room). The search arm records, per
    seed, its total gain on the objective (``search_gain``) and the generations whose gain was at
    least ``accept_tol`` of the router's excess objective (``accepted``).

    ``diagnostics=False`` (the tuner, which reads final losses only) skips the per-arm best routing
    (``oracle_excess`` is then None); the trajectory is the same.

    ``device`` (default CPU) holds the solver's tensors. `rows` and `state` stay on the CPU, where
    every random draw is made (per-seed CPU generators: the same numbers on any device), then
    moved; the result's tensors come back on the CPU."""
    check(arm in ALL_ARMS, "arm", arm, "one of " + ", ".join(ALL_ARMS))
    dev = torch.device("cpu") if device is None else torch.device(device)
    spec, cfg = rows.spec, rows.cfg
    task = _task_to(rows.task, dev)           # U, V in float64 once, not at every loss evaluation
    rcfg = router_config(spec, cfg)
    scale, floor = rows.scale.to(dev), rows.floor.to(dev)
    st = (state or initial_rows_state(rows)).to(dev).clone()
    # B lives transposed in memory, (S, K, r, d) contiguous: `gram_terms` reads it without a copy and
    # its gradient and Adam moments come out in the same layout (element-wise ops are layout-blind)
    st.B = st.B.transpose(-1, -2).contiguous().transpose(-1, -2)
    S = len(task.seeds)
    steps = cfg.steps
    ceiling = arm == "oracle" and cfg.oracle == "ceiling"   # the grad trajectory, best gates at the end
    ceiling = ceiling or arm == "acar"                      # the grad trajectory, ACAR's gates at the end
    plain = arm in ("grad", "beta2") or ceiling             # no events on the schedule
    if (arm == "grad" or ceiling) and cfg.budget == "evals":
        steps = evo_evaluations(spec, cfg)
    train_adapters = cfg.plasticity > 0
    draws = 1 if spec.context_noise == 0 else cfg.draws
    eval_feats = _features(rows, _EVAL_SALT, cfg.eval_draws, dev)
    fixed_feats = _features(rows, 0, draws, dev)

    with torch.no_grad():
        initial_ex = domain_losses(rcfg, st.params, st.A, st.B, task, eval_feats, 0, scale).mean(-1)   # (S,)

    tensors = dict(st.params)
    lrs = {k: rows.lr.to(dev) for k in st.params}
    if train_adapters:
        tensors.update(A=st.A, B=st.B)
        lrs.update(A=rows.adapter_lr.to(dev), B=rows.adapter_lr.to(dev))
    opt = _Adam(tensors, lrs, S, betas=(0.9, (rows.control_beta2 if arm == "beta2" else rows.beta2).to(dev)))
    ecfg = cfg.evolution
    gens = [generator(Purpose.EVO_SEARCH, s) for s in task.seeds]
    search = evo.init_search(ecfg, S, rcfg.n_params, gens, sigma0=rows.step0.to(dev)) if arm == "evo" else None
    gain = torch.zeros(S, dtype=DTYPE, device=dev)                      # search: summed objective gains
    accepted = torch.zeros(S, dtype=torch.long, device=dev)             # generations gaining >= accept_tol
    table = None            # oracle arm: (S, M, K) best gates per domain once the first event has run
    alive = torch.ones(S, dtype=torch.bool, device=dev)
    div_step = torch.full((S,), -1, dtype=torch.long, device=dev)
    curve = torch.full((S, steps), float("nan"), dtype=DTYPE, device=dev)
    half_ex = initial_ex.clone()
    evals, n_events, events = 0, 0, []
    pop = lc.Population.founders((S,), spec.slots, device=dev)

    bgens = [generator(Purpose.SANDBOX_BATCH, s) for s in task.seeds] if cfg.batch else []
    for t in range(steps):
        feats = _features(rows, t + 1, draws, dev) if (cfg.fresh_noise and draws > 1) else fixed_feats
        X = None
        if cfg.batch:   # this step's inputs, one stream per seed (drawn on the CPU): (S, M, d, n)
            X = torch.stack([torch.randn(spec.domains, spec.dim, cfg.batch, generator=g, dtype=DTYPE)
                             for g in bgens]).to(dev)
        leaves = {k: v.detach().requires_grad_(True) for k, v in tensors.items()}
        params = {k: leaves[k] for k in st.params}
        A = leaves.get("A", tensors.get("A", st.A))
        B = leaves.get("B", tensors.get("B", st.B))
        if table is None and X is not None:
            loss = batch_domain_losses(rcfg, params, A, B, task, feats, t, scale, X).mean(-1)   # (S,) noisy
        elif table is None:
            loss = domain_losses(rcfg, params, A, B, task, feats, t, scale).mean(-1)   # (S,) excess
        else:
            loss = _table_losses(table, A, B, task, scale).mean(-1)                      # (S,) excess
        evals += 1
        bad = ~torch.isfinite(loss) & alive
        div_step[bad] = t
        alive &= ~bad
        curve[:, t] = loss.detach() + floor
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(leaves[k]) if g is None else g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                 for k, g in zip(leaves, grads)}
        opt.step(tensors, grads, alive)
        if t + 1 == steps // 2:             # the excess at half the budget, on the evaluation draws
            half_ex = _eval_excess(rcfg, tensors, st, task, eval_feats, t + 1, scale, table)
        if plain or (t + 1) % ecfg.interval != 0 or t + 1 > cfg.steps:
            continue
        n_events += 1
        if arm == "restart":
            opt.reset(list(st.params), alive.clone())
        elif arm == "oracle":
            table = _oracle_table(rcfg, tensors, st, task, scale, table)
        else:
            took, g = _generation(task, rcfg, tensors, st, feats, t + 1, scale, ecfg, search, gens, alive,
                                  cfg.accept_tol, X)
            gain += g
            accepted += took.long()
            if cfg.reset_on_accept:
                opt.reset(list(st.params), took)
            evals += ecfg.population
            if cfg.lifecycle and t + 1 < steps:  # an event at the very end would leave no time to recover
                pop, evs = _lifecycle(task, rcfg, cfg, tensors, st, pop, feats, t + 1, scale, opt)
                events += evs
                evals += spec.slots + 1

    with torch.no_grad():
        params = {k: tensors[k] for k in st.params}
        A, B = tensors.get("A", st.A), tensors.get("B", st.B)
        if arm == "oracle":   # the ceiling for the final adapters, whatever the schedule
            table = _oracle_table(rcfg, tensors, st, task, scale, table)
            dom = _table_losses(table, A, B, task, scale)                                    # (S, M) excess
        elif arm == "acar":
            dom, modes = _acar_losses(params, A, B, task, eval_feats, scale, cfg.acar_tol)
        else:
            dom = domain_losses(rcfg, params, A, B, task, eval_feats, steps, scale)            # (S, M) excess
        best = _table_losses(_oracle_table(rcfg, tensors, st, task, scale, None), A, B, task, scale) \
            if (diagnostics or (with_ceiling and arm == "grad")) else None                     # (S, M)
    cpu = lambda x: None if x is None else x.detach().cpu()                # noqa: E731  (a no-op on the CPU)

    def result(name: str, dom_ex: Tensor, **kw) -> ArmResult:
        final, div, dstep, _ = _finish(dom_ex, alive, div_step, steps)
        ex = cpu(final)
        return ArmResult(name, ex + cpu(floor), cpu(dom_ex + _per_row(floor, dom_ex)), cpu(initial_ex + floor), evals,
                         steps, cpu(div), cpu(dstep), cpu(curve) if name == arm else cpu(curve.clone()),
                         excess=ex, initial_excess=cpu(initial_ex),
                         oracle_excess=None if best is None else cpu(best.mean(-1)),
                         half_excess=cpu(half_ex), **kw)

    res = result(arm, dom, generations=n_events, accepted=cpu(accepted) if search else None,
                 step_size=cpu(search.sigma.clone()) if search else None, events=events,
                 modes=cpu(modes) if arm == "acar" else None, search_gain=cpu(gain) if search else None)
    if with_ceiling and arm == "grad":
        res.ceiling = result("oracle", best)
    if with_acar and arm == "grad":
        with torch.no_grad():
            adom, amodes = _acar_losses(params, A, B, task, eval_feats, scale, cfg.acar_tol)
        res.acar = result("acar", adom, modes=cpu(amodes))
    return res


@torch.no_grad()
def _eval_excess(rcfg: RouterConfig, tensors: dict[str, Tensor], st: State, task: Task, feats: Tensor, step: int,
                 scale: Tensor, table: Tensor | None) -> Tensor:
    """The balanced excess ``(S,)`` of the current state on the evaluation draws under the routing
    that trains it: the router's gates, or the best-gate table of an oracle arm that replaces the
    routing (a convergence probe; the ceiling and acar arms follow grad's trajectory, so their
    probe is grad's, as it is when they are read off the grad run)."""
    A, B = tensors.get("A", st.A), tensors.get("B", st.B)
    if table is not None:
        return _table_losses(table, A, B, task, scale).mean(-1)
    return domain_losses(rcfg, {k: tensors[k] for k in st.params}, A, B, task, feats, step, scale).mean(-1)


def _task_to(task: Task, device: torch.device) -> Task:
    """The task's tensors on `device`, its factors U, V in the solver's float64 (an exact cast, done
    once instead of at every loss evaluation); the CPU original keeps drawing routing noise."""
    return dataclasses.replace(task, U=task.U.to(device, DTYPE), V=task.V.to(device, DTYPE),
                               contexts=task.contexts.to(device), assignment=task.assignment.to(device))


def _finish(dom: Tensor, alive: Tensor, div_step: Tensor, steps: int):
    """Final balanced loss ``(S,)`` (NaN for diverged rows), diverged flags, their steps, alive."""
    final = dom.mean(-1)
    bad = ~torch.isfinite(final) & alive
    div_step = div_step.clone()
    div_step[bad] = steps
    alive = alive & ~bad
    final = torch.where(alive, final, torch.full_like(final, float("nan")))
    return final, ~alive, div_step, alive


@torch.no_grad()
def _acar_losses(params: dict[str, Tensor], A: Tensor, B: Tensor, task: Task, feats: Tensor,
                 scale: float | Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Per-domain excess loss ``(S, M)`` under ACAR's gates (`sandbox.acar.analytic_gates`: top-3 of the
    router's logits per context draw, sigma from the candidates' agreement, equal gates) and the
    inputs gated with 1 / 2 / 3 slots per seed ``(S, 3)`` (over every domain and draw of `feats`)."""
    S, M, N, F = feats.shape
    G, c, e = task_terms(A, B, task, scale)
    logits = router_logits(params, feats.reshape(S, M * N, F))                       # (S, M*N, K)
    res = acr.analytic_gates(G, logits, tol)
    gates = res.gates.reshape(S, M, N, -1)                                           # (S, M, N, K)
    return quadratic_loss(gates, G, c, e).mean(-1), res.counts()                   # (S, M), (S, 3)


def _table_losses(table: Tensor, A: Tensor, B: Tensor, task: Task, scale: float | Tensor) -> Tensor:
    """Per-domain excess loss ``(S, M)`` of constant gates per domain ``table (S, M, K)`` (feature-free)."""
    G, c, e = task_terms(A, B, task, scale)
    return quadratic_loss(table.unsqueeze(-2), G, c, e).squeeze(-1)             # (S, M)


@torch.no_grad()
def _oracle_table(rcfg: RouterConfig, tensors: dict[str, Tensor], st: State, task: Task, scale: float | Tensor,
                  warm: Tensor | None) -> Tensor:
    """The exact best gates per domain for the current adapters: ``(S, M, K)`` (`sandbox.oracle`)."""
    A, B = tensors.get("A", st.A), tensors.get("B", st.B)
    G, c, _ = task_terms(A, B, task, scale)     # (S, K, K), (S, M, K)
    Gm = G.unsqueeze(1).expand(-1, c.shape[1], -1, -1)                               # (S, M, K, K)
    return orc.best_gates(Gm, c, orc.feasible_set(rcfg.kind), init=warm)


@torch.no_grad()
def _generation(task: Task, rcfg: RouterConfig, tensors: dict[str, Tensor], st: State, feats: Tensor, step: int,
                scale: float | Tensor, ecfg: evo.EvolutionConfig, search: evo.SearchState, gens: list, alive: Tensor,
                accept_tol: float, X: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One generation of routing search in place on `tensors`, on the excess objective (floor-free).

    Returns ``(accepted (S,) bool, gain (S,))``: ``gain`` = parent objective - new router's
    objective (es: >= 0, elitist; cma: its new mean, evaluated once more, may lose), ``accepted``
    where the gain is at least ``accept_tol`` of the parent's objective. For es a child replaces the
    parent only then, so a generation that is not accepted leaves the router unchanged."""
    params = {k: tensors[k] for k in st.params}
    x = params_to_vector(params)                                                     # (S, D)
    units = evo.mutation_scales(params) if ecfg.method == "fixed" else evo.logit_units(params)
    pop = evo.propose(x, params_to_vector(units), search, ecfg, gens)                # (S, P, D)
    A, B = tensors.get("A", st.A), tensors.get("B", st.B)

    def objective(p: dict[str, Tensor]) -> Tensor:    # (S, P): exact, or on the step's finite batch X
        if X is None:
            return domain_losses(rcfg, p, A, B, task, feats, step, scale).mean(-1)
        return batch_domain_losses(rcfg, p, A, B, task, feats, step, scale, X).mean(-1)

    obj = objective(vector_to_params(pop, rcfg))                                    # (S, P)
    parent = obj[:, 0]
    new, took = evo.advance(search, pop, obj, ecfg, active=alive, min_gain=accept_tol * parent)
    if ecfg.method == "cma":   # the new mean was not among the evaluated members
        now = objective(vector_to_params(new[:, None], rcfg))[:, 0]
    else:
        now = evo._finite_or_inf(obj).gather(1, evo.select(pop, obj)[1][:, None])[:, 0]
        now = torch.where(took, now, parent)
    g = torch.where(alive & torch.isfinite(now), parent - now, torch.zeros_like(parent))
    new = vector_to_params(new, rcfg)
    for k in st.params:
        tensors[k].copy_(new[k])
    return alive & (g >= accept_tol * parent) & (g > 0), g


def lifecycle_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of seed `seed`'s lifecycle event at `step`: a pure function of
    ``(seed, lifecycle stream, step)``, hashed by numpy's `SeedSequence` (no collisions in practice)."""
    return generator(Purpose.SANDBOX_LIFECYCLE, seed, step)


@torch.no_grad()
def _lifecycle(task: Task, rcfg: RouterConfig, cfg: AnalyticConfig, tensors: dict[str, Tensor], st: State,
               pop: lc.Population, feats: Tensor, step: int, scale: float | Tensor,
               opt: _Adam) -> tuple[lc.Population, list]:
    """One lifecycle event on the bank (in place on `tensors`), with leave-one-out fitness in Gram form.

    ``loo[s, k, m]`` = domain m's loss with slot k's gate zeroed (`leave_one_out`), so the fitness is
    ``agg_m (loo - full)`` (the loss floor cancels: both are excess losses). Each seed draws from its own generator (`lifecycle_generator`), so a
    seed's lifecycle does not depend on which seeds share its batch (resumed sweeps reproduce).
    Adam moments of replaced slots (bank and router columns) are zeroed.
    """
    lcfg = cfg.lifecycle_config
    params = {k: tensors[k] for k in st.params}
    A, B = tensors.get("A", st.A), tensors.get("B", st.B)
    S, M, N, F = feats.shape
    G, c, e = task_terms(A, B, task, scale)
    gates = router_gates(rcfg, params, feats.reshape(S, M * N, F), step).reshape(S, M, N, -1)   # (S, M, N, K)
    full = quadratic_loss(gates, G, c, e).mean(-1)                                             # (S, M) excess
    loo = leave_one_out(gates, G, c, e).mean(-2)                                               # (S, M, K)
    fit = lc.fitness(loo.transpose(-1, -2), full, lcfg.scope, lcfg.per_domain_agg)            # (S, K)
    gens = [lifecycle_generator(s, step) for s in task.seeds]

    def finetune_loss(fac, rp, target, k, gen):  # closed-form loss of each row's target domain (-1: all)
        Gf, cf, ef = task_terms(fac[0], fac[1], task, scale)
        gf = router_gates(rcfg, rp, feats.reshape(S, M * N, F), step).reshape(S, M, N, -1)
        per = quadratic_loss(gf, Gf, cf, ef).mean(-1)                                          # (S, M)
        return torch.where(target >= 0, per.gather(-1, target.clamp_min(0)[:, None])[:, 0], per.mean(-1))

    pop, (A2, B2), new_params, events = lc.lifecycle_step(pop, (A, B), params, fit, lcfg, gens, step,
                                                          domain_losses=full, domain_features=feats.mean(-2),
                                                          finetune=finetune_loss if lcfg.finetunes else None)
    mask = lc.reset_mask(events, (S,), A.shape[1], device=A.device)                                           # (S, K)
    A.copy_(A2)
    B.copy_(B2)
    for k in st.params:
        tensors[k].copy_(new_params[k])
    for k, m in opt.m.items():
        slot_mask = mask[:, None, :] if k == "W" else (mask[:, :, None, None] if k in ("A", "B") else mask)
        keep = (~slot_mask).to(m.dtype)
        m.mul_(keep)
        opt.v[k].mul_(keep)
    for ev in events:
        ev["row"] = ev.pop("batch")
        ev["seed"] = task.seeds[ev["row"]]
    return pop, events


def run_arms(spec: TaskSpec, cfg: AnalyticConfig, seeds: Sequence[int],
             arms: Sequence[str] | None = None) -> dict[str, ArmResult]:
    """The arms (default ``cfg.arms``) for every seed from one task and one shared initial state
    (common random numbers)."""
    return run_points([(spec, cfg, seeds)], arms)[0]


#: Default bound on the rows (point x seed) solved in one batch: memory grows with rows x P x M x N x K.
CHUNK_ROWS = 512


def run_points(points: Sequence[tuple[TaskSpec, AnalyticConfig, Sequence[int]]], arms: Sequence[str] | None = None,
               chunk_rows: int = CHUNK_ROWS, on_chunk=None, device: torch.device | str | None = None,
               diagnostics: bool = True) -> list[dict[str, ArmResult]]:
    """Every arm for many grid points ``(spec, cfg, seeds)``: points of one `group_key` are stacked
    on the batch dim (in chunks of at most `chunk_rows` rows; a larger point runs alone), so the
    per-operation overhead is paid once per chunk instead of once per point. Each point's rows see
    exactly what they would alone (per-seed streams, per-row knobs), so a point's results do not
    depend on which points share its batch (tested against one point at a time).

    ``arms``: the arms of every point (default: each point's ``cfg.arms``, acar included when on).
    ``on_chunk(indices, results)`` is called after each chunk with the point indices it solved.
    ``device`` holds the solver's tensors (`solve_rows`; default CPU); ``diagnostics`` as there.
    Returns one ``{arm: ArmResult}`` per point, in input order.
    """
    require(isinstance(chunk_rows, int) and chunk_rows >= 1, "chunk_rows", chunk_rows, "an integer >= 1")
    groups: dict = {}
    for i, (spec, cfg, _) in enumerate(points):
        groups.setdefault(group_key(spec, cfg), []).append(i)
    out: list = [None] * len(points)
    for idx in groups.values():
        chunk, size = [], 0
        for i in idx + [None]:
            n = len(points[i][2]) if i is not None else 0
            if chunk and (i is None or size + n > chunk_rows):
                rows = stack_rows([points[j] for j in chunk])
                state = initial_rows_state(rows)
                per_arm = {}
                chunk_arms = rows.cfg.arms if arms is None else tuple(arms)   # acar is in the group key
                shared = "grad" in chunk_arms and "oracle" in chunk_arms and rows.cfg.oracle == "ceiling"
                shared_acar = "grad" in chunk_arms and "acar" in chunk_arms
                for arm in chunk_arms:
                    if (shared and arm == "oracle") or (shared_acar and arm == "acar"):
                        continue                  # taken from the grad arm's run below
                    t0 = time.perf_counter()
                    res = solve_rows(rows, arm, state, with_ceiling=shared and arm == "grad",
                                     with_acar=shared_acar and arm == "grad", device=device,
                                     diagnostics=diagnostics)
                    res.wall_s = time.perf_counter() - t0
                    per_arm[arm] = split_result(res, rows)
                    if shared and arm == "grad":
                        res.ceiling.wall_s = 0.0        # its cost is inside the grad arm's
                        per_arm["oracle"] = split_result(res.ceiling, rows)
                    if shared_acar and arm == "grad":
                        res.acar.wall_s = 0.0           # likewise
                        per_arm["acar"] = split_result(res.acar, rows)
                for k, j in enumerate(chunk):
                    out[j] = {arm: per_arm[arm][k] for arm in chunk_arms}
                if on_chunk is not None:
                    on_chunk(list(chunk), [out[j] for j in chunk])
                chunk, size = [], 0
            if i is not None:
                chunk.append(i)
                size += n
    return out


def result_rows(results: dict[str, ArmResult], seeds: Sequence[int], extra: dict | None = None,
                settings: dict[str, dict] | None = None) -> list[dict]:
    """Tidy rows (one per seed x arm) with the results.csv columns of ARCHITECTURE.md.

    ``rel_excess`` = final excess / initial excess (the share of the start's reducible loss an arm
    leaves; the paired contrasts of summary.csv are differences of it, so no constant moves them),
    ``rel_half`` the same at half the budget, ``rel_oracle`` for the best routing of the arm's own
    final adapters, ``rel_gain`` the search's summed gain in the same units. ``settings`` (per arm)
    adds the optimiser setting an arm ran at (``lr``, ``adapter_lr``, ``beta2``)."""
    rows = []
    for arm, r in results.items():
        gens = max(r.generations, 1)
        life = r.lifecycle_events(seeds)
        for i, seed in enumerate(seeds):
            loss = float(r.final_loss[i])
            ex0 = float(r.initial_excess[i]) if r.initial_excess is not None else float("nan")
            rel = lambda x: float(x[i]) / ex0 if x is not None and ex0 > 0 else float("nan")   # noqa: E731
            rows.append({
                **(extra or {}), "seed": int(seed), "arm": arm,
                "final_loss": loss,
                "log_loss": math.log(max(loss, LOSS_FLOOR)) if math.isfinite(loss) else float("nan"),
                "rel_excess": rel(r.excess), "rel_half": rel(r.half_excess), "rel_oracle": rel(r.oracle_excess),
                "initial_excess": ex0,
                "loss_evals": r.loss_evals, "grad_steps": r.grad_steps,
                "diverged": bool(r.diverged[i]), "diverged_step": int(r.diverged_step[i]),
                "generations": r.generations,
                "accepted": float(r.accepted[i]) / gens if r.accepted is not None else 0.0,
                "rel_gain": rel(r.search_gain) if r.search_gain is not None else float("nan"),
                "step_size": float(r.step_size[i]) if r.step_size is not None else float("nan"),
                "lifecycle_events": life[i],
                "wall_s": r.wall_s / len(seeds),
                **((settings or {}).get(arm, {})),
                **(acr.usage(dict(zip(acr.MODES, r.modes[i].tolist()))) if r.modes is not None else {}),
            })
    return rows
