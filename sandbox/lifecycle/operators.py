"""Operators on factors (one bank, batch flattened to n): inheritance blend, SLERP crossover, SVD
mutation, fresh init, the built-in router reallocation (`point_at_worst_domain`), and the reset of
the replaced slots' Adam state."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sandbox.adapters import lowrank_svd, product_inner, product_norm, rand, randn, refactor, split_factors
from sandbox.errors import check
from sandbox.lifecycle.config import LifecycleConfig
from sandbox.lifecycle.draws import Generators, _draw


def _take(x: Tensor, idx: Tensor) -> Tensor:
    """``x[i, idx[i]]`` for ``x (n, K, ...)``, ``idx (n,)``."""
    return x[torch.arange(x.shape[0], device=x.device), idx]


def _put(x: Tensor, idx: Tensor, value: Tensor, valid: Tensor) -> Tensor:
    """Copy of ``x (n, K, ...)`` with ``x[i, idx[i]] = value[i]`` where ``valid[i]``; others untouched."""
    K = x.shape[1]
    hit = (torch.nn.functional.one_hot(idx, K).bool() & valid.unsqueeze(-1))  # (n, K)
    hit = hit.reshape(*hit.shape, *([1] * (x.dim() - 2)))
    return torch.where(hit, value.unsqueeze(1).to(x.dtype), x)


def blend(A_n: Tensor, B_n: Tensor, A_d: Tensor, B_d: Tensor, alpha: float, rank: int) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of ``(1 - alpha) B_n A_n + alpha B_d A_d`` (per row, factor form).

    A ``(n, r, d_in)``, B ``(n, d_out, r)``; the 2r-wide stacked factors are re-factorised by
    `refactor` (QR + small SVD)."""
    L = torch.cat([(1 - alpha) * B_n, alpha * B_d], dim=-1)  # (n, d_out, 2r)
    R = torch.cat([A_n, A_d], dim=-2)  # (n, 2r, d_in)
    return refactor(L, R, rank)


def slerp_factors(A1: Tensor, B1: Tensor, A2: Tensor, B2: Tensor, t: float | Tensor, rank: int,
                  eps: float = 1e-7) -> tuple[Tensor, Tensor]:
    """Rank-``rank`` factors of the SLERP of two updates ``X1 = B1 A1`` and ``X2 = B2 A2`` (per row).

    As in EvoMerge/mergekit, each update is one flattened vector: with ``theta`` the angle between
    X1 and X2, the direction is ``sin((1-t) theta)/sin(theta) X1/|X1| + sin(t theta)/sin(theta)
    X2/|X2|`` and the norm is interpolated linearly, ``(1-t)|X1| + t|X2|``. In factor form: the
    direction is ``[c1 B1, c2 B2] [A1; A2]`` (rank <= 2r, inner products from r x r Grams), cut to
    its best rank-``rank`` approximation (Eckart-Young, `lowrank_svd`) whose singular values are then
    rescaled to the interpolated norm, so the result's norm lies between the parents' exactly.
    Nearly (anti)parallel parents (``sin theta < eps``) use the linear blend of the directions; a
    zero parent contributes only its norm. ``t = 0`` / ``t = 1`` return X1 / X2 (re-factorised),
    identical parents return the parent. A ``(n, r, d_in)``, B ``(n, d_out, r)``, ``t`` a float or
    ``(n,)``. Returns ``A (n, rank, d_in)``, ``B (n, d_out, rank)``; nothing ``d_out x d_in`` is formed.
    """
    f64 = torch.float64
    t = torch.as_tensor(t, dtype=f64, device=A1.device).expand(A1.shape[:-2])  # (n,)
    n1 = product_norm(A1, B1).to(f64)
    n2 = product_norm(A2, B2).to(f64)
    tiny = 1e-300
    cos = (product_inner(A1, B1, A2, B2).to(f64) / (n1 * n2).clamp_min(tiny)).clamp(-1, 1)
    theta = torch.arccos(cos)
    sin = torch.sin(theta)
    lin = sin < eps
    safe = torch.where(lin, torch.ones_like(sin), sin)
    w1 = torch.where(lin, 1 - t, torch.sin((1 - t) * theta) / safe)
    w2 = torch.where(lin, t, torch.sin(t * theta) / safe)
    z1, z2 = n1 <= tiny, n2 <= tiny
    w1, w2 = (torch.where(z1, torch.zeros_like(w1), torch.where(z2, torch.ones_like(w1), w1)),
              torch.where(z2, torch.zeros_like(w2), torch.where(z1, torch.ones_like(w2), w2)))
    c1 = (w1 / n1.clamp_min(tiny)).to(B1.dtype)[..., None, None]
    c2 = (w2 / n2.clamp_min(tiny)).to(B2.dtype)[..., None, None]
    U, S, Vh = lowrank_svd(torch.cat([c1 * B1, c2 * B2], dim=-1), torch.cat([A1, A2], dim=-2))
    target = (1 - t) * n1 + t * n2  # (n,)
    kept = S[..., :rank].to(f64).pow(2).sum(-1).sqrt()
    gain = torch.where(kept > tiny, target / kept.clamp_min(tiny), torch.zeros_like(kept))
    A, B = split_factors(U, S * gain.to(S.dtype).unsqueeze(-1), Vh, rank)
    return A.to(A1.dtype), B.to(B1.dtype)


