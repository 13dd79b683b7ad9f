"""The shared routers: routing features ``(*b, N, F)`` -> gates ``(*b, N, K)``.

Two kinds, one set of pure functions (the analytic sandbox calls them on plain tensors with
leading seed/population dims; `Router` wraps them with ``nn.Parameter`` for the transformer):

- ``softmax`` (the static baseline B3): ``g = softmax(h W + b)``, zero-sum on the simplex.
- ``sigmoid`` (the rewrite): independent gates
  ``g_k = f_k + (1 - f_k) * sigmoid(z_k / tau(step))`` with ``z = h W + b``, a learnable floor
  ``f_k = floor_max * sigmoid(phi_k)`` in ``[0, floor_max]`` and a temperature annealed from
  ``tau_start`` to ``tau_end`` over ``anneal_steps`` (``linear``, ``cosine`` or ``exp``) and
  clamped to ``[tau_min, tau_max]`` at every step. So ``g_k`` lies in ``[f_k, 1]``. With
  ``tau_scales = input`` the temperature divides only the input-dependent part:
  ``sigmoid(b_k + (h W)_k / tau)``.

Parameters (slot axis last, so slot k of every parameter is ``[..., k]``):
``W (*b, F, K)``, ``bias (*b, K)`` and, for ``sigmoid``, ``phi (*b, K)``.

Router kinds are an extension point (`sandbox.plugins`, group ``router``): ``RouterConfig.kind``
(flags ``--router``) names a built-in kind, an entry point in ``molora.routers`` or ``module:Name``
of an object with the `RouterKind` protocol; the built-ins are registered the same way
(docs/plugins.md builds one from scratch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from sandbox import plugins
from sandbox.adapters import randn
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


# ---------------------------------------------------------------------------------------------
# Router kinds: the protocol, the built-ins, the registry
# ---------------------------------------------------------------------------------------------


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


class SoftmaxKind(RouterKind):
    """``softmax`` (B3): ``g = softmax(h W + b)``, on the simplex."""

    feasible = "simplex"

    def param_shapes(self, cfg):
        return {"W": (cfg.n_features, cfg.n_slots), "bias": (cfg.n_slots,)}

    def gates(self, cfg, params, features, step=0):
        return torch.softmax(router_logits(params, features), dim=-1)


class SigmoidKind(RouterKind):
    """``sigmoid`` (the rewrite): ``g = f + (1 - f) sigmoid(z / tau(step))``, in ``[f, 1]``."""

    feasible = "box"

    def param_shapes(self, cfg):
        return {"W": (cfg.n_features, cfg.n_slots), "bias": (cfg.n_slots,), "phi": (cfg.n_slots,)}

    def gates(self, cfg, params, features, step=0):
        tau = temperature(cfg, step)
        f = floors(cfg, params).unsqueeze(-2)  # (*b, 1, K)
        if cfg.tau_scales == "input":   # sigmoid(b + h W / tau): the anneal leaves the operating point alone
            hw = features @ params["W"]  # (*b, N, K)
            if isinstance(tau, Tensor):
                tau = tau.to(hw.dtype)
            return f + (1 - f) * torch.sigmoid(params["bias"].unsqueeze(-2) + hw / tau)
        z = router_logits(params, features)  # (*b, N, K)
        if isinstance(tau, Tensor):
            tau = tau.to(z.dtype)
        return f + (1 - f) * torch.sigmoid(z / tau)


def kind_of(cfg: "RouterConfig") -> RouterKind:
    """The `RouterKind` that ``cfg.kind`` names (built-in, entry point or ``module:Name``)."""
    return plugins.resolve("router", cfg.kind, "--router")


def _fail(value: str, problem: str):
    raise plugins.PluginError("--router", value, problem)


def check_router_kind(obj, value: str) -> None:
    """Probe a router plugin once on small shapes (F = 3, K = 4; batch dims as both systems use
    them); the first break of the protocol is a `PluginError` naming the method and the expected
    shape."""
    name = type(obj).__name__
    for m in ("param_shapes", "gates"):
        if not callable(getattr(obj, m, None)):
            _fail(value, f"{name} has no {m}() method; expected the router protocol (feasible, param_shapes, "
                  "gates; docs/plugins.md)")
    if getattr(obj, "feasible", None) not in ("simplex", "box"):
        _fail(value, f"{name}.feasible is {getattr(obj, 'feasible', None)!r}; expected 'simplex' (gate rows sum to "
              "1) or 'box' (each gate in [0, 1])")
    F, K = 3, 4
    cfg = RouterConfig(kind=value, n_features=F, n_slots=K, anneal_steps=10)
    shapes = obj.param_shapes(cfg)
    if not isinstance(shapes, dict) or tuple(shapes.get("W", ())) != (F, K) or tuple(shapes.get("bias", ())) != (K,):
        _fail(value, f"{name}.param_shapes() returned {shapes!r}; expected a dict with 'W': (F, K) = {(F, K)} and "
              f"'bias': (K,) = {(K,)}, every shape ending in K")
    for n, sh in shapes.items():
        if not (isinstance(sh, tuple) and len(sh) >= 1 and sh[-1] == K):
            _fail(value, f"{name}.param_shapes()[{n!r}] is {sh!r}; expected a tuple ending in K = {K} (slot axis last)")
    gen = torch.Generator().manual_seed(0)
    for batch, feat_shape in (((2,), (2, 5, F)), ((2, 3), (2, 1, 5, F)), ((), (5, F))):
        params = init_router_params(cfg, batch, gen, torch.float64)
        for n, sh in shapes.items():
            if n not in params or tuple(params[n].shape) != (*batch, *sh):
                got = tuple(params[n].shape) if n in params else "nothing"
                _fail(value, f"{name}.init() gave {n!r} of shape {got}; expected (*b, *param_shapes[{n!r}]) = "
                      f"{(*batch, *sh)}")
        feats = torch.randn(feat_shape, generator=gen, dtype=torch.float64)
        g = obj.gates(cfg, params, feats, 0)
        want = (*torch.broadcast_shapes(feat_shape[:-2], batch), feat_shape[-2], K)
        if not isinstance(g, Tensor) or tuple(g.shape) != want:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            _fail(value, f"{name}.gates() returned {got} for params with batch dims {batch} and features "
                  f"{feat_shape}; expected (*b, N, K) = {want}")
        if not torch.isfinite(g).all():
            _fail(value, f"{name}.gates() returned non-finite gates; expected finite gates of shape (*b, N, K)")
        if obj.feasible == "simplex" and not torch.allclose(g.sum(-1), torch.ones((), dtype=g.dtype), atol=1e-6):
            _fail(value, f"{name}.gates() rows sum to {g.sum(-1).flatten()[:3].tolist()}; expected 1 "
                  "(feasible = 'simplex')")
        if obj.feasible == "box" and not bool(((g >= -1e-9) & (g <= 1 + 1e-9)).all()):
            _fail(value, f"{name}.gates() returned gates outside [0, 1]; expected each gate in [0, 1] (feasible = 'box')")
        fl = floors(cfg, params)
        if tuple(fl.shape) != (*batch, K):
            _fail(value, f"{name}.floors() returned {tuple(fl.shape)}; expected (*b, K) = {(*batch, K)}")


plugins.group("router", "router", "--router", "molora.routers", check_router_kind)
plugins.register("router", "softmax", SoftmaxKind())
plugins.register("router", "sigmoid", SigmoidKind())


# ---------------------------------------------------------------------------------------------
# Functional core
# ---------------------------------------------------------------------------------------------


def mass_init(cfg: RouterConfig) -> tuple[float, float]:
    """``(bias, phi)`` of a sigmoid router whose expected total gate weight per token at step 0 is
    ``cfg.init_mass`` (`RouterConfig.init` = ``mass``; ``(0, phi_init)`` for ``zero`` or softmax).

    With ``W`` small the logits are ``z ~ bias``, so each gate is ``f + (1 - f) sigmoid(bias / tau0)``
    with ``f = floor_max sigmoid(phi)`` and ``tau0 = temperature(cfg, 0)``; setting ``K`` times
    that to the target ``m`` gives ``bias = tau0 logit((m / K - f) / (1 - f))``. The floor is kept
    (``phi = phi_init``) unless the floors alone would carry more than half the target
    (``K f > m / 2``); then ``phi`` is lowered so the floors carry exactly half
    (``f = m / (2 K)``), and the bias the other half. The neglected spread of ``h W`` (std
    ``init_std |h| / sqrt(F)`` in logit units) shifts the mean by second order only; the test measures
    the total on real features. With ``tau_scales = input`` the temperature does not divide the
    bias, so ``bias = logit(...)`` without the factor ``tau0``, and the start holds through the anneal.
    """
    if cfg.kind != "sigmoid" or cfg.init == "zero":
        return 0.0, float(cfg.phi_init)
    K, m = cfg.n_slots, float(cfg.init_mass)
    phi = float(cfg.phi_init)
    f = cfg.floor_max / (1 + math.exp(-phi))
    if K * f > m / 2:
        f = m / (2 * K)
        q = f / cfg.floor_max              # sigmoid(phi) = f / floor_max < 1 since K f_max >= K f > m / 2
        phi = math.log(q / (1 - q))
    p = (m / K - f) / (1 - f)              # in (0, 1): f <= m / (2K) < m / K and m < K
    tau0 = float(temperature(cfg, 0)) if cfg.tau_scales == "logit" else 1.0
    return tau0 * math.log(p / (1 - p)), phi


def init_router_params(cfg: RouterConfig, batch_shape: tuple[int, ...] = (), generator: torch.Generator | None = None,
                       dtype: torch.dtype = torch.float32, device=None) -> dict[str, Tensor]:
    """Fresh parameters: ``W ~ N(0, init_std^2 / F)`` ``(*b, F, K)``, ``bias`` ``(*b, K)`` and
    ``phi`` ``(*b, K)`` (sigmoid only) from `mass_init` (``bias = 0``, ``phi = phi_init`` for
    ``init = zero``). The draw of ``W`` does not depend on ``init``."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    F, K = cfg.n_features, cfg.n_slots
    if cfg.kind not in KINDS:
        kind = kind_of(cfg)
        if callable(getattr(kind, "init", None)):
            return dict(kind.init(cfg, tuple(batch_shape), gen, dtype, device))
        W = randn((*batch_shape, F, K), gen, dtype, device) * (cfg.init_std / math.sqrt(F))
        return {n: (W if n == "W" else torch.zeros((*batch_shape, *sh), dtype=dtype, device=device))
                for n, sh in cfg.param_shapes().items()}
    W = randn((*batch_shape, F, K), gen, dtype, device) * (cfg.init_std / math.sqrt(F))
    bias, phi = mass_init(cfg)
    params = {"W": W, "bias": torch.full((*batch_shape, K), bias, dtype=dtype, device=device)}
    if cfg.kind == "sigmoid":
        params["phi"] = torch.full((*batch_shape, K), phi, dtype=dtype, device=device)
    return params


