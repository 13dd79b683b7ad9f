"""Gate telemetry: summaries of gates pooled over positions (`gate_telemetry`) and the per-slot
rows of ``gates.csv`` (`gate_rows`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

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
