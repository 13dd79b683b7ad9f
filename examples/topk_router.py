"""A worked router plugin: top-k softmax routing (the sparse MoE router of Shazeer et al. 2017).

``g = softmax over the k largest logits of z = h W + b`` (the other K - k gates are exactly 0), so
each token mixes at most k adapters and its gates sum to 1. The top-k choice is piecewise
constant, so the gradient flows through the k kept logits only (as in every top-k MoE).

Run it on either system, in the map or the factorial, without installing anything::

    sandbox sweep --router examples.topk_router:TopKSoftmax
    sandbox sweep --system substrate --router examples.topk_router:TopKSoftmax
    sandbox factorial --cells B3,R --router-kind examples.topk_router:TopKSoftmax   # the R cells

or install it under a name (``[project.entry-points."molora.routers"] topk2 =
"examples.topk_router:TopKSoftmax"`` in your package's pyproject.toml) and pass ``--router topk2``.
docs/plugins.md builds it step by step; tests/test_plugin_example.py runs it.
"""

from __future__ import annotations

import torch
from torch import Tensor


class TopKSoftmax:
    """Top-k softmax router over the `RouterConfig`'s F features and K slots.

    Parameters: ``W (F, K)`` and ``bias (K,)`` (the protocol's required pair; no others), drawn by
    the package's default init (``W ~ N(0, init_std^2 / F)``, ``bias = 0``).
    """

    #: Gates sum to 1 (the analytic sandbox's ceiling searches the simplex).
    feasible = "simplex"

    def __init__(self, k: int = 2):
        self.k = k

    def param_shapes(self, cfg) -> dict[str, tuple[int, ...]]:
        return {"W": (cfg.n_features, cfg.n_slots), "bias": (cfg.n_slots,)}

    def gates(self, cfg, params: dict[str, Tensor], features: Tensor, step=0) -> Tensor:
        """features ``(*b, N, F)``, W ``(*b, F, K)``, bias ``(*b, K)`` -> gates ``(*b, N, K)``."""
        z = features @ params["W"] + params["bias"].unsqueeze(-2)             # (*b, N, K)
        k = min(self.k, z.shape[-1])
        kth = z.topk(k, dim=-1).values[..., -1:]                              # (*b, N, 1) k-th largest logit
        masked = z.masked_fill(z < kth, float("-inf"))                        # keep the top k (ties: all of them)
        return torch.softmax(masked, dim=-1)