def temperature(cfg: RouterConfig, step: int | float | Tensor) -> float | Tensor:
    """``tau(step)``: ``tau_start -> tau_end`` over ``anneal_steps``, clamped to ``[tau_min, tau_max]``.

    With progress ``p = clamp(step / anneal_steps, 0, 1)``:
    linear ``s + (e - s) p``; cosine ``e + (s - e)(1 + cos(pi p)) / 2``; exp ``s (e / s)^p``.
    A float step gives a float, a tensor of steps a tensor of the same shape.
    """
    if cfg.anneal_steps is None:
        raise ValueError("temperature: anneal_steps is unresolved (None); resolve it to a step count first")
    s, e = cfg.tau_start, cfg.tau_end
    t = torch.as_tensor(step, dtype=torch.float64)  # one code path for float and tensor steps
    p = (t / cfg.anneal_steps).clamp(0, 1) if cfg.anneal_steps else torch.ones_like(t)
    if cfg.schedule == "linear":
        tau = s + (e - s) * p
    elif cfg.schedule == "cosine":
        tau = e + (s - e) * 0.5 * (1 + torch.cos(math.pi * p))
    else:
        tau = s * (e / s) ** p
    tau = tau.clamp(cfg.tau_min, cfg.tau_max)
    return tau if isinstance(step, Tensor) else float(tau)


