"""Evolutionary search on the routing channel: an elitist population search over router parameters.

One generation, for every seed at once (tensors ``(S, P, D)``; the arithmetic never loops over
seeds or individuals):

1. `propose`: member 0 is the current vector ``x`` (the parent, elitism); members ``p >= 1`` are
   ``x + step_p``, drawn by the method;
2. the caller evaluates all ``(S, P)`` members in one batched call (the search objective);
3. `advance`: for ``es`` and ``fixed`` the member with the lowest objective is taken (ties go to
   the lowest index, so the parent wins ties and the objective never gets worse; non-finite
   objectives never win); the method's state (its step size) is updated from the outcome.

Methods (``EvolutionConfig.method``, the CLI's ``--evo``):

* ``es`` (default): a (1+lambda)-ES with lambda = P - 1 and the 1/5th success rule. Step
  ``sigma_s * u * eps`` with ``eps ~ N(0, I_D)`` and ``u`` the per-parameter unit of `logit_units`,
  so ``sigma`` is in logit units: with unit-norm routing features each router logit moves by
  ``N(0, sigma^2)``. ``sigma`` is carried across generations per seed and adapted up and down,
  with no floor: ``sigma <- sigma exp((p_s - 1/5) / (damping (1 - 1/5)))``, where ``p_s`` is the
  share of the lambda children that beat the parent (the per-offspring form of Rechenberg's rule:
  above 1/5 successes the steps are too timid, below they overshoot).
* ``cma``: CMA-ES from the `cmaes` package (the library behind Optuna's CmaEsSampler), one
  instance per seed, in the coordinates of the step ``z`` from the current router (in logit
  units). It is the standard, non-elitist CMA-ES with its mean being the router: after `tell`
  the router moves to the library's new mean, and the library's mean is re-centred on a zero step
  in the new frame (the same point), so gradient steps between generations move the mean too.
  So `cma` changes the router at every generation and the objective may get worse (member 0 is
  evaluated for the record only). The ask/tell calls are per seed (the library holds one search
  each); the candidates of all seeds are still evaluated in one batched call.
* ``fixed``: the original mutation, ``x + mutation_scale * rms * eps`` with ``rms`` each tensor's
  own RMS floored at 1 (`mutation_scales`), never adapted. Kept for comparison: against a
  gradient-tuned router it is usually inert (no child ever wins).

Search kinds are an extension point (`sandbox.plugins`, group ``search``): ``--evo`` also takes
an entry point name in ``molora.searches`` or ``module:Name`` of an object with the `RoutingSearch`
ask/tell protocol (docs/plugins.md); the bookkeeping (accepted counts, masked seeds) stays here.

Randomness: one generator per seed (``es``/``fixed`` noise, the ``cma`` instance's seed), so a seed's
search does not depend on which other seeds share the batch (a resumed sweep reproduces).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from sandbox import plugins
from sandbox.errors import check, require

METHODS = ("es", "cma", "fixed")
TARGET_SUCCESS = 0.2   # the 1/5th rule


@dataclass(frozen=True)
class EvolutionConfig:
    """Evolutionary routing search. Field names are CLI flags."""

    population: int = 16
    """P: individuals per generation, including the current parameters (member 0)."""
    mutation_scale: float = 0.1
    """Step size in logit units: the initial sigma of es / cma, the fixed step of fixed (there in
    units of each parameter tensor's own scale, see `mutation_scales`)."""
    interval: int = 10
    """Gradient steps between two generations."""
    method: str = "es"
    """es: (1+lambda)-ES with the 1/5th success rule; cma: CMA-ES (cmaes); fixed: unadapted steps; or a
    search plugin (`RoutingSearch`: an entry point in molora.searches or module:Name)."""
    damping: float = 1.0
    """es: damping of the 1/5th rule (larger = slower step-size changes)."""

    def __post_init__(self) -> None:
        require(isinstance(self.population, int) and 2 <= self.population <= 4096, "population", self.population,
                "an integer in [2, 4096]")
        require(isinstance(self.mutation_scale, (int, float)) and math.isfinite(self.mutation_scale)
                and 0 < self.mutation_scale <= 100, "mutation_scale", self.mutation_scale, "a number in (0, 100]")
        require(isinstance(self.interval, int) and self.interval >= 1, "interval", self.interval, "an integer >= 1")
        if self.method not in METHODS:
            search_kind(self.method)   # a search plugin that keeps the protocol, or one line naming --evo
        check(isinstance(self.damping, (int, float)) and math.isfinite(self.damping) and self.damping > 0,
                "damping", self.damping, "a number > 0")
        if self.method == "cma":
            require(self.population >= 3, "population", self.population, "an integer >= 3 with --evo cma")


def mutation_scales(params: dict[str, Tensor], batch_ndim: int = 1, min_scale: float = 1.0) -> dict[str, Tensor]:
    """Per-parameter mutation scale of the ``fixed`` method: each tensor's RMS, at least `min_scale`.

    Returns tensors shaped like `params` (the scale broadcast over each tensor's entries).
    """
    out = {}
    for name, p in params.items():
        dims = tuple(range(batch_ndim, p.ndim))
        rms = p.detach().pow(2).mean(dim=dims, keepdim=True).sqrt()          # (*b, 1, ...)
        out[name] = rms.clamp_min(min_scale).expand_as(p)
    return out


def logit_units(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per-parameter unit that makes a step of 1 move each router logit by N(0, 1).

    A logit is ``z_k = h . W[:, k] + bias_k``; with ``||h|| = 1``, i.i.d. noise of size u on
    ``W[:, k]`` and on ``bias_k`` moves it by ``N(0, 2 u^2)``, so ``u = 1 / sqrt(2)``. The floor
    logit ``phi`` enters on its own: ``u = 1``. Returns tensors shaped like `params`.
    """
    return {k: torch.full_like(v, 1.0 if k == "phi" else 1 / math.sqrt(2)) for k, v in params.items()}


@dataclass
class SearchState:
    """What a search carries from one generation to the next, per seed."""

    sigma: Tensor                                   # (S,) step size in logit units (es, cma: last read)
    generations: int = 0
    accepted: Tensor | None = None                  # (S,) long: generations in which the parent was replaced
    cma: list = field(default_factory=list)         # one cmaes.CMA per seed (method cma)
    asked: list = field(default_factory=list)       # the cma steps of the pending generation
    unit: Tensor | None = None                      # (S, D) the step units of the pending cma generation
    plugin: Any = None                              # a search plugin's own state (`RoutingSearch.init`)


def init_search(cfg: EvolutionConfig, S: int, D: int, generators: Sequence[torch.Generator],
                dtype: torch.dtype = torch.float64, sigma0: Tensor | None = None) -> SearchState:
    """Fresh search state for S seeds and D router parameters; ``sigma0 (S,)`` overrides the
    initial step ``cfg.mutation_scale`` per seed (stacked grid points)."""
    check(len(generators) == S, "generators", len(generators), f"one per seed ({S})")
    sigma = torch.full((S,), float(cfg.mutation_scale), dtype=dtype) if sigma0 is None else sigma0.to(dtype).clone()
    state = SearchState(sigma=sigma, accepted=torch.zeros(S, dtype=torch.long, device=sigma.device))
    if cfg.method not in METHODS:
        state.plugin = search_kind(cfg.method).init(cfg, S, D, list(generators), dtype)
    if cfg.method == "cma":
        from cmaes import CMA

        for g, s0 in zip(generators, sigma.tolist()):
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
            state.cma.append(CMA(mean=np.zeros(D), sigma=float(s0), seed=seed, population_size=cfg.population - 1))
    return state


def propose(x: Tensor, unit: Tensor, state: SearchState, cfg: EvolutionConfig,
            generators: Sequence[torch.Generator]) -> Tensor:
    """Population ``(S, P, D)`` around ``x (S, D)``: member 0 is ``x``, members 1.. are its children.

    ``unit (S, D)`` is the per-parameter unit of a step (`logit_units`, or `mutation_scales` for
    ``fixed``); one generator per seed draws the ``(P - 1, D)`` noise.
    """
    S, D = x.shape
    check(len(generators) == S, "generators", len(generators), f"one per seed ({S})")
    lam = cfg.population - 1
    if cfg.method not in METHODS:
        kind = search_kind(cfg.method)
        pop = kind.ask(state.plugin, x, unit, cfg, list(generators))
        _check_population(cfg.method, type(kind).__name__, pop, x, cfg.population)
        return pop
    if cfg.method == "cma":
        state.asked = [np.stack([es.ask() for _ in range(lam)]) for es in state.cma]          # S x (lam, D)
        z = torch.as_tensor(np.stack(state.asked), dtype=x.dtype, device=x.device)           # (S, lam, D)
        state.unit = unit
        children = x[:, None, :] + unit[:, None, :] * z
    else:
        eps = torch.stack([torch.randn(lam, D, generator=g) for g in generators])          # (S, lam, D)
        eps = eps.to(dtype=x.dtype, device=x.device)
        size = state.sigma.to(x.dtype)[:, None, None]          # es: adapted; fixed: the constant step
        children = x[:, None, :] + size * unit[:, None, :] * eps                             # (S, lam, D)
    return torch.cat([x[:, None, :], children], dim=1)                                      # (S, P, D)


def select(population: Tensor, objective: Tensor) -> tuple[Tensor, Tensor]:
    """Best member per seed: ``population (S, P, D)``, ``objective (S, P)`` (lower is better).

    Non-finite objectives count as +inf; ``argmin`` returns the first minimum, so the current
    vector (member 0) wins ties. Returns ``(best (S, D), index (S,))``.
    """
    obj = _finite_or_inf(objective)
    idx = obj.argmin(dim=1)                                                                   # (S,)
    best = population.gather(1, idx[:, None, None].expand(-1, 1, population.shape[-1]))[:, 0]  # (S, D)
    return best, idx


def advance(state: SearchState, population: Tensor, objective: Tensor, cfg: EvolutionConfig,
            active: Tensor | None = None, min_gain: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Select and update the search state in place: returns ``(new x (S, D), took (S,) bool)``.

    ``took`` marks the seeds whose parent was replaced by a strictly better child; ``active (S,)``
    (default all) masks seeds that no longer search (diverged): they keep their parent and state.
    ``min_gain`` (a number or ``(S,)``; es and fixed) is the least objective gain over the parent
    for a child to replace it: a change too small to matter is not made (and not counted).
    """
    S = population.shape[0]
    active = torch.ones(S, dtype=torch.bool, device=population.device) if active is None else active
    if cfg.method not in METHODS:   # a plugin decides; the package keeps the record and the masks
        kind = search_kind(cfg.method)
        new, took = kind.tell(state.plugin, population, objective, cfg, active)
        _check_told(cfg.method, type(kind).__name__, new, took, S, population.shape[-1])
        took = took.to(device=population.device) & active
        new = torch.where(active[:, None], new.to(population), population[:, 0])
        state.generations += 1
        state.accepted += took.long()
        return new, took
    best, idx = select(population, objective)
    took = (idx != 0) & active
    if min_gain is not None and cfg.method != "cma":
        obj = _finite_or_inf(objective)
        took &= (obj[:, 0] - obj.gather(1, idx[:, None])[:, 0]) >= min_gain
    new = torch.where(took[:, None], best, population[:, 0])
    obj = _finite_or_inf(objective)
    state.generations += 1
    if cfg.method == "es":
        p_s = (obj[:, 1:] < obj[:, :1]).to(state.sigma.dtype).mean(1)                      # (S,)
        factor = torch.exp((p_s - TARGET_SUCCESS) / (cfg.damping * (1 - TARGET_SUCCESS)))
        state.sigma = torch.where(active, state.sigma * factor, state.sigma)
    elif cfg.method == "cma":
        new = population[:, 0].clone()
        took = torch.zeros(S, dtype=torch.bool, device=new.device)
        for s, es in enumerate(state.cma):
            if not bool(active[s]):
                continue
            vals = obj[s, 1:].double().cpu().numpy()
            worst = vals[np.isfinite(vals)].max(initial=0.0)
            vals = np.where(np.isfinite(vals), vals, worst + 1e6)     # a non-finite child ranks last
            es.tell(list(zip(state.asked[s], vals.tolist())))
            step = torch.as_tensor(es.mean, dtype=new.dtype, device=new.device)       # (D,) the new mean
            new[s] = population[s, 0] + state.unit[s] * step
            took[s] = bool((step != 0).any())
            # The router is now the mean: re-centre the library's mean on a zero step. `mean` is
            # the library's own array (not a copy); a test checks that this takes effect.
            es.mean[:] = 0.0
            state.sigma[s] = float(getattr(es, "_sigma", state.sigma[s]))   # for the record only
        state.accepted += took.long()
        return new, took
    state.accepted += took.long()
    return new, took


def _finite_or_inf(objective: Tensor) -> Tensor:
    return torch.where(torch.isfinite(objective), objective, torch.full_like(objective, float("inf")))


# ---------------------------------------------------------------------------------------------
# Search kinds: the protocol and its check
# ---------------------------------------------------------------------------------------------


class RoutingSearch:
    """The routing-search protocol (duck-typed; this class documents it): ask/tell over the
    router's flat parameter vector (`sandbox.router.params_to_vector`), for S seeds at once.

    Members:
        init(cfg, S, D, generators, dtype) -> state: the search's own state for S seeds and D
            router parameters (anything; passed back to ask and tell). ``generators``: one
            ``torch.Generator`` per seed, the only randomness a search may use (so a resumed run
            reproduces). ``cfg`` is the `EvolutionConfig` (population P, mutation_scale, ...).
        ask(state, x, unit, cfg, generators) -> population ``(S, P, D)``: member 0 must be the
            current vector ``x (S, D)`` (the parent); ``unit (S, D)`` is the step that moves each
            router logit by about 1 (`logit_units`).
        tell(state, population, objective, cfg, active) -> ``(new x (S, D), took (S,) bool)``:
            ``objective (S, P)`` is the search loss of every member (lower is better, non-finite
            for a diverged member); ``active (S,)`` masks seeds that no longer search. ``took``
            marks the seeds whose router the search changed (counted as accepted generations).
    The package masks inactive seeds and counts generations and acceptances itself.
    """

    def init(self, cfg: EvolutionConfig, S: int, D: int, generators: list, dtype: torch.dtype) -> Any:
        raise NotImplementedError

    def ask(self, state: Any, x: Tensor, unit: Tensor, cfg: EvolutionConfig, generators: list) -> Tensor:
        raise NotImplementedError

    def tell(self, state: Any, population: Tensor, objective: Tensor, cfg: EvolutionConfig,
             active: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def search_kind(method: str) -> RoutingSearch:
    """The search plugin ``method`` names (entry point in ``molora.searches`` or ``module:Name``)."""
    return plugins.resolve("search", method, "--evo")


def _fail(value: str, problem: str):
    raise plugins.PluginError("--evo", value, problem)


def _check_population(value: str, name: str, pop, x: Tensor, P: int) -> None:
    S, D = x.shape
    if not isinstance(pop, Tensor) or tuple(pop.shape) != (S, P, D):
        got = tuple(pop.shape) if isinstance(pop, Tensor) else type(pop).__name__
        _fail(value, f"{name}.ask() returned {got}; expected the population (S, P, D) = {(S, P, D)}")
    if not torch.equal(pop[:, 0].to(x), x):
        _fail(value, f"{name}.ask() changed member 0; expected population[:, 0] to be the current vector x (S, D)")


def _check_told(value: str, name: str, new, took, S: int, D: int) -> None:
    if not isinstance(new, Tensor) or tuple(new.shape) != (S, D):
        got = tuple(new.shape) if isinstance(new, Tensor) else type(new).__name__
        _fail(value, f"{name}.tell() returned new x of shape {got}; expected (S, D) = {(S, D)}")
    if not isinstance(took, Tensor) or took.dtype != torch.bool or tuple(took.shape) != (S,):
        got = (tuple(took.shape), str(took.dtype)) if isinstance(took, Tensor) else type(took).__name__
        _fail(value, f"{name}.tell() returned took {got}; expected a bool tensor (S,) = {(S,)}")


def check_search_kind(obj, value: str) -> None:
    """Probe a search plugin once (S = 2 seeds, D = 5 parameters, P = 4)."""
    name = type(obj).__name__
    for m in ("init", "ask", "tell"):
        if not callable(getattr(obj, m, None)):
            _fail(value, f"{name} has no {m}() method; expected the ask/tell protocol (init, ask, tell; docs/plugins.md)")
    cfg = EvolutionConfig(population=4, method=value)
    S, D = 2, 5
    gens = [torch.Generator().manual_seed(i) for i in range(S)]
    state = obj.init(cfg, S, D, gens, torch.float64)
    x = torch.randn(S, D, generator=gens[0], dtype=torch.float64)
    pop = obj.ask(state, x, torch.ones_like(x), cfg, gens)
    _check_population(value, name, pop, x, cfg.population)
    objective = torch.rand(S, cfg.population, generator=gens[1], dtype=torch.float64)
    new, took = obj.tell(state, pop, objective, cfg, torch.ones(S, dtype=torch.bool))
    _check_told(value, name, new, took, S, D)


plugins.group("search", "routing search", "--evo", "molora.searches", check_search_kind)
for _m in METHODS:   # the built-in methods are dispatched here; registered so every name resolves one way
    plugins.register("search", _m, _m)
