"""The death, inheritance and reallocation extension points: one protocol each, the built-in kinds
registered through the same table as plugins (`sandbox.plugins`), a probe on small shapes that turns a
protocol break into one line, and the checked calls `lifecycle_step` makes.

=============  ==============================  ===============  =====================  ======================
operator       protocol                        flag             entry point group      built-ins
=============  ==============================  ===============  =====================  ======================
death          `DeathOperator.dies`            --death          molora.deaths          least-fit
inheritance    `InheritanceOperator.inherit`   --inherit-mode   molora.inheritances    blend, child
reallocation   `ReallocationOperator.          --reallocation   molora.reallocations   worst-domain
               reallocate`
=============  ==============================  ===============  =====================  ======================

Each operator is its own extension point (one method, one flag), like the mutation
(`sandbox.lifecycle.config.MutationOperator`, ``--mutation``): a plugin replaces one step of the event and
composes with the built-ins or other plugins of the other steps. Every call sees the batch flattened to
n rows and one generator, or n (one per row; draw with `draw_normal` / `draw_uniform` so a row's
numbers depend on its own generator only).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sandbox import plugins
from sandbox.lifecycle.config import LifecycleConfig
from sandbox.lifecycle.draws import Generators
from sandbox.lifecycle.operators import _put, _take, blend, point_at_worst_domain
from sandbox.lifecycle.population import _death_order

RECEIVERS = ("neighbour", "newborn")


# ---------------------------------------------------------------------------------------------
# The protocols (duck-typed; these classes document them)
# ---------------------------------------------------------------------------------------------


class DeathOperator:
    """The death protocol. ``--death`` takes an entry point name in ``molora.deaths`` or
    ``module:Name`` of an object with:

        dies(fitness, ages, cfg, generator) -> dead: which slots die at this event. ``fitness (n, K)``
            float64 (higher = fitter, NaN possible), ``ages (n, K)`` long (steps since birth);
            returns a bool ``(n, K)``, at least one slot alive per row. ``cfg`` is the
            `LifecycleConfig` (``n_die``, ``min_age``: the built-in honours them, a plugin decides).

    The package processes a row's deaths least fit first (one death rank at a time), gives each
    freed slot a newborn, and records a death event per dying slot in ``lifecycle.csv``.
    """

    def dies(self, fitness: Tensor, ages: Tensor, cfg: LifecycleConfig, generator: Generators) -> Tensor:
        raise NotImplementedError


class InheritanceOperator:
    """The inheritance protocol. ``--inherit-mode`` takes an entry point name in
    ``molora.inheritances`` or ``module:Name`` of an object with:

        receiver: ``"neighbour"`` (the dying slot's nearest surviving neighbour, largest cosine of the
            updates over every layer; it receives before the birth, so a parent that is the
            neighbour passes on what it received) or ``"newborn"`` (the freed slot's newborn, after
            its mutation). Optional, default ``"neighbour"``.
        inherit(A_r, B_r, A_d, B_d, cfg, generator) -> (A_r', B_r'): the receiver's new factors
            from its own and the dying adapter's, one adapter per row: ``A (n, r, d_in)``,
            ``B (n, d_out, r)`` -> the receiver's shapes. Called once per adapted layer.

    The package skips inheritance with ``cfg.inheritance`` off or ``inherit_alpha = 0`` (the
    factorial's no-inheritance probe), for plugins too (read ``cfg.inherit_alpha`` as the strength),
    and records an inherit event for the receiver.
    """

    receiver: str = "neighbour"

    def inherit(self, A_r: Tensor, B_r: Tensor, A_d: Tensor, B_d: Tensor, cfg: LifecycleConfig,
                generator: Generators) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class ReallocationOperator:
    """The reallocation protocol. ``--reallocation`` takes an entry point name in
    ``molora.reallocations`` or ``module:Name`` of an object with:

        reallocate(parent, domain_losses, domain_features, cfg, generator) -> (columns, target):
            the freed slot's router column from its parent's. ``parent`` maps each router parameter
            name to the parent slot's column, the slot axis removed: ``W (n, e, F)``, ``bias (n, e)``
            and the router's others (``e``: individuals sharing the population, the search's P in
            the analytic sandbox, 1 on the transformer). ``domain_losses (n, M)`` (current loss per
            domain) and ``domain_features (n, M, F)`` (mean routing feature per domain) may be None.
            Returns the same names and shapes, and ``target (n,)`` long, the domain the slot was
            pointed at (-1: none; in [0, M) with domain data), recorded as ``domain`` in lifecycle.csv.

    Runs when the lifecycle has a router to act on and ``cfg.reallocation`` is on.
    """

    def reallocate(self, parent: dict[str, Tensor], domain_losses: Tensor | None, domain_features: Tensor | None,
                   cfg: LifecycleConfig, generator: Generators) -> tuple[dict[str, Tensor], Tensor]:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# The built-in kinds
# ---------------------------------------------------------------------------------------------


class LeastFit:
    """``least-fit``: the ``n_die`` least fit slots with ``age >= min_age`` die (NaN = least fit,
    ties by slot index), at most K - 1."""

    def dies(self, fitness, ages, cfg, generator):
        order, valid = _death_order(fitness, ages, cfg.n_die, cfg.min_age)
        return torch.zeros(fitness.shape, dtype=torch.bool, device=fitness.device).scatter(-1, order, valid)


class Blend:
    """``blend``: the neighbour becomes the rank-r blend ``(1 - alpha) N + alpha D`` (`blend`)."""

    receiver = "neighbour"

    def inherit(self, A_r, B_r, A_d, B_d, cfg, generator):
        return blend(A_r, B_r, A_d, B_d, float(cfg.inherit_alpha), A_r.shape[-2])


class Child(Blend):
    """``child``: the newborn becomes ``(1 - alpha) newborn + alpha D``."""

    receiver = "newborn"


class WorstDomain:
    """``worst-domain``: `point_at_worst_domain`."""

    def reallocate(self, parent, domain_losses, domain_features, cfg, generator):
        return point_at_worst_domain(parent, domain_losses, domain_features, cfg, generator)


# ---------------------------------------------------------------------------------------------
# Checked calls (every call: a break mid-run is the same one line as at the probe)
# ---------------------------------------------------------------------------------------------


def death_operator(kind: str) -> DeathOperator:
    return plugins.resolve("death", kind, "--death")


def inheritance_operator(kind: str) -> InheritanceOperator:
    return plugins.resolve("inheritance", kind, "--inherit-mode")


def reallocation_operator(kind: str) -> ReallocationOperator:
    return plugins.resolve("reallocation", kind, "--reallocation")


def receiver_of(op) -> str:
    return getattr(op, "receiver", "neighbour")


def _shape(x) -> object:
    return tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__


def dying(cfg: LifecycleConfig, fitness: Tensor, ages: Tensor, generator: Generators) -> tuple[Tensor, Tensor]:
    """The dying slots in the order they are processed: ``slots (n, D)`` long, ``valid (n, D)`` bool
    (row i's deaths first, least fit first, ties by slot index), from the death operator's mask."""
    op = death_operator(cfg.death_kind)
    n, K = fitness.shape
    dead = op.dies(fitness, ages, cfg, generator)
    name = type(op).__name__
    if not isinstance(dead, Tensor) or dead.dtype != torch.bool or tuple(dead.shape) != (n, K):
        got = f"{_shape(dead)} {dead.dtype}" if isinstance(dead, Tensor) else _shape(dead)
        raise plugins.PluginError("--death", cfg.death_kind, f"{name}.dies() returned {got}; expected a bool "
                                  f"tensor (n, K) = ({n}, {K}) marking the slots that die")
    dead = dead.to(fitness.device)
    count = dead.sum(-1)  # (n,)
    if bool((count >= K).any()):
        raise plugins.PluginError("--death", cfg.death_kind, f"{name}.dies() marked all {K} slots of a row; expected "
                                  "a bool (n, K) with at least one slot alive per row")
    D = max(1, int(count.max())) if n else 1
    f = torch.where(torch.isnan(fitness), torch.full_like(fitness, -math.inf), fitness).clamp(max=torch.finfo(fitness.dtype).max)
    score = torch.where(dead, f, torch.full_like(f, math.inf))
    order = torch.sort(score, dim=-1, stable=True).indices[..., :D]  # (n, D)
    valid = torch.arange(D, device=fitness.device) < count.unsqueeze(-1)  # (n, D)
    return order, valid


def inherit(cfg: LifecycleConfig, op, A_r: Tensor, B_r: Tensor, A_d: Tensor, B_d: Tensor,
            generator: Generators) -> tuple[Tensor, Tensor]:
    """``op.inherit`` with its result checked: the receiver's shapes, cast to its dtype."""
    out = op.inherit(A_r, B_r, A_d, B_d, cfg, generator)
    ok = isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, Tensor) for x in out)
    if not ok or tuple(out[0].shape) != tuple(A_r.shape) or tuple(out[1].shape) != tuple(B_r.shape):
        got = tuple(_shape(x) for x in out) if isinstance(out, tuple) else _shape(out)
        raise plugins.PluginError("--inherit-mode", cfg.inherit_mode, f"{type(op).__name__}.inherit() returned {got}; "
                                  f"expected the receiver's (A (n, r, d_in), B (n, d_out, r)) = "
                                  f"({tuple(A_r.shape)}, {tuple(B_r.shape)})")
    return out[0].to(A_r.dtype), out[1].to(B_r.dtype)


