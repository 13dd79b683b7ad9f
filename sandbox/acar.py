"""ACAR (sigma routing): the rule shared by the transformer and the analytic sandbox.

ACAR routes each input by self-consistency: three candidates (the top-3 slots of a cheap score)
each make a prediction; sigma is 0 when all three agree, 0.5 when two agree and 1 when all differ;
then one, two or three of the candidates run, gated equally (``1 / n`` each, summing to 1). No
gradient reaches any of it. `substrate.acar` compares next-token argmax predictions (exact labels,
causal prefix sigma); this module holds the shared pieces (`sigma_from_pairs`, `modes`, `top3`,
`equal_gates`, `usage`) and the analytic sandbox's version (`analytic_gates`).

**The analytic sandbox's predictions.** The sandbox has no sampled inputs: inputs are isotropic,
``x ~ N(0, I_d)``, and every loss is an expectation over them. Slot k's prediction for an input is
``W_k x`` (``W_k = s B_k A_k``, the slot alone, as a one-slot probe on the transformer is the model
with that slot alone), so two slots' predictions differ on average by
``E ||W_j x - W_l x||^2 = ||W_j - W_l||_F^2 = G_jj + G_ll - 2 G_jl`` (the bank's Gram matrix, from
r x r blocks; no d x d matrix) against a prediction scale ``E ||W_j x||^2 = G_jj``. Two slots
**agree** when their RMS difference is at most ``tol`` times the larger of their RMS predictions:
``||W_j - W_l||_F <= tol * max(||W_j||_F, ||W_l||_F)`` (``tol = 0.5`` by default, ``--acar-tol``:
for equal norms, a cosine of at least 0.875; 0 demands identical maps, 2 or more accepts any two).
Predictions are compared per (domain, context draw): the candidates come from the router's logits
for that context, so the three slots compared, and with them sigma, change with the input.

With a tolerance, agreement need not be transitive (a ~ b and b ~ c without a ~ c); sigma follows
the largest agreeing group: 0 when all three pairs agree, 1 when no pair does, 0.5 otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Candidates compared (ACAR's N = 3 probes).
N_PROBES = 3
#: The gate modes: number of slots gated.
MODES = (1, 2, 3)
#: The usage columns of a results.csv acar row (`usage`).
USAGE_COLUMNS = ("mode1", "mode2", "mode3", "mean_slots", "saved_vs_always3")
#: Default agreement tolerance of the analytic sandbox (relative RMS difference of two slots' predictions).
DEFAULT_TOL = 0.5


def sigma_from_pairs(ab: Tensor, ac: Tensor, bc: Tensor) -> Tensor:
    """sigma from the three pairwise agreements (bool tensors of one shape): 0 when all three
    pairs agree, 1 when none does, 0.5 otherwise (two of the three agree). Returns float32."""
    n = ab.int() + ac.int() + bc.int()
    return torch.where(n == 3, 0.0, torch.where(n == 0, 1.0, 0.5)).float()


def modes(sigma: Tensor) -> Tensor:
    """Number of slots gated per input: sigma rounded to the nearest of 0 / 0.5 / 1 -> 1 / 2 / 3."""
    return 1 + (sigma >= 0.25).long() + (sigma >= 0.75).long()


def top3(score: Tensor) -> Tensor:
    """Indices ``(..., 3)`` of the three best slots of ``score (..., K)`` (higher = better), best
    first; ties go to the lower index."""
    assert score.shape[-1] >= N_PROBES, "ACAR needs at least 3 slots"
    return score.topk(N_PROBES, dim=-1).indices


def equal_gates(top: Tensor, n: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Gates ``(..., K)``: ``1 / n`` on the first ``n (...)`` of ``top (..., 3)``, 0 elsewhere (sum 1)."""
    rank = torch.arange(N_PROBES, device=top.device)
    on = (rank < n.unsqueeze(-1)).to(dtype) / n.unsqueeze(-1).to(dtype)        # (..., 3)
    g = torch.zeros(*top.shape[:-1], k, device=top.device, dtype=dtype)
    return g.scatter_add_(-1, top, on)


def usage(counts: dict[int, int]) -> dict:
    """Mode counts -> ``mode1..3, mean_slots, saved_vs_always3`` (adapter units of the final pass
    against always running three: ``1 - mean_slots / 3``; NaN for no inputs)."""
    total = sum(counts.values())
    mean = sum(m * c for m, c in counts.items()) / total if total else float("nan")
    return {**{f"mode{m}": int(counts[m]) for m in MODES}, "mean_slots": mean,
            "saved_vs_always3": 1 - mean / N_PROBES if total else float("nan")}


@dataclass
class AnalyticAcar:
    """The analytic sandbox's ACAR: gates ``(*b, N, K)``, sigma and mode ``(*b, N)``, candidates ``(*b, N, 3)``."""

    gates: Tensor
    sigma: Tensor
    mode: Tensor
    top: Tensor

    def counts(self) -> Tensor:
        """Inputs gated with 1, 2 and 3 slots per leading row: ``(*b, 3)`` (long)."""
        return torch.stack([(self.mode == m).sum(-1) for m in MODES], -1)


def _gram_at(G: Tensor, top: Tensor, i: int, j: int) -> Tensor:
    """``G[..., top_i, top_j]``: G ``(*b, K, K)``, top ``(*b, N, 3)`` -> ``(*b, N)``."""
    rows = G.gather(-2, top[..., i:i + 1].expand(*top.shape[:-1], G.shape[-1]))   # (*b, N, K): row top_i
    return rows.gather(-1, top[..., j:j + 1]).squeeze(-1)


def slot_agreement(G: Tensor, top: Tensor, tol: float) -> tuple[Tensor, Tensor, Tensor]:
    """Pairwise agreement of the candidates' predictions (module docstring): G ``(*b, K, K)`` the
    slots' Gram matrix (``G_jl = <W_j, W_l>_F``), top ``(*b, N, 3)`` -> three bool ``(*b, N)``
    (pairs 0-1, 0-2, 1-2). Two slots agree when ``||W_j - W_l||_F <= tol max(||W_j||_F, ||W_l||_F)``."""
    norm2 = [_gram_at(G, top, i, i) for i in range(N_PROBES)]

    def agree(i: int, j: int) -> Tensor:
        dist2 = (norm2[i] + norm2[j] - 2 * _gram_at(G, top, i, j)).clamp_min(0)
        return dist2 <= tol ** 2 * torch.maximum(norm2[i], norm2[j])

    return agree(0, 1), agree(0, 2), agree(1, 2)


@torch.no_grad()
def analytic_gates(G: Tensor, score: Tensor, tol: float = DEFAULT_TOL) -> AnalyticAcar:
    """ACAR's gates in the analytic sandbox: ``G (*b, K, K)`` the bank's Gram matrix, ``score (*b, N, K)``
    the cheap per-input score (the router's logits ``h W + b`` for each context draw). Top-3 of the
    score, sigma from the candidates' agreement (`slot_agreement`), 1 / 2 / 3 candidates gated
    ``1 / n``. Runs under ``no_grad``: nothing here is learned or differentiated."""
    top = top3(score)
    sigma = sigma_from_pairs(*slot_agreement(G, top, tol))
    n = modes(sigma)
    return AnalyticAcar(equal_gates(top, n, score.shape[-1], G.dtype), sigma, n, top)