def _expm(x: Tensor, per_row: bool) -> Tensor:
    """``expm`` of ``x (n, m, m)``. torch picks a cheaper Pade degree for a lone matrix than for a
    batch (degree 18 with scaling and squaring for every matrix), so with per-row generators a lone
    row is padded with a zero matrix to take the batch path: its rotation is then bit-identical to
    the same row's inside any batch (on the CPU). One generator keeps torch's own choice."""
    if per_row and x.shape[0] == 1:
        return torch.linalg.matrix_exp(torch.cat([x, torch.zeros_like(x)]))[:1]  # (2, m, m) -> (1, m, m)
    return torch.linalg.matrix_exp(x)


def _rotate(U: Tensor, angle: float, generator: Generators) -> Tensor:
    """Turn orthonormal columns ``U (n, d, q)`` by a random rotation of the span of U plus q
    random directions: ``U' = U + Q (expm(Omega) - I) Q^T U`` with ``Q`` an orthonormal basis of
    ``[U, G]`` (m = 2q columns) and ``Omega`` skew-symmetric with ``N(0, angle^2 / m)`` entries, so
    ``||Omega u|| ~= angle``: each singular vector turns by about ``angle`` radians whatever the rank.
    U' stays orthonormal and may leave U's column space; cost O(d q^2)."""
    n, d, q = U.shape
    G = _draw(randn, (n, d, q), generator, U.dtype, U.device)
    Q, _ = torch.linalg.qr(torch.cat([U, G], dim=-1))  # (n, d, m), m = min(d, 2q)
    m = Q.shape[-1]
    X = _draw(randn, (n, m, m), generator, U.dtype, U.device)
    omega = (X - X.transpose(-1, -2)) * (angle / math.sqrt(2 * m))  # skew-symmetric, entries ~ N(0, angle^2 / m)
    Rm = _expm(omega, not isinstance(generator, torch.Generator)) - torch.eye(m, dtype=U.dtype, device=U.device)  # (n, m, m)
    return U + Q @ (Rm @ (Q.transpose(-1, -2) @ U))


def mutate_svd(A: Tensor, B: Tensor, sigma: float, rotation: float, generator: Generators,
               rank: int | None = None) -> tuple[Tensor, Tensor]:
    """SVD mutation of adapters ``A (n, r, d_in)``, ``B (n, d_out, r)`` (one adapter per row).

    ``B A = U diag(s) V^T`` -> ``U' diag(s exp(sigma eps)) V'^T`` with ``eps ~ N(0, 1)`` per singular
    value and ``U' = rot(U)``, ``V' = rot(V)`` (see `_rotate`), returned as balanced rank-r factors.
    ``sigma = rotation = 0`` returns exact copies of the inputs. ``generator``: one, or n (one per row).
    """
    rank = rank or A.shape[-2]
    if sigma == 0 and rotation == 0:
        return A.clone(), B.clone()
    U, S, Vh = lowrank_svd(B, A)  # (n, d_out, q), (n, q), (n, q, d_in)
    S = S * torch.exp(sigma * _draw(randn, tuple(S.shape), generator, S.dtype, S.device))
    if rotation > 0:
        U = _rotate(U, rotation, generator)
        Vh = _rotate(Vh.transpose(-1, -2), rotation, generator).transpose(-1, -2)
    return split_factors(U, S, Vh, rank)


