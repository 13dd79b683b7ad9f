"""The functional core: a router's parameters, temperature, floors and gates as pure functions of
plain tensors (leading batch dims broadcast), and the flat parameter vector of the search."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sandbox.adapters import randn
from sandbox.errors import check
from sandbox.router.config import KINDS, RouterConfig, _fail, _order, kind_of

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
