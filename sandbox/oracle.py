"""The routing ceiling: the exact best gates for given adapters (a bound, not a method).

For one domain the expected loss of constant gates ``g (K,)`` is the convex quadratic
``f(g) = g^T G g - 2 g^T c + e`` (`sandbox.analytic.gram_terms`, ``G`` positive semi-definite).
The best gates any router could reach:

* ``softmax``: on the probability simplex ``{g >= 0, sum g = 1}`` (the closure of the softmax's
  range: a softmax approaches a vertex or a face but never reaches it, so this is a supremum);
* ``sigmoid``: in the box ``[0, 1]^K`` (the closure of ``f + (1 - f) sigmoid(z / tau)`` over the
  learnable floors ``f`` in ``[0, floor_max]`` and all logits ``z``).

`best_gates` solves every problem of a batch at once: accelerated projected gradient (FISTA,
step ``1 / L`` with ``L = 2 lambda_max(G)``), then an exact polish on the active set it found
(the KKT system of the face, solved in one batched least-squares solve with LAPACK's gelsd: the
default gelsy gave results differing in the last bit from run to run) kept wherever it is
feasible and no worse. Tests check it against brute-force enumeration of every face.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sandbox.errors import check

SETS = ("simplex", "box")


def feasible_set(router_kind: str) -> str:
    """The closure of a router's gate range: ``simplex`` for softmax, ``box`` for sigmoid, a
    plugin's declared ``feasible`` set (`sandbox.router.RouterKind`)."""
    if router_kind in ("softmax", "sigmoid"):
        return "simplex" if router_kind == "softmax" else "box"
    from sandbox.router import kind_of, RouterConfig

    return kind_of(RouterConfig(kind=router_kind)).feasible


def quadratic(g: Tensor, G: Tensor, c: Tensor) -> Tensor:
    """``g^T G g - 2 g^T c``: g ``(*b, K)``, G ``(*b, K, K)``, c ``(*b, K)`` -> ``(*b,)``."""
    return ((g.unsqueeze(-2) @ G).squeeze(-2) * g).sum(-1) - 2 * (g * c).sum(-1)


def project_simplex(y: Tensor) -> Tensor:
    """Euclidean projection of ``y (*b, K)`` onto the probability simplex (sort-based, exact)."""
    K = y.shape[-1]
    u, _ = torch.sort(y, dim=-1, descending=True)                          # (*b, K)
    css = u.cumsum(-1) - 1                                                 # (*b, K)
    idx = torch.arange(1, K + 1, dtype=y.dtype, device=y.device)           # (K,)
    cond = u - css / idx > 0                                               # (*b, K)
    rho = cond.to(y.dtype).cumsum(-1).argmax(-1, keepdim=True)             # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(y.dtype)                    # (*b, 1)
    return (y - theta).clamp_min(0)


def _project(y: Tensor, kind: str) -> Tensor:
    return project_simplex(y) if kind == "simplex" else y.clamp(0.0, 1.0)


def best_gates(G: Tensor, c: Tensor, kind: str, iters: int = 400, init: Tensor | None = None) -> Tensor:
    """``argmin_g g^T G g - 2 g^T c`` over the simplex or the box, for a batch.

    G ``(*b, K, K)`` (symmetric PSD), c ``(*b, K)`` -> g ``(*b, K)``; `init` warm-starts FISTA.
    """
    check(kind in SETS, "oracle set", kind, "simplex or box")
    K = c.shape[-1]
    G = 0.5 * (G + G.transpose(-1, -2))
    L = 2 * torch.linalg.eigvalsh(G)[..., -1].clamp_min(1e-12)             # (*b,)
    step = (1 / L).unsqueeze(-1)                                           # (*b, 1)
    start = init if init is not None else torch.full_like(c, 1.0 / K if kind == "simplex" else 0.5)
    x = _project(start, kind)
    y, t = x.clone(), 1.0
    for _ in range(iters):
        grad = 2 * ((y.unsqueeze(-2) @ G).squeeze(-2) - c)                 # (*b, K)
        x_new = _project(y - step * grad, kind)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = x_new + ((t - 1) / t_new) * (x_new - x)
        x, t = x_new, t_new
    return _polish(x, G, c, kind)


def _polish(x: Tensor, G: Tensor, c: Tensor, kind: str, tol: float = 1e-9) -> Tensor:
    """Solve the KKT system on the face FISTA found; keep it where feasible and no worse."""
    K = c.shape[-1]
    eye = torch.eye(K, dtype=G.dtype, device=G.device).expand_as(G)
    if kind == "simplex":
        free = x > tol                                                      # (*b, K)
        rows = torch.where(free.unsqueeze(-1), 2 * G, eye)                  # (*b, K, K)
        ones_col = free.to(G.dtype).unsqueeze(-1)                           # nu enters free rows only
        top = torch.cat([rows, ones_col], dim=-1)                           # (*b, K, K+1)
        last = torch.cat([torch.ones_like(c), torch.zeros_like(c[..., :1])], dim=-1).unsqueeze(-2)
        A = torch.cat([top, last], dim=-2)                                  # (*b, K+1, K+1)
        rhs = torch.cat([torch.where(free, 2 * c, torch.zeros_like(c)), torch.ones_like(c[..., :1])], dim=-1)
        sol = torch.linalg.lstsq(A, rhs.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)[..., :K]
        ok = (sol >= -1e-12).all(-1) & ((sol.sum(-1) - 1).abs() < 1e-9)
        sol = project_simplex(sol)
    else:
        lo, hi = x <= tol, x >= 1 - tol
        free = ~(lo | hi)
        fixed_val = torch.where(hi, torch.ones_like(x), torch.zeros_like(x))
        A = torch.where(free.unsqueeze(-1), 2 * G, eye)
        rhs = torch.where(free, 2 * c, fixed_val)
        sol = torch.linalg.lstsq(A, rhs.unsqueeze(-1), driver="gelsd").solution.squeeze(-1)
        ok = ((sol >= -1e-12) & (sol <= 1 + 1e-12)).all(-1)
        sol = sol.clamp(0.0, 1.0)
    better = ok & torch.isfinite(sol).all(-1) & (quadratic(sol, G, c) <= quadratic(x, G, c) + 1e-14)
    return torch.where(better.unsqueeze(-1), sol, x)
