"""A worked reallocation plugin: the freed slot points at a random domain.

The built-in reallocation (``worst-domain``) copies the parent's router column with noise and pushes
it toward the domain with the worst current loss. Here the domain is drawn uniformly at random for
each newborn instead (the same noise and the same push, ``realloc_push`` logits on that domain's
mean routing feature relative to the mean domain), so the population spreads over domains whatever
their losses. lifecycle.csv records the drawn domain in ``domain``.

    sandbox sweep --lifecycle --reallocation examples.random_domain:RandomDomain
    sandbox full --cell R+L --reallocation examples.random_domain:RandomDomain
"""

from __future__ import annotations

import math

import torch

from sandbox.lifecycle import draw_normal, draw_uniform


class RandomDomain:
    """The `sandbox.lifecycle.ReallocationOperator` protocol: one population per row."""

    def reallocate(self, parent, domain_losses, domain_features, cfg, generator):
        """parent: name -> the parent slot's column (``W (n, e, F)``, ``bias (n, e)``, ...);
        domain_losses ``(n, M)`` and domain_features ``(n, M, F)`` or None -> (columns, target ``(n,)``)."""
        W = parent["W"]
        n, e, F = W.shape
        target = torch.full((n,), -1, dtype=torch.long, device=W.device)
        push = W.new_zeros((n, F))
        if domain_features is not None and cfg.realloc_push > 0:
            M = domain_features.shape[-2]
            target = (draw_uniform((n,), generator, W) * M).long().clamp(max=M - 1)          # (n,)
            hbar = domain_features.to(W.dtype)                                                 # (n, M, F)
            u = hbar[torch.arange(n, device=W.device), target] - hbar.mean(-2)               # (n, F)
            push = cfg.realloc_push * u / (u * u).sum(-1, keepdim=True).clamp_min(1e-12)
        out = {}
        for name, x in parent.items():
            noise = cfg.realloc_noise * draw_normal(tuple(x.shape), generator, x)
            out[name] = x + (noise / math.sqrt(F) + push.unsqueeze(1) if name == "W" else noise)
        return out, target
