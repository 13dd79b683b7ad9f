"""Adam with per-row learning rates and step counts, updating the solver's tensors in place."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from sandbox.analytic.config import DTYPE


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
