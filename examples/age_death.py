"""A worked death-operator plugin: the oldest slot dies instead of the least fit.

The built-in death (``least-fit``) retires the slots that contribute least (leave-one-out fitness),
so a slot that is good on one domain can live for ever. Here age decides: at each event the
``n_die`` oldest slots that reached ``min_age`` die, the least fit first among equally old ones
(the founders are all equally old, so the first event still takes the least fit founder). Every
slot is then replaced in turn, a fixed turnover, whatever its fitness.

    sandbox sweep --lifecycle --death examples.age_death:OldestDies
    sandbox full --cell R+L --death examples.age_death:OldestDies
    sandbox factorial --cells B3,R+L --death examples.age_death:OldestDies
"""

from __future__ import annotations

import torch


class OldestDies:
    """The `sandbox.lifecycle.DeathOperator` protocol: one population per row."""

    def dies(self, fitness, ages, cfg, generator):
        """fitness ``(n, K)`` float64 (NaN = least fit), ages ``(n, K)`` long -> bool ``(n, K)``."""
        n, K = fitness.shape
        fit = torch.nan_to_num(fitness, nan=-torch.inf)
        by_fit = torch.sort(fit, dim=-1, stable=True).indices                         # least fit first
        oldest = torch.sort(-ages.gather(-1, by_fit), dim=-1, stable=True).indices   # then oldest first
        ranked = by_fit.gather(-1, oldest)                                            # (n, K): who dies first
        # the oldest are the ones that reached min_age, so the first `count` ranked slots are eligible
        count = (ages >= cfg.min_age).sum(-1, keepdim=True).clamp(max=min(cfg.n_die, K - 1))   # (n, 1)
        take = torch.arange(K, device=ages.device) < count                           # (n, K)
        return torch.zeros_like(take).scatter(-1, ranked, take)
