"""What a router is: `RouterConfig` (its settings and their limits), the `RouterKind` protocol
its ``kind`` names, `kind_of` (the name resolved through `sandbox.plugins`) and `_fail` (the
one-line error naming ``--router`` of a plugin that breaks the protocol)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import Tensor

from sandbox import plugins
from sandbox.errors import check, require
from sandbox.identity import RUNS, later, rules

KINDS = ("softmax", "sigmoid")
INITS = ("zero", "mass")
SCHEDULES = ("linear", "cosine", "exp")
TAU_SCALES = ("logit", "input")
PARAM_ORDER = ("W", "bias", "phi")  # the flat-vector layout of `params_to_vector`


@dataclass(frozen=True)
class RouterConfig:
    """A router.

    Attributes:
        kind: ``softmax`` (B3 baseline) or ``sigmoid`` (the rewrite).
        n_features: F, width of the routing features.
        n_slots: K, number of adapter slots.
        floor_max: upper bound of every sigmoid floor, ``f = floor_max * sigmoid(phi)``.
        tau_start: sigmoid temperature at step 0.
        tau_end: sigmoid temperature at ``anneal_steps`` and after.
        tau_min: lower clamp on the temperature, applied at every step.
        tau_max: upper clamp on the temperature, applied at every step.
        anneal_steps: length of the anneal (0 = ``tau_end`` from the start); None leaves it to the
            owner to resolve before use (a cell anneals over its run's steps), and `temperature`
            refuses it.
        schedule: ``linear``, ``cosine`` (default) or ``exp`` (geometric) interpolation.
        init_std: initial ``W ~ N(0, init_std^2 / F)`` (small, so gates start near uniform).
        phi_init: initial floor logit (0 gives ``floor_max / 2``).
        init: how the sigmoid router's bias starts. ``zero`` (the class default, and the analytic
            sandbox's behaviour): ``bias = 0``, so every gate starts near ``f + (1 - f) / 2`` and the
            total gate weight per token is about ``K (1 + f) / 2`` (8.4 for K = 16, f = 0.05).
            ``mass``: a fair start against the softmax (`mass_init`): the bias (and, only when the
            floors alone would exceed it, the floor logit) is set so that the expected total gate
            weight per token at step 0 is ``init_mass``. Softmax routers ignore it (their total is 1).
        init_mass: target total gate weight per token at step 0 for ``init = mass``; 1 = the
            softmax's, in ``(0, K)``.
        tau_scales: what the sigmoid temperature divides. ``logit`` (the class default: the analytic
            sandbox's, and every transformer run before the option): the whole logit,
            ``sigmoid((h W + b) / tau)``; with a ``mass`` start the bias is ``tau(0) logit(p)``, so the
            anneal multiplies the start's logit by ``tau(0) / tau``: from 2 to 0.5, a 1/16 start
            (-3.4) becomes ``sigmoid(-13.6) ~ 1e-6`` and every gate ends on its floor. ``input`` (a
            cell's default): only the input-dependent part, ``sigmoid(b + h W / tau)``; the bias holds
            the operating point (the ``mass`` start's ``logit(p)``) through the anneal, which sharpens
            how the gates respond to the input.
    """

    kind: str = "sigmoid"
    n_features: int = 16
    n_slots: int = 16
    floor_max: float = 0.1
    tau_start: float = 2.0
    tau_end: float = 0.5
    tau_min: float = 0.25
    tau_max: float = 4.0
    anneal_steps: int | None = 1000
    schedule: str = "cosine"
    init_std: float = 0.1
    phi_init: float = 0.0
    init: str = field(default="zero", metadata=rules(later("a cell's --router-init: zero, the start of every "
                                                            "run before the option", views=RUNS)))
    init_mass: float = 1.0
    tau_scales: str = field(default="logit", metadata=rules(later("a cell's --tau-scales: logit, the anneal of "
                                                                  "every run before the option", views=RUNS)))

    def __post_init__(self):
        kind_of(self)   # a built-in name, or a plugin that keeps the protocol (else one line naming --router)
        check(isinstance(self.n_features, int) and self.n_features >= 1, "n_features", self.n_features, "an integer >= 1")
        check(isinstance(self.n_slots, int) and self.n_slots >= 1, "n_slots", self.n_slots, "an integer >= 1")
        require(_finite(self.floor_max) and 0 <= self.floor_max < 1, "floor_max", self.floor_max, "a number in [0, 1)")
        for name in ("tau_start", "tau_end", "tau_min", "tau_max"):
            v = getattr(self, name)
            require(_finite(v) and v > 0, name, v, "a number > 0")
        require(self.tau_min <= self.tau_max, "tau_min", self.tau_min, f"a number <= --tau-max ({self.tau_max})")
        require(self.anneal_steps is None or (isinstance(self.anneal_steps, int) and self.anneal_steps >= 0), "anneal_steps",
                self.anneal_steps, "an integer >= 0")
        check(self.schedule in SCHEDULES, "schedule", self.schedule, "one of " + ", ".join(SCHEDULES))
        check(_finite(self.init_std) and self.init_std >= 0, "init_std", self.init_std, "a number >= 0")
        check(_finite(self.phi_init), "phi_init", self.phi_init, "a finite number")
        require(self.init in INITS, "router_init", self.init, "one of " + ", ".join(INITS))
        require(self.tau_scales in TAU_SCALES, "tau_scales", self.tau_scales, "one of " + ", ".join(TAU_SCALES))
        check(_finite(self.init_mass) and self.init_mass > 0, "init_mass", self.init_mass, "a number > 0")
        check(self.kind != "sigmoid" or self.init != "mass" or self.init_mass < self.n_slots, "init_mass",
                self.init_mass, f"a number in (0, K = {self.n_slots}) for a sigmoid router with --router-init mass")

    @property
    def param_names(self) -> tuple[str, ...]:
        if self.kind in KINDS:
            return PARAM_ORDER if self.kind == "sigmoid" else PARAM_ORDER[:2]
        return _order(kind_of(self).param_shapes(self))

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-individual shapes (without batch dims) of each parameter, in the flat-vector order."""
        F, K = self.n_features, self.n_slots
        if self.kind in KINDS:
            return {n: ((F, K) if n == "W" else (K,)) for n in self.param_names}
        shapes = kind_of(self).param_shapes(self)
        return {n: tuple(shapes[n]) for n in _order(shapes)}

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.param_shapes().values())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _order(names) -> tuple[str, ...]:
    """The flat-vector order of parameter names: W, bias, phi where present, then a plugin's own."""
    return (*(n for n in PARAM_ORDER if n in names), *(n for n in names if n not in PARAM_ORDER))


class RouterKind:
    """The router protocol (duck-typed: any object with these members; this class documents it).

    A router maps routing features to gates. Both systems call it with leading batch dims ``*b``
    that broadcast: the analytic sandbox with parameters ``(S, P, ...)`` (seeds, population) and
    features ``(S, 1, N, F)``, the transformer with parameters ``(...)`` or ``(P, ...)`` (the
    search's population) and features ``(N*T, F)`` or ``(1, N*T, F)``.

    Members:
        feasible: ``"simplex"`` (every gate row sums to 1) or ``"box"`` (each gate in [0, 1]): the
            set the analytic sandbox's ceiling (`sandbox.oracle`) searches for the best gates.
        param_shapes(cfg) -> {name: shape}: per-individual shapes. ``W (F, K)`` and ``bias (K,)``
            are required (the lifecycle's reallocation and the search's logit units read them);
            further parameters may follow. Every shape ends in K (slot k of each is ``[..., k]``:
            the lifecycle copies slot columns).
        gates(cfg, params, features, step) -> ``(*b, N, K)``: ``params[name]`` is ``(*b, *shape)``,
            ``features (*b, N, F)``; ``step`` is the training step (an int, or a tensor that
            broadcasts to ``(*b, 1, 1)``), for schedules. Differentiable in ``params``: the grad
            arm trains them with Adam.
        init(cfg, batch_shape, generator, dtype, device) -> params (optional): the default draws
            ``W ~ N(0, init_std^2 / F)`` from ``generator`` and zeros for every other parameter.
        floors(cfg, params) -> ``(*b, K)`` (optional): per-slot lower bounds of the gates (zeros).

    ``cfg`` is the `RouterConfig` (its ``n_features`` F, ``n_slots`` K, anneal settings, ...).
    """

    feasible: str = "box"

    def param_shapes(self, cfg: "RouterConfig") -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    def gates(self, cfg: "RouterConfig", params: dict[str, Tensor], features: Tensor, step=0) -> Tensor:
        raise NotImplementedError


def kind_of(cfg: "RouterConfig") -> RouterKind:
    """The `RouterKind` that ``cfg.kind`` names (built-in, entry point or ``module:Name``)."""
    return plugins.resolve("router", cfg.kind, "--router")


def _fail(value: str, problem: str):
    raise plugins.PluginError("--router", value, problem)