def floors(cfg: RouterConfig, params: dict[str, Tensor]) -> Tensor:
    """Per-slot gate floors ``(*b, K)``: ``floor_max * sigmoid(phi)`` (sigmoid), zeros (softmax)."""
    if cfg.kind == "softmax":
        return torch.zeros_like(params["bias"])
    if cfg.kind == "sigmoid":
        return cfg.floor_max * torch.sigmoid(params["phi"])
    kind = kind_of(cfg)
    return kind.floors(cfg, params) if callable(getattr(kind, "floors", None)) else torch.zeros_like(params["bias"])


def router_logits(params: dict[str, Tensor], features: Tensor) -> Tensor:
    """``z = h W + b``: features ``(*b, N, F)``, W ``(*b, F, K)`` -> ``(*b, N, K)`` (dims broadcast)."""
    return features @ params["W"] + params["bias"].unsqueeze(-2)


def router_gates(cfg: RouterConfig, params: dict[str, Tensor], features: Tensor, step: int | float | Tensor = 0) -> Tensor:
    """Gates ``(*b, N, K)`` for features ``(*b, N, F)``.

    Leading dims broadcast: params ``(S, P, F, K)`` with features ``(S, 1, N, F)`` give
    ``(S, P, N, K)``. ``step`` sets the sigmoid temperature (ignored by softmax, whose
    temperature is fixed at 1); a tensor step must broadcast to ``(*b, 1, 1)``. The temperature
    divides the whole logit or only ``h W`` (`RouterConfig.tau_scales`). A plugin kind's gates are
    checked for their shape at every call (one line naming ``gates()`` and the expected shape).
    """
    kind = kind_of(cfg)
    g = kind.gates(cfg, params, features, step)
    if cfg.kind not in KINDS:
        want = (*torch.broadcast_shapes(features.shape[:-2], params["bias"].shape[:-1]), features.shape[-2], cfg.n_slots)
        if not isinstance(g, Tensor) or tuple(g.shape) != want:
            got = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
            _fail(cfg.kind, f"{type(kind).__name__}.gates() returned {got}; expected (*b, N, K) = {want}")
    return g