def reallocate(params: dict[str, Tensor], slot: Tensor, parent: Tensor, valid: Tensor, cfg: LifecycleConfig,
               generator: Generators, domain_losses: Tensor | None = None,
               domain_features: Tensor | None = None) -> tuple[dict[str, Tensor], Tensor]:
    """Reset router slot ``slot (n,)`` from slot ``parent (n,)`` (rows where ``valid``) by the
    configured reallocation (``cfg.reallocation_kind``), batch flattened.

    Params are ``W (n, e, F, K)``, ``bias (n, e, K)``, ... (every shape ends in K); the operator sees
    the parent's columns (`ReallocationOperator`). Returns the new params and the target domain per
    row ``(n,)``. ``generator``: one, or n (one per row)."""
    op = reallocation_operator(cfg.reallocation_kind)
    cols = {name: _take(x.movedim(-1, 1), parent) for name, x in params.items()}  # (n, e[, F])
    out = op.reallocate(cols, domain_losses, domain_features, cfg, generator)
    n = parent.shape[0]
    M = None if domain_losses is None else domain_losses.shape[-1]
    name = type(op).__name__
    want = "({" + ", ".join(f"{k!r}: {tuple(v.shape)}" for k, v in cols.items()) + f"}}, target (n,) = ({n},))"
    ok = (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict) and isinstance(out[1], Tensor)
          and set(out[0]) == set(cols) and all(isinstance(out[0][k], Tensor) and out[0][k].shape == v.shape
                                                 for k, v in cols.items())
          and tuple(out[1].shape) == (n,) and not out[1].is_floating_point() and not out[1].is_complex())
    if not ok:
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], dict):
            got = "({" + ", ".join(f"{k!r}: {_shape(v)}" for k, v in out[0].items()) + f"}}, {_shape(out[1])})"
        else:
            got = _shape(out)
        raise plugins.PluginError("--reallocation", cfg.reallocation_kind, f"{name}.reallocate() returned {got}; "
                                  f"expected (the parent's columns, same names and shapes, and an integer target) = {want}")
    new, target = out
    bad = (target < -1) | (target >= M) if M is not None else target != -1
    if bool(bad.any()):
        allowed = f"in [-1, {M})" if M is not None else "-1 (no domain data)"
        raise plugins.PluginError("--reallocation", cfg.reallocation_kind, f"{name}.reallocate() returned target "
                                  f"{target.tolist()}; expected domains {allowed}")
    res = {k: _put(x.movedim(-1, 1), slot, new[k], valid).movedim(1, -1) for k, x in params.items()}
    return res, target.long().to(params["W"].device)


