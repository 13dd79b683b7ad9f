"""Gate diagnostics: does a router collapse onto a few slots, spread evenly, or specialise by domain?

Pure functions on arrays (numpy; torch tensors are accepted and read as arrays, nothing here imports
torch). The input is the gates of held-out tokens, ``gates (N, K)``, with a domain label per token,
``domains (N,)`` in ``0..M-1``. Two kinds of diagnostic:

- **Matrix diagnostics** need only the mean gate per (domain, slot), ``G (M, K)`` (`domain_matrix`;
  the ``mean_gate`` of ``gates.csv``), so a figure can recompute them from the table. Each domain
  weighs the same. With ``mass_m = sum_k G[m, k]`` (a domain's total gate weight per token):

  - ``share[m, k] = G[m, k] / mass_m``: domain m's share of its gate mass on slot k;
  - ``pooled[k] = sum_m G[m, k] / sum_{m,k} G``: the pooled share (what `figures.gates`' monopoly
    index sorts);
  - ``slots5``: slots whose pooled share exceeds ``threshold`` (5%); ``slots5_domain[m]`` the same on
    ``share[m]``. K for even use, 1 for a monopoly of one slot;
  - ``top4``: the pooled share of the ``top`` (4) heaviest slots (top / K for even use);
  - ``mi``: mutual information (nats) between domain and slot under the joint
    ``P(m, k) = G[m, k] / sum G``: ``sum P log(P / (P(m) P(k)))``. 0 when every domain uses the slots
    alike (collapse or even spread), ``log M`` when each domain has slots of its own;
  - ``own[m] = share[m, own_slot[m]]``: domain m's share on its own specialist's slot (the slot the
    starting bank aligned with domain m's specialist); 1 / K by chance.

- **Token diagnostics** need every token's gates:

  - ``entropy``: mean over tokens of ``-sum_k p_k log p_k`` with ``p = g / sum_k g`` (nats; ``log K``
    for even use, 0 for one slot);
  - ``mass``: mean total gate weight per token ``sum_k g_k`` (1 for a softmax);
  - ``open``: mean over tokens of ``sum_k (g_k - f_k)`` with ``f`` the per-slot floors (the sigmoid
    router's input-independent lower bound; zero for a softmax, so there ``open = mass``): how much of
    the gate the router can still move;
  - ``spread``: mean over slots of the standard deviation over tokens of ``g_k`` (population SD): how
    much the gates actually depend on the input. 0 for a router that gives every token the same gates.

`gate_stats` returns all of them as one dict; `columns` flattens it into table columns
(``gate_<name>_<phase>``; per-domain values averaged over domains).
"""

from __future__ import annotations

import math

import numpy as np

from sandbox.errors import check

#: Diagnostics of `gate_stats`, in table order (per-domain ones, ``*_domain`` and ``own``, hold lists).
NAMES = ("entropy", "slots5", "slots5_domain", "top4", "mi", "own", "mass", "open", "spread")
#: Share of the mass above which a slot counts as used (`matrix_stats`).
THRESHOLD = 0.05
#: Slots the concentration share counts (`matrix_stats`): a 4-of-16 monopoly has ``top4 = 1``.
TOP = 4


def _array(x) -> np.ndarray:
    if hasattr(x, "detach"):   # a torch tensor, read without importing torch
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=float)


def domain_matrix(gates, domains, n_domains: int | None = None) -> np.ndarray:
    """Mean gate per (domain, slot), ``(M, K)``, from ``gates (N, K)`` and labels ``domains (N,)``.
    A domain with no tokens gets a row of NaN."""
    g = _array(gates)
    d = np.asarray(_array(domains), dtype=np.int64).reshape(-1)
    check(g.ndim == 2 and d.shape == (g.shape[0],), "gates", tuple(g.shape), "(N, K) gates with one label per row")
    M = int(n_domains) if n_domains is not None else (int(d.max()) + 1 if d.size else 0)
    out = np.full((M, g.shape[1]), np.nan)
    for m in range(M):
        rows = g[d == m]
        if len(rows):
            out[m] = rows.mean(0)
    return out


