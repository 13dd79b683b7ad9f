"""The analytic sandbox's settings: `AnalyticConfig` (the solver knobs, one CLI flag each), its arms
and budgets, and the router it builds (`router_config`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from sandbox import acar as acr
from sandbox import evolution as evo
from sandbox import lifecycle as lc
from sandbox.arms import arms_of
from sandbox.errors import require
from sandbox.identity import identity, later, rules, unless
from sandbox.router import RouterConfig, kind_of
from sandbox.tasks import TaskSpec


DTYPE = torch.float64
BUDGETS = ("steps", "evals")
#: The map's arms on the analytic sandbox (`sandbox.arms`: every one but acar), and with acar
#: (added by ``AnalyticConfig.acar``).
ARMS = arms_of("analytic", acar=False)
ALL_ARMS = arms_of("analytic", acar=True)
ORACLES = ("ceiling", "replace")
_EVAL_SALT = 1_000_003
#: The rule of the lifecycle operators added after ledgers were first written (`sandbox.identity`).
_OPERATOR = later("a lifecycle operator added after the first ledgers: left out at its built-in, the value "
                  "their points had")
LOG_CLAMP = 1e-12  # smallest loss taken to the log (not the loss floor): exact-fit losses cancel to ~1e-16 in float64


#: The search's defaults (population, mutation scale, interval), declared once on `EvolutionConfig`.
_SEARCH = evo.EvolutionConfig()


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
    population: int = _SEARCH.population
    """P: individuals per evolutionary generation (member 0 is the current router)."""
    mutation_scale: float = _SEARCH.mutation_scale
    """Step size in logit units: the initial sigma of es / cma, the fixed step of fixed."""
    interval: int = _SEARCH.interval
    """Gradient steps between generations of the routing search and between the events of the
    controls on its schedule (restarts, oracle replacements). Lifecycle events follow it unless
    --lifecycle-every is given. The flag is --search-every (the field keeps its earlier name, which
    point keys contain)."""
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
    death: str = field(default="least-fit", metadata=rules(_OPERATOR))
    """Lifecycle death: least-fit (the least fit slot that lived one interval dies), or a death plugin:
    a name in the entry point group molora.deaths or module:Name (docs/plugins.md)."""
    inherit_mode: str = field(default="blend", metadata=rules(_OPERATOR))
    """Lifecycle inheritance: blend (the dying adapter blended into its nearest neighbour), child (into
    the newborn), or an inheritance plugin: a name in molora.inheritances or module:Name (docs/plugins.md)."""
    reallocation: str = field(default="worst-domain", metadata=rules(_OPERATOR))
    """Lifecycle reallocation: worst-domain (the freed slot's router column from its parent's, pushed
    toward the worst domain), or a reallocation plugin: a name in molora.reallocations or module:Name
    (docs/plugins.md)."""
    batch: int = 0
    """0: train on the exact expected loss; n > 0: every gradient step and every search generation
    sees n fresh inputs x ~ N(0, I_d) per domain instead (an unbiased, noisy estimate: gradient and
    selection noise); reported losses stay exact."""
    acar: bool = field(default=False, metadata=rules(later("the acar arm came after the first ledgers: "
                                                                 "off, the point is named as before")))
    """Add the acar arm: sigma routing (ACAR) over the grad arm's final router (top-3 of its logits)
    and adapters, paired against grad; counts the inputs gated with 1, 2 and 3 slots."""
    acar_tol: float = field(default=acr.DEFAULT_TOL, metadata=rules(unless("acar", "read by the acar arm only")))
    """ACAR agreement tolerance: two slots' predictions agree when their RMS difference is at most
    this times the larger RMS prediction (`sandbox.acar`)."""
    lifecycle_every: int | None = field(default=None, metadata=rules(later(
        "lifecycle events on the search schedule (None) are the one schedule of earlier points")))
    """Gradient steps between lifecycle events of the evo arm (with --lifecycle); a slot must live
    this many steps to die. None: every `interval` steps, the one schedule of earlier runs (a value
    equal to `interval` is stored as None, so it names the same point)."""

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
        require(self.lifecycle_every is None or (isinstance(self.lifecycle_every, int)
                                                 and not isinstance(self.lifecycle_every, bool)
                                                 and 1 <= self.lifecycle_every <= 1_000_000),
                "lifecycle_every", self.lifecycle_every, "an integer in [1, 1000000]")
        if self.lifecycle_every == self.interval:   # one schedule: stored as earlier runs stored it
            object.__setattr__(self, "lifecycle_every", None)
        self.lifecycle_config  # validates the lifecycle options (selection, crossover, mutation, ...)

    def identity(self) -> dict:
        """The fields that name a point (ledger key, default folder): every field after its rules
        (`sandbox.identity`): the ACAR options only with the acar arm, the lifecycle operators and
        `lifecycle_every` only away from the values earlier points had."""
        return identity(self)

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms a sweep point runs: `ARMS`, and acar when `acar` is on."""
        return ALL_ARMS if self.acar else ARMS

    def scale(self, spec: TaskSpec) -> float:
        """The bank scale ``s = lora_alpha / rank``."""
        return self.lora_alpha / spec.rank

    @property
    def life_interval(self) -> int:
        """Gradient steps between lifecycle events: `lifecycle_every`, else `interval`."""
        return self.interval if self.lifecycle_every is None else self.lifecycle_every

    @property
    def evolution(self) -> evo.EvolutionConfig:
        return evo.EvolutionConfig(population=self.population, mutation_scale=self.mutation_scale,
                                   interval=self.interval, method=self.evo)

    @property
    def lifecycle_config(self) -> lc.LifecycleConfig:
        """The shared lifecycle on its own schedule (`life_interval`: by default the generation
        events); a slot must live one lifecycle interval to die."""
        return lc.LifecycleConfig(interval=self.life_interval, min_age=self.life_interval, scope=self.scope,
                                  selection=self.selection, crossover=self.crossover, crossover_t=self.crossover_t,
                                  mutation_kind=self.mutation, finetune_steps=self.finetune_steps,
                                  finetune_lr=self.finetune_lr, death_kind=self.death, inherit_mode=self.inherit_mode,
                                  reallocation_kind=self.reallocation)


def _num(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pos(x: object) -> bool:
    return _num(x) and x > 0


def router_config(spec: TaskSpec, cfg: AnalyticConfig) -> RouterConfig:
    """The shared router for this sandbox: F = context_dim, K = slots, anneal over `steps`."""
    return RouterConfig(kind=cfg.router, n_features=spec.context_dim, n_slots=spec.slots, anneal_steps=cfg.steps)


def evo_evaluations(spec: TaskSpec, cfg: AnalyticConfig) -> int:
    """Loss evaluations per seed of the evo arm: T + n_gen P (+ n_life (K + 1) with the lifecycle,
    every `life_interval` steps, which skips an event at the very last step)."""
    n_gen = cfg.steps // cfg.interval
    n_life = (cfg.steps - 1) // cfg.life_interval if cfg.steps else 0
    return cfg.steps + n_gen * cfg.population + (n_life * (spec.slots + 1) if cfg.lifecycle else 0)
