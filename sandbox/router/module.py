"""`Router`: the functional core with ``nn.Parameter`` weights (the transformer side)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sandbox.router.config import RouterConfig
from sandbox.router.gates import floors, init_router_params, router_gates, temperature

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
