"""The events on an arm's schedule that are not gradient steps: one generation of routing search
(`_generation`) and one lifecycle event on the bank (`_lifecycle`), both in place on the solver's
tensors and on the excess (floor-free) loss."""

from __future__ import annotations

import torch
from torch import Tensor

from sandbox import evolution as evo
from sandbox import lifecycle as lc
from sandbox.analytic.adam import _Adam
from sandbox.analytic.gram import batch_domain_losses, domain_losses, leave_one_out, quadratic_loss, task_terms
from sandbox.analytic.rows import Solver
from sandbox.router import params_to_vector, router_gates, vector_to_params
from sandbox.streams import Purpose, generator


@torch.no_grad()
def _generation(run: Solver, feats: Tensor, step: int, search: evo.SearchState, gens: list, alive: Tensor,
                X: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One generation of routing search in place on ``run.tensors``, on the excess objective (floor-free).

    Returns ``(accepted (S,) bool, gain (S,))``: ``gain`` = parent objective - new router's
    objective (es: >= 0, elitist; cma: its new mean, evaluated once more, may lose), ``accepted``
    where the gain is at least ``accept_tol`` of the parent's objective. For es a child replaces the
    parent only then, so a generation that is not accepted leaves the router unchanged. ``feats``
    ``(S, M, N, F)``, ``X`` the step's inputs ``(S, M, d, n)`` (None: the exact loss)."""
    task, rcfg, scale, ecfg, accept_tol = run.task, run.rcfg, run.scale, run.evolution, run.cfg.accept_tol
    params = run.params
    x = params_to_vector(params)                                                     # (S, D)
    units = evo.mutation_scales(params) if ecfg.method == "fixed" else evo.logit_units(params)
    pop = evo.propose(x, params_to_vector(units), search, ecfg, gens)                # (S, P, D)
    A, B = run.bank

    def objective(p: dict[str, Tensor]) -> Tensor:    # (S, P): exact, or on the step's finite batch X
        if X is None:
            return domain_losses(rcfg, p, A, B, task, feats, step, scale).mean(-1)
        return batch_domain_losses(rcfg, p, A, B, task, feats, step, scale, X).mean(-1)

    obj = objective(vector_to_params(pop, rcfg))                                    # (S, P)
    parent = obj[:, 0]
    new, took = evo.advance(search, pop, obj, ecfg, active=alive, min_gain=accept_tol * parent)
    if ecfg.method == "cma":   # the new mean was not among the evaluated members
        now = objective(vector_to_params(new[:, None], rcfg))[:, 0]
    else:
        now = evo._finite_or_inf(obj).gather(1, evo.select(pop, obj)[1][:, None])[:, 0]
        now = torch.where(took, now, parent)
    g = torch.where(alive & torch.isfinite(now), parent - now, torch.zeros_like(parent))
    new = vector_to_params(new, rcfg)
    for k in run.state.params:
        run.tensors[k].copy_(new[k])
    return alive & (g >= accept_tol * parent) & (g > 0), g


def lifecycle_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of seed `seed`'s lifecycle event at `step`: a pure function of
    ``(seed, lifecycle stream, step)``, hashed by numpy's `SeedSequence` (no collisions in practice)."""
    return generator(Purpose.SANDBOX_LIFECYCLE, seed, step)


@torch.no_grad()
def _lifecycle(run: Solver, pop: lc.Population, feats: Tensor, step: int, opt: _Adam) -> tuple[lc.Population, list]:
    """One lifecycle event on the bank (in place on ``run.tensors``), with leave-one-out fitness in Gram form.

    ``loo[s, k, m]`` = domain m's loss with slot k's gate zeroed (`leave_one_out`), so the fitness is
    ``agg_m (loo - full)`` (the loss floor cancels: both are excess losses). Each seed draws from its own generator (`lifecycle_generator`), so a
    seed's lifecycle does not depend on which seeds share its batch (resumed sweeps reproduce).
    Adam moments of replaced slots (bank and router columns) are zeroed.
    """
    task, rcfg, scale = run.task, run.rcfg, run.scale
    lcfg = run.cfg.lifecycle_config
    params = run.params
    A, B = run.bank
    S, M, N, F = feats.shape
    G, c, e = task_terms(A, B, task, scale)
    gates = router_gates(rcfg, params, feats.reshape(S, M * N, F), step).reshape(S, M, N, -1)   # (S, M, N, K)
    full = quadratic_loss(gates, G, c, e).mean(-1)                                             # (S, M) excess
    loo = leave_one_out(gates, G, c, e).mean(-2)                                               # (S, M, K)
    fit = lc.fitness(loo.transpose(-1, -2), full, lcfg.scope, lcfg.per_domain_agg)            # (S, K)
    gens = [lifecycle_generator(s, step) for s in task.seeds]

    def finetune_loss(fac, rp, target, k, gen):  # closed-form loss of each row's target domain (-1: all)
        Gf, cf, ef = task_terms(fac[0], fac[1], task, scale)
        gf = router_gates(rcfg, rp, feats.reshape(S, M * N, F), step).reshape(S, M, N, -1)
        per = quadratic_loss(gf, Gf, cf, ef).mean(-1)                                          # (S, M)
        return torch.where(target >= 0, per.gather(-1, target.clamp_min(0)[:, None])[:, 0], per.mean(-1))

    pop, (A2, B2), new_params, events = lc.lifecycle_step(pop, (A, B), params, fit, lcfg, gens, step,
                                                          domain_losses=full, domain_features=feats.mean(-2),
                                                          finetune=finetune_loss if lcfg.finetunes else None)
    mask = lc.reset_mask(events, (S,), A.shape[1], device=A.device)                                           # (S, K)
    A.copy_(A2)
    B.copy_(B2)
    for k in run.state.params:
        run.tensors[k].copy_(new_params[k])
    for k, m in opt.m.items():
        slot_mask = mask[:, None, :] if k == "W" else (mask[:, :, None, None] if k in ("A", "B") else mask)
        keep = (~slot_mask).to(m.dtype)
        m.mul_(keep)
        opt.v[k].mul_(keep)
    for ev in events:
        ev["row"] = ev.pop("batch")
        ev["seed"] = task.seeds[ev["row"]]
    return pop, events