def _xlogx_ratio(p: np.ndarray, q: np.ndarray) -> float:
    mask = p > 0
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def matrix_stats(G, own_slots=None, top: int = TOP, threshold: float = THRESHOLD) -> dict:
    """The matrix diagnostics of ``G (M, K)`` (module docstring): ``slots5``, ``slots5_domain`` (list of
    M), ``top4`` (for ``top`` slots), ``mi`` and, with ``own_slots`` (M slot indices), ``own`` (list of M;
    None without). Rows of NaN (domains without tokens) are left out."""
    G = _array(G)
    check(G.ndim == 2, "G", tuple(G.shape), "a (domains, slots) matrix")
    G = G[~np.isnan(G).any(1)]
    K = G.shape[1]
    total = G.sum()
    if G.size == 0 or total <= 0:
        nan = math.nan
        return {"slots5": nan, "slots5_domain": [], "top4": nan, "mi": nan, "own": None if own_slots is None else []}
    mass = G.sum(1, keepdims=True)                                  # (M, 1)
    share = G / np.where(mass > 0, mass, 1.0)                       # (M, K)
    pooled = G.sum(0) / total                                       # (K,)
    joint = G / total                                               # (M, K)
    pm, pk = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    out = {
        "slots5": int((pooled > threshold).sum()),
        "slots5_domain": [int(v) for v in (share > threshold).sum(1)],
        "top4": float(np.sort(pooled)[::-1][:min(top, K)].sum()),
        "mi": max(0.0, _xlogx_ratio(joint, pm * pk)),
        "own": None,
    }
    if own_slots is not None:
        own = [int(k) for k in own_slots]
        check(len(own) == G.shape[0] and all(0 <= k < K for k in own), "own_slots", own,
              f"one slot in 0..{K - 1} per domain")
        out["own"] = [float(share[m, k]) for m, k in enumerate(own)]
    return out


def token_stats(gates, floors=None) -> dict:
    """The token diagnostics of ``gates (N, K)``: ``entropy``, ``mass``, ``open`` (with ``floors (K,)``
    or ``(N, K)``; zero floors when None) and ``spread`` (module docstring)."""
    g = _array(gates)
    check(g.ndim == 2, "gates", tuple(g.shape), "(N, K) gates")
    if g.shape[0] == 0:
        return {"entropy": math.nan, "mass": math.nan, "open": math.nan, "spread": math.nan}
    tot = g.sum(1, keepdims=True)
    p = g / np.where(tot > 0, tot, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    f = np.zeros_like(g) if floors is None else np.broadcast_to(_array(floors), g.shape)
    return {"entropy": float(-plogp.sum(1).mean()), "mass": float(tot.mean()), "open": float((g - f).sum(1).mean()),
            "spread": float(g.std(0).mean())}


def gate_stats(gates, domains, n_domains: int | None = None, floors=None, own_slots=None, top: int = TOP,
               threshold: float = THRESHOLD) -> dict:
    """Every diagnostic of `NAMES` for held-out ``gates (N, K)`` with labels ``domains (N,)``:
    `matrix_stats` of `domain_matrix` and `token_stats`. ``own`` is None without ``own_slots``."""
    out = matrix_stats(domain_matrix(gates, domains, n_domains), own_slots, top, threshold)
    out.update(token_stats(gates, floors))
    return {k: out[k] for k in NAMES}


def columns(stats: dict | None, phase: str) -> dict:
    """Table columns ``gate_<name>_<phase>`` of one `gate_stats` dict (None: all NaN); per-domain
    values (a list, or a dict domain -> value) are averaged over domains (NaN when empty or None)."""
    out = {}
    stats = stats or {}
    for k in NAMES:
        v = stats.get(k)
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, (list, tuple)) or v is None:
            v = float(np.mean(v)) if v else math.nan
        out[f"gate_{k}_{phase}"] = v
    return out


#: cells.csv columns the diagnostics add (`columns` of the "before" and "after" phases).
COLUMNS = tuple(f"gate_{k}_{p}" for p in ("before", "after") for k in NAMES)