def params_to_vector(params: dict[str, Tensor]) -> Tensor:
    """Flatten router parameters to ``(*b, n)`` in the fixed order W (row-major F x K), bias, phi,
    then a plugin's own parameters (`RouterConfig.param_shapes`' order)."""
    batch = params["bias"].shape[:-1]
    parts = [params[n].reshape(*batch, -1) for n in _order(params)]  # each (*b, n_i)
    return torch.cat(parts, dim=-1)


def vector_to_params(vec: Tensor, cfg: RouterConfig) -> dict[str, Tensor]:
    """Inverse of `params_to_vector`: ``(*b, n)`` -> dict of ``(*b, F, K)``, ``(*b, K)``, ..."""
    check(vec.shape[-1] == cfg.n_params, "router_vector", tuple(vec.shape), f"last dim {cfg.n_params}")
    batch = vec.shape[:-1]
    out, i = {}, 0
    for name, shape in cfg.param_shapes().items():
        n = math.prod(shape)
        out[name] = vec[..., i:i + n].reshape(*batch, *shape)  # (*b, n) -> (*b, *shape)
        i += n
    return out


# ---------------------------------------------------------------------------------------------
# Module (transformer side)
# ---------------------------------------------------------------------------------------------


class Router(nn.Module):
    """`router_gates` with ``nn.Parameter`` weights: ``forward(features (*b,N,F), step) -> (*b,N,K)``."""

    def __init__(self, cfg: RouterConfig, batch_shape: tuple[int, ...] = (), generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        self.cfg = cfg
        for name, value in init_router_params(cfg, batch_shape, generator, dtype, device).items():
            self.register_parameter(name, nn.Parameter(value))

    def params(self) -> dict[str, Tensor]:
        """The parameters as the dict the functional core takes (live tensors, not copies)."""
        return {n: getattr(self, n) for n in self.cfg.param_names}

    def forward(self, features: Tensor, step: int | float | Tensor = 0) -> Tensor:
        return router_gates(self.cfg, self.params(), features, step)

    def floors(self) -> Tensor:
        return floors(self.cfg, self.params())

    def temperature(self, step: int | float) -> float:
        return temperature(self.cfg, step) if self.cfg.kind == "sigmoid" else 1.0

    @torch.no_grad()
    def load_params(self, params: dict[str, Tensor]) -> None:
        """Copy a parameter dict in place (e.g. after a lifecycle step reset some slots)."""
        for n in self.cfg.param_names:
            getattr(self, n).copy_(params[n])

    def extra_repr(self) -> str:
        return f"kind={self.cfg.kind}, F={self.cfg.n_features}, K={self.cfg.n_slots}"


# ---------------------------------------------------------------------------------------------
# Telemetry
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateTelemetry:
    """Summary of gates pooled over every leading position.

    Attributes:
        mean_gate: ``(K,)`` mean gate per slot.
        entropy: mean over positions of ``H(p) = -sum_k p_k log p_k`` (nats) of the gates
            normalised to ``p = g / sum_k g`` (equal to the gates for softmax).
        monopoly: share of total gate mass held by the ``top`` slots with the largest mean gate,
            ``sum_{top} mean_gate / sum_k mean_gate`` in ``[top/K, 1]``.
        per_domain: the same summary per domain label (empty when no labels were given).
    """

    mean_gate: Tensor
    entropy: float
    monopoly: float
    per_domain: dict[int, "GateTelemetry"]


def _summary(g: Tensor, top: int) -> tuple[Tensor, float, float]:
    """g ``(n, K)`` -> (mean gate ``(K,)``, mean entropy, monopoly index)."""
    mean = g.mean(0)
    p = g / g.sum(-1, keepdim=True).clamp_min(1e-30)
    ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean()
    k = min(top, g.shape[-1])
    mono = mean.topk(k).values.sum() / mean.sum().clamp_min(1e-30)
    return mean, float(ent), float(mono)


@torch.no_grad()
def gate_telemetry(gates: Tensor, domains: Tensor | None = None, top: int = 2) -> GateTelemetry:
    """Per-slot mean gate, mean gate entropy and monopoly index, overall and per domain.

    Args:
        gates: ``(..., K)``; every leading position is one observation.
        domains: integer labels broadcastable to ``gates.shape[:-1]`` (e.g. ``(*b, N)``), or None.
        top: how many slots the monopoly index counts.
    """
    K = gates.shape[-1]
    g = gates.detach().reshape(-1, K).to(torch.float64)  # (n, K)
    mean, ent, mono = _summary(g, top)
    per = {}
    if domains is not None:
        lab = torch.as_tensor(domains, device=gates.device).expand(gates.shape[:-1]).reshape(-1)  # (n,)
        for d in torch.unique(lab).tolist():
            m, e, mo = _summary(g[lab == d], top)
            per[int(d)] = GateTelemetry(m, e, mo, {})
    return GateTelemetry(mean, ent, mono, per)


def gate_rows(gates: Tensor, domains: Tensor | None = None, phase: str = "after",
              domain_names: list[str] | None = None, **extra) -> list[dict]:
    """Tidy rows for ``gates.csv``: ``phase, domain, slot, mean_gate`` (+ ``extra`` columns, e.g.
    ``seed=42``, ``cell="R"``). Without domain labels the domain is ``"all"``."""
    tel = gate_telemetry(gates, domains)
    groups = tel.per_domain.items() if domains is not None else [("all", tel)]
    rows = []
    for d, t in groups:
        name = domain_names[d] if (domain_names is not None and isinstance(d, int)) else d
        for k, v in enumerate(t.mean_gate.tolist()):
            rows.append({"phase": phase, "domain": name, "slot": k, "mean_gate": v, **extra})
    return rows
