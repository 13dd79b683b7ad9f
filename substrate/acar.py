"""ACAR (sigma routing) as a router kind on the transformer: ``--router-kind acar``.

ACAR routes each input by self-consistency: N = 3 probes, sigma = 0 when all three agree, 0.5
when exactly two agree, 1 when all differ; then it runs one, two or three models. Mapped onto our
API (one frozen base, K LoRA slots, gates ``(B, T, K)`` shared by every adapted projection):

1. **Candidates.** A cheap per-slot score ``(K,)`` or ``(B, T, K)`` (higher = better) picks the
   top-3 slots of every token. With no trained router (``--router-kind acar`` trains none) the score is
   minus each slot's held-in loss: the mean token NLL of the model with that slot alone (gate 1,
   the others 0) on ``fit_windows`` training windows per domain, measured once when the run's state
   is built (`held_in_score`), so the three candidates are the same for every sequence. A router's
   logits ``(B, T, K)`` (causal prefix features) can be passed instead (`acar_gates` takes any score).
2. **Probes.** Three forward passes, probe j gating the j-th candidate alone; each gives the
   next-token argmax prediction of every position (`probe_predictions`). Position t's prediction
   reads only tokens <= t (the model is causal), never the target.
3. **Sigma, causal.** Per position s the disagreement ``d_s`` of the three argmaxes is 0 / 0.5 / 1
   (`disagreement`). Token t's sigma is the mean of ``d_s`` over its prefix ``s <= t``
   (`prefix_sigma`): a running self-consistency of the sequence so far, so changing a later token
   never changes an earlier token's gates.
4. **Gates.** sigma is rounded to the nearest of {0, 0.5, 1} (``< 1/4`` -> 1 slot, ``< 3/4`` ->
   2 slots, else 3) and the top-1, top-2 or top-3 candidates get equal gates ``1 / n`` (the gates
   sum to 1, like the softmax's). Everything runs under ``torch.no_grad``: no gradient reaches the
   score, the router or the probes; the adapters still learn through the gated forward pass.

Compute is counted in adapter-forward units per token: the final pass runs n in {1, 2, 3} adapters
where always-three would run 3, so ``saved = 1 - mean(n) / 3``. The three single-slot probes are
counted separately (``probe_units``, 3 per token): in ACAR the probes are the cheap model's
samples; here they are full forwards of the same model, so this implementation saves adapter
compute in the final pass only, not wall time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from sandbox import acar as rule
from sandbox.acar import MODES, N_PROBES, equal_gates, modes  # noqa: F401  (the shared rule, re-exported)


def disagreement(preds: Tensor) -> Tensor:
    """Per-position disagreement of three predictions ``preds (..., 3)`` (any integer labels):
    0 when all three agree, 0.5 when exactly two agree, 1 when all differ. Returns ``(...)`` float."""
    a, b, c = preds[..., 0], preds[..., 1], preds[..., 2]
    return rule.sigma_from_pairs(a == b, a == c, b == c)


def prefix_sigma(d: Tensor) -> Tensor:
    """Causal sigma: ``sigma[..., t] = mean(d[..., :t + 1])`` over the last (time) axis."""
    t = torch.arange(1, d.shape[-1] + 1, device=d.device, dtype=torch.float32)
    return d.float().cumsum(-1) / t


def top3(score: Tensor, shape: tuple[int, int]) -> Tensor:
    """Indices ``(B, T, 3)`` of the three best slots of `score` (``(K,)`` or ``(B, T, K)``), best first."""
    B, T = shape
    s = score.float()
    if s.dim() == 1:
        s = s.expand(B, T, -1)
    return rule.top3(s)                                                         # ties: lowest index first


@torch.no_grad()
def probe_predictions(model, x: Tensor, top: Tensor, k: int) -> Tensor:
    """Next-token argmax ``(B, T, 3)`` of probe j = the model with candidate ``top[..., j]`` alone."""
    out = []
    for j in range(N_PROBES):
        g = torch.nn.functional.one_hot(top[..., j], k).float()                  # (B, T, K)
        out.append(model(x, g).argmax(-1))                                      # (B, T)
    return torch.stack(out, -1)


@dataclass
class AcarResult:
    """Gates ``(B, T, K)``, per-token sigma and mode ``(B, T)`` and the candidates ``(B, T, 3)``."""

    gates: Tensor
    sigma: Tensor
    mode: Tensor
    top: Tensor

    def counts(self) -> dict[int, int]:
        """Tokens gated with 1, 2 and 3 slots."""
        return {m: int((self.mode == m).sum()) for m in MODES}


@torch.no_grad()
def acar_gates(model, x: Tensor, score: Tensor, k: int) -> AcarResult:
    """ACAR's gates for tokens ``x (B, T)`` given the cheap per-slot `score` (``(K,)`` or ``(B, T, K)``)."""
    top = top3(score.to(x.device), tuple(x.shape))
    preds = probe_predictions(model, x, top, k)
    sigma = prefix_sigma(disagreement(preds))
    n = modes(sigma)
    return AcarResult(equal_gates(top, n, k), sigma, n, top)


@torch.no_grad()
def held_in_score(model, x: Tensor, y: Tensor, k: int, chunk: int = 4) -> Tensor:
    """Minus each slot's held-in loss ``(K,)``: mean token NLL on ``x, y (N, T)`` (training windows)
    with that slot alone gated 1. Higher is better."""
    N, T = x.shape
    nll = []
    for k0 in range(0, k, chunk):
        ks = torch.arange(k0, min(k, k0 + chunk), device=x.device)
        c = len(ks)
        g = torch.nn.functional.one_hot(ks, k).float()[:, None, None, :].expand(c, N, T, k).reshape(c * N, T, k)
        nll.append(model.token_nll(x.repeat(c, 1), y.repeat(c, 1), g).float().view(c, N * T).mean(-1))
    return -torch.cat(nll).cpu()


def usage_row(counts: dict[int, int], **labels) -> dict:
    """One acar.csv row: tokens per mode, their shares, mean slots and the compute saved against
    always running three (adapter-forward units of the final pass; probes counted apart)."""
    tokens = sum(counts.values())
    mean = sum(m * c for m, c in counts.items()) / tokens if tokens else float("nan")
    row = dict(labels)
    row.update({f"mode{m}": counts[m] for m in MODES})
    row.update({f"share{m}": counts[m] / tokens if tokens else float("nan") for m in MODES})
    row.update({"tokens": tokens, "mean_slots": mean, "adapter_units": sum(m * c for m, c in counts.items()),
                "always3_units": N_PROBES * tokens, "probe_units": N_PROBES * tokens,
                "saved_vs_always3": 1 - mean / N_PROBES if tokens else float("nan")})
    return row
