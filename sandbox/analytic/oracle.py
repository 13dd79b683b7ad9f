"""Gates read off an arm's final adapters instead of its router: the exact best constant gates per
domain (`sandbox.oracle`, the ceiling) and ACAR's gates (`sandbox.acar`), with their losses."""

from __future__ import annotations

import torch
from torch import Tensor

from sandbox import acar as acr
from sandbox import oracle as orc
from sandbox.analytic.gram import quadratic_loss, task_terms
from sandbox.analytic.rows import Solver
from sandbox.router import router_logits
from sandbox.tasks import Task


@torch.no_grad()
def _acar_losses(params: dict[str, Tensor], A: Tensor, B: Tensor, task: Task, feats: Tensor,
                 scale: float | Tensor, tol: float) -> tuple[Tensor, Tensor]:
    """Per-domain excess loss ``(S, M)`` under ACAR's gates (`sandbox.acar.analytic_gates`: top-3 of the
    router's logits per context draw, sigma from the candidates' agreement, equal gates) and the
    inputs gated with 1 / 2 / 3 slots per seed ``(S, 3)`` (over every domain and draw of `feats`)."""
    S, M, N, F = feats.shape
    G, c, e = task_terms(A, B, task, scale)
    logits = router_logits(params, feats.reshape(S, M * N, F))                       # (S, M*N, K)
    res = acr.analytic_gates(G, logits, tol)
    gates = res.gates.reshape(S, M, N, -1)                                           # (S, M, N, K)
    return quadratic_loss(gates, G, c, e).mean(-1), res.counts()                   # (S, M), (S, 3)


def _table_losses(table: Tensor, A: Tensor, B: Tensor, task: Task, scale: float | Tensor) -> Tensor:
    """Per-domain excess loss ``(S, M)`` of constant gates per domain ``table (S, M, K)`` (feature-free)."""
    G, c, e = task_terms(A, B, task, scale)
    return quadratic_loss(table.unsqueeze(-2), G, c, e).squeeze(-1)             # (S, M)


@torch.no_grad()
def _oracle_table(run: Solver, warm: Tensor | None) -> Tensor:
    """The exact best gates per domain for the current adapters: ``(S, M, K)`` (`sandbox.oracle`);
    ``warm`` (the previous table or None) starts the solver."""
    A, B = run.bank
    G, c, _ = task_terms(A, B, run.task, run.scale)     # (S, K, K), (S, M, K)
    Gm = G.unsqueeze(1).expand(-1, c.shape[1], -1, -1)                               # (S, M, K, K)
    return orc.best_gates(Gm, c, orc.feasible_set(run.rcfg.kind), init=warm)