# ---------------------------------------------------------------------------------------------
# Probes (once per plugin, on small shapes)
# ---------------------------------------------------------------------------------------------


def _gens(n: int) -> list:
    return [torch.Generator().manual_seed(0), [torch.Generator().manual_seed(i) for i in range(n)]]


def _finite(x: Tensor) -> bool:
    return bool(torch.isfinite(x).all())


def check_death_operator(obj, value: str) -> None:
    """Probe a death plugin: n = 2 rows of K = 4 slots, one NaN fitness, mixed ages."""
    if not callable(getattr(obj, "dies", None)):
        raise plugins.PluginError("--death", value, f"{type(obj).__name__} has no dies() method; expected the death "
                                  "protocol (dies(fitness, ages, cfg, generator) -> bool (n, K); docs/plugins.md)")
    cfg = LifecycleConfig(death_kind=value)
    fit = torch.tensor([[0.3, -0.1, math.nan, 0.2], [0.0, 0.5, 0.1, -0.4]], dtype=torch.float64)
    ages = torch.tensor([[0, 600, 1200, 600], [700, 0, 0, 900]])
    for g in _gens(2):
        dying(cfg, fit, ages, g)


def check_inheritance_operator(obj, value: str) -> None:
    """Probe an inheritance plugin: n = 3 adapters of rank 2, d_in = 5, d_out = 4."""
    name = type(obj).__name__
    if not callable(getattr(obj, "inherit", None)):
        raise plugins.PluginError("--inherit-mode", value, f"{name} has no inherit() method; expected the inheritance "
                                  "protocol (inherit(A_r, B_r, A_d, B_d, cfg, generator) -> (A, B); docs/plugins.md)")
    if receiver_of(obj) not in RECEIVERS:
        raise plugins.PluginError("--inherit-mode", value, f"{name}.receiver is {receiver_of(obj)!r}; expected "
                                  "'neighbour' or 'newborn'")
    cfg = LifecycleConfig(inherit_mode=value)
    gen = torch.Generator().manual_seed(0)
    A_r, A_d = (torch.randn(3, 2, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    B_r, B_d = (torch.randn(3, 4, 2, generator=gen, dtype=torch.float64) for _ in range(2))
    for g in _gens(3):
        A, B = inherit(cfg, obj, A_r, B_r, A_d, B_d, g)
        if not (_finite(A) and _finite(B)):
            raise plugins.PluginError("--inherit-mode", value, f"{name}.inherit() returned non-finite factors; "
                                      "expected finite A (n, r, d_in), B (n, d_out, r)")


def check_reallocation_operator(obj, value: str) -> None:
    """Probe a reallocation plugin: n = 2 rows, e = 3 individuals, K = 4 slots, F = 3 features,
    M = 5 domains; with and without domain data."""
    name = type(obj).__name__
    if not callable(getattr(obj, "reallocate", None)):
        raise plugins.PluginError("--reallocation", value, f"{name} has no reallocate() method; expected the "
                                  "reallocation protocol (reallocate(parent, domain_losses, domain_features, cfg, "
                                  "generator) -> (columns, target); docs/plugins.md)")
    cfg = LifecycleConfig(reallocation_kind=value)
    gen = torch.Generator().manual_seed(0)
    params = {"W": torch.randn(2, 3, 3, 4, generator=gen, dtype=torch.float64),
              "bias": torch.randn(2, 3, 4, generator=gen, dtype=torch.float64),
              "phi": torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)}
    losses = torch.rand(2, 5, generator=gen, dtype=torch.float64)
    feats = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64)
    slot, parent, valid = torch.tensor([1, 3]), torch.tensor([0, 2]), torch.tensor([True, True])
    for g in _gens(2):
        for dl, df in ((losses, feats), (None, None)):
            new, _ = reallocate(params, slot, parent, valid, cfg, g, dl, df)
            if not all(_finite(x) for x in new.values()):
                raise plugins.PluginError("--reallocation", value, f"{name}.reallocate() returned non-finite "
                                          "columns; expected finite router parameters")


plugins.group("death", "death operator", "--death", "molora.deaths", check_death_operator)
plugins.group("inheritance", "inheritance operator", "--inherit-mode", "molora.inheritances", check_inheritance_operator)
plugins.group("reallocation", "reallocation operator", "--reallocation", "molora.reallocations",
              check_reallocation_operator)
plugins.register("death", "least-fit", LeastFit())
plugins.register("inheritance", "blend", Blend())
plugins.register("inheritance", "child", Child())
plugins.register("reallocation", "worst-domain", WorstDomain())
