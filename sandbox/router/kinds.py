"""The built-in router kinds (``softmax``, ``sigmoid``) and the probe a router plugin passes before
it is used (`check_router_kind`), registered in `sandbox.plugins`' group ``router``."""

from __future__ import annotations

import torch
from torch import Tensor

from sandbox import plugins
from sandbox.router.config import RouterConfig, RouterKind, _fail
from sandbox.router.gates import floors, init_router_params, router_logits, temperature

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