def fresh_factors(n: int, rank: int, d_in: int, d_out: int, generator: Generators, like: Tensor) -> tuple[Tensor, Tensor]:
    """A fresh LoRA init per row: ``A ~ U(-1/sqrt(d_in), 1/sqrt(d_in))``, ``B = 0`` (one generator, or n)."""
    bound = 1 / math.sqrt(d_in)
    A = (_draw(rand, (n, rank, d_in), generator, like.dtype, like.device) * 2 - 1) * bound
    return A, like.new_zeros((n, d_out, rank))


def point_at_worst_domain(parent: dict[str, Tensor], domain_losses: Tensor | None, domain_features: Tensor | None,
                          cfg: LifecycleConfig, generator: Generators) -> tuple[dict[str, Tensor], Tensor]:
    """The built-in reallocation (``worst-domain``): the freed slot's router column from its
    parent's, batch flattened.

    ``parent`` holds the parent slot's column of each router parameter, ``W (n, e, F)``, ``bias (n,
    e)``, ``phi (n, e)`` (``e`` extra individuals sharing the population, e.g. the evolution
    population P; e = 1 otherwise). For each row: ``w = w_parent + realloc_noise/sqrt(F) eps +
    realloc_push u / ||u||^2``, where ``u = hbar_{m*} - mean_m hbar_m`` and ``m* = argmax_m
    domain_losses (n, M)`` (``hbar = domain_features (n, M, F)``), so the slot's logit on the worst
    domain's mean feature rises by ``realloc_push`` relative to the mean domain; every other
    parameter is the parent's plus ``realloc_noise eps``.

    Returns the new columns and the target domain per row ``(n,)`` (-1 without domain data).
    ``generator``: one, or n (one per row).
    """
    W = parent["W"]
    n, e, F = W.shape
    target = torch.full((n,), -1, dtype=torch.long, device=W.device)
    push = W.new_zeros((n, F))
    if domain_losses is not None and domain_features is not None and cfg.realloc_push > 0:
        target = domain_losses.argmax(-1)  # (n,)
        hbar = domain_features.to(W.dtype)  # (n, M, F)
        u = _take(hbar, target) - hbar.mean(-2)  # (n, F)
        push = cfg.realloc_push * u / (u * u).sum(-1, keepdim=True).clamp_min(1e-12)
    out = {}
    for name, src in parent.items():
        noise = _draw(randn, tuple(src.shape), generator, src.dtype, src.device) * cfg.realloc_noise
        if name == "W":
            src = src + noise / math.sqrt(F) + push.unsqueeze(1)
        else:
            src = src + noise
        out[name] = src
    return out, target


# ---------------------------------------------------------------------------------------------
# Adam state
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def reset_adam_state(optimizer: torch.optim.Optimizer, param: Tensor, slot_mask: Tensor, slot_dim: int) -> None:
    """Zero Adam's ``exp_avg``/``exp_avg_sq`` (and ``max_exp_avg_sq``) for the reset slots of ``param``.

    ``slot_mask (*b, K)`` bool; ``param`` has the batch dims first and the slot axis at
    ``slot_dim`` (e.g. -3 for ``A (*b, K, r, d_in)``, -1 for router ``W (*b, F, K)``). The scalar
    ``step`` count is shared by the whole tensor and is left alone.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    nb = slot_mask.dim() - 1
    s = slot_dim % param.dim()
    check(s >= nb and param.shape[s] == slot_mask.shape[-1], "slot_dim", slot_dim, f"the slot axis of a {tuple(param.shape)} parameter")
    shape = list(slot_mask.shape[:nb]) + [1] * (param.dim() - nb)
    shape[s] = slot_mask.shape[-1]
    m = slot_mask.reshape(shape).to(param.device)  # (*b, 1.., K, 1..) aligned with param
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state and torch.is_tensor(state[key]) and state[key].shape == param.shape:
            state[key].masked_fill_(m, 0)


def reset_mask(events: list[dict], batch_shape: tuple[int, ...], n_slots: int,
               kinds: tuple[str, ...] = ("birth", "inherit"), device=None) -> Tensor:
    """``(*b, K)`` bool: slots whose parameters a lifecycle step replaced (for `reset_adam_state`)."""
    mask = torch.zeros((math.prod(batch_shape), n_slots), dtype=torch.bool)
    for ev in events:
        if ev["event"] in kinds:
            mask[ev["batch"], ev["slot"]] = True
    return mask.reshape(*batch_shape, n_slots).to(device) if device is not None else mask.reshape(*batch_shape, n_slots)
