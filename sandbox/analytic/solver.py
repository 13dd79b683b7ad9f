"""One arm for every row of stacked grid points (`solve_rows`): the gradient steps, the events on the
arm's schedule and the final losses."""

from __future__ import annotations

import torch
from torch import Tensor

from sandbox import evolution as evo
from sandbox import lifecycle as lc
from sandbox.analytic.adam import _Adam
from sandbox.analytic.config import _EVAL_SALT, ALL_ARMS, DTYPE, evo_evaluations, router_config
from sandbox.analytic.events import _generation, _lifecycle
from sandbox.analytic.gram import _per_row, batch_domain_losses, domain_losses
from sandbox.analytic.oracle import _acar_losses, _oracle_table, _table_losses
from sandbox.analytic.result import ArmResult
from sandbox.analytic.rows import Rows, Solver, State, _features, _task_to, initial_rows_state
from sandbox.errors import check
from sandbox.streams import Purpose, generator


def solve_rows(rows: Rows, arm: str, state: State | None = None, with_ceiling: bool = False,
               with_acar: bool = False, device: torch.device | str | None = None,
               diagnostics: bool = True) -> ArmResult:
    """Run one arm for every row of `rows` (stacked grid points x seeds) at once.

    ``with_ceiling`` (grad arm only) also returns, as ``result.ceiling``, the ``oracle`` arm in
    ceiling mode: it follows the grad trajectory exactly, so it is the best gates for this run's
    final adapters, without running the same steps twice. ``with_acar`` (grad arm only) likewise
    returns the ``acar`` arm as ``result.acar`` (ACAR's gates on grad's final router and adapters).

    The loss floor is a constant: every gradient, search selection and lifecycle fitness is
    computed on the *excess* loss (loss minus the floor), so the trajectories do not depend on it
    bit for bit; the floor is added to the reported losses only. Besides the final losses, every
    arm records its excess at the start (``initial_excess``), at half the budget (``half_excess``,
    on the evaluation draws) and the excess of the best constant routing of its own final adapters
    (``oracle_excess``, `sandbox.oracle`: the per-arm routing room). The search arm records, per
    seed, its total gain on the objective (``search_gain``) and the generations whose gain was at
    least ``accept_tol`` of the router's excess objective (``accepted``).

    ``diagnostics=False`` (the tuner, which reads final losses only) skips the per-arm best routing
    (``oracle_excess`` is then None); the trajectory is the same.

    ``device`` (default CPU) holds the solver's tensors. `rows` and `state` stay on the CPU, where
    every random draw is made (per-seed CPU generators: the same numbers on any device), then
    moved; the result's tensors come back on the CPU."""
    check(arm in ALL_ARMS, "arm", arm, "one of " + ", ".join(ALL_ARMS))
    dev = torch.device("cpu") if device is None else torch.device(device)
    spec, cfg = rows.spec, rows.cfg
    task = _task_to(rows.task, dev)           # U, V in float64 once, not at every loss evaluation
    rcfg = router_config(spec, cfg)
    scale, loss_floor = rows.scale.to(dev), rows.loss_floor.to(dev)
    st = (state or initial_rows_state(rows)).to(dev).clone()
    # B lives transposed in memory, (S, K, r, d) contiguous: `gram_terms` reads it without a copy and
    # its gradient and Adam moments come out in the same layout (element-wise ops are layout-blind)
    st.B = st.B.transpose(-1, -2).contiguous().transpose(-1, -2)
    S = len(task.seeds)
    steps = cfg.steps
    ceiling = arm == "oracle" and cfg.oracle == "ceiling"   # the grad trajectory, best gates at the end
    ceiling = ceiling or arm == "acar"                      # the grad trajectory, ACAR's gates at the end
    plain = arm in ("grad", "beta2") or ceiling             # no events on the schedule
    if (arm == "grad" or ceiling) and cfg.budget == "evals":
        steps = evo_evaluations(spec, cfg)
    train_adapters = cfg.plasticity > 0
    draws = 1 if spec.context_noise == 0 else cfg.draws
    eval_feats = _features(rows, _EVAL_SALT, cfg.eval_draws, dev)
    fixed_feats = _features(rows, 0, draws, dev)

    with torch.no_grad():
        initial_ex = domain_losses(rcfg, st.params, st.A, st.B, task, eval_feats, 0, scale).mean(-1)   # (S,)

    tensors = dict(st.params)
    lrs = {k: rows.lr.to(dev) for k in st.params}
    if train_adapters:
        tensors.update(A=st.A, B=st.B)
        lrs.update(A=rows.adapter_lr.to(dev), B=rows.adapter_lr.to(dev))
    opt = _Adam(tensors, lrs, S, betas=(0.9, (rows.control_beta2 if arm == "beta2" else rows.beta2).to(dev)))
    ecfg = cfg.evolution
    life_every = cfg.life_interval            # lifecycle events (evo arm, with cfg.lifecycle)
    run = Solver(task=task, rcfg=rcfg, cfg=cfg, evolution=ecfg, state=st, tensors=tensors, scale=scale)
    gens = [generator(Purpose.EVO_SEARCH, s) for s in task.seeds]
    search = evo.init_search(ecfg, S, rcfg.n_params, gens, sigma0=rows.step0.to(dev)) if arm == "evo" else None
    gain = torch.zeros(S, dtype=DTYPE, device=dev)                      # search: summed objective gains
    accepted = torch.zeros(S, dtype=torch.long, device=dev)             # generations gaining >= accept_tol
    table = None            # oracle arm: (S, M, K) best gates per domain once the first event has run
    alive = torch.ones(S, dtype=torch.bool, device=dev)
    div_step = torch.full((S,), -1, dtype=torch.long, device=dev)
    curve = torch.full((S, steps), float("nan"), dtype=DTYPE, device=dev)
    half_ex = initial_ex.clone()
    evals, n_events, events = 0, 0, []
    pop = lc.Population.founders((S,), spec.slots, device=dev)

    bgens = [generator(Purpose.SANDBOX_BATCH, s) for s in task.seeds] if cfg.batch else []
    for t in range(steps):
        feats = _features(rows, t + 1, draws, dev) if (cfg.fresh_noise and draws > 1) else fixed_feats
        X = None
        if cfg.batch:   # this step's inputs, one stream per seed (drawn on the CPU): (S, M, d, n)
            X = torch.stack([torch.randn(spec.domains, spec.dim, cfg.batch, generator=g, dtype=DTYPE)
                             for g in bgens]).to(dev)
        leaves = {k: v.detach().requires_grad_(True) for k, v in tensors.items()}
        params = {k: leaves[k] for k in st.params}
        A = leaves.get("A", tensors.get("A", st.A))
        B = leaves.get("B", tensors.get("B", st.B))
        if table is None and X is not None:
            loss = batch_domain_losses(rcfg, params, A, B, task, feats, t, scale, X).mean(-1)   # (S,) noisy
        elif table is None:
            loss = domain_losses(rcfg, params, A, B, task, feats, t, scale).mean(-1)   # (S,) excess
        else:
            loss = _table_losses(table, A, B, task, scale).mean(-1)                      # (S,) excess
        evals += 1
        bad = ~torch.isfinite(loss) & alive
        div_step[bad] = t
        alive &= ~bad
        curve[:, t] = loss.detach() + loss_floor
        grads = torch.autograd.grad(loss.sum(), list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(leaves[k]) if g is None else g.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
                 for k, g in zip(leaves, grads)}
        opt.step(tensors, grads, alive)
        if t + 1 == steps // 2:             # the excess at half the budget, on the evaluation draws
            half_ex = _eval_excess(run, eval_feats, t + 1, table)
        if plain or t + 1 > cfg.steps:
            continue
        if (t + 1) % ecfg.interval == 0:    # the search schedule: a generation, a restart, a replacement
            n_events += 1
            if arm == "restart":
                opt.reset(list(st.params), alive.clone())
            elif arm == "oracle":
                table = _oracle_table(run, table)
            else:
                took, g = _generation(run, feats, t + 1, search, gens, alive, X)
                gain += g
                accepted += took.long()
                if cfg.reset_on_accept:
                    opt.reset(list(st.params), took)
                evals += ecfg.population
        # the lifecycle's own schedule (by default the search's: after that step's generation);
        # an event at the very end would leave no time to recover
        if arm == "evo" and cfg.lifecycle and (t + 1) % life_every == 0 and t + 1 < steps:
            pop, evs = _lifecycle(run, pop, feats, t + 1, opt)
            events += evs
            evals += spec.slots + 1

    with torch.no_grad():
        params = run.params
        A, B = run.bank
        if arm == "oracle":   # the ceiling for the final adapters, whatever the schedule
            table = _oracle_table(run, table)
            dom = _table_losses(table, A, B, task, scale)                                    # (S, M) excess
        elif arm == "acar":
            dom, modes = _acar_losses(params, A, B, task, eval_feats, scale, cfg.acar_tol)
        else:
            dom = domain_losses(rcfg, params, A, B, task, eval_feats, steps, scale)            # (S, M) excess
        best = _table_losses(_oracle_table(run, None), A, B, task, scale) \
            if (diagnostics or (with_ceiling and arm == "grad")) else None                     # (S, M)
    cpu = lambda x: None if x is None else x.detach().cpu()                # noqa: E731  (a no-op on the CPU)

    def result(name: str, dom_ex: Tensor, **kw) -> ArmResult:
        final, div, dstep, _ = _finish(dom_ex, alive, div_step, steps)
        ex = cpu(final)
        return ArmResult(arm=name, final_loss=ex + cpu(loss_floor), domain_loss=cpu(dom_ex + _per_row(loss_floor, dom_ex)),
                         initial_loss=cpu(initial_ex + loss_floor), loss_evals=evals, grad_steps=steps,
                         diverged=cpu(div), diverged_step=cpu(dstep),
                         curve=cpu(curve) if name == arm else cpu(curve.clone()), excess=ex, initial_excess=cpu(initial_ex),
                         oracle_excess=None if best is None else cpu(best.mean(-1)),
                         half_excess=cpu(half_ex), **kw)

    res = result(arm, dom, generations=n_events, accepted=cpu(accepted) if search else None,
                 step_size=cpu(search.sigma.clone()) if search else None, events=events,
                 modes=cpu(modes) if arm == "acar" else None, search_gain=cpu(gain) if search else None)
    if with_ceiling and arm == "grad":
        res.ceiling = result("oracle", best)
    if with_acar and arm == "grad":
        with torch.no_grad():
            adom, amodes = _acar_losses(params, A, B, task, eval_feats, scale, cfg.acar_tol)
        res.acar = result("acar", adom, modes=cpu(amodes))
    return res


@torch.no_grad()
def _eval_excess(run: Solver, feats: Tensor, step: int, table: Tensor | None) -> Tensor:
    """The balanced excess ``(S,)`` of the current state on the evaluation draws under the routing
    that trains it: the router's gates, or the best-gate table of an oracle arm that replaces the
    routing (a convergence probe; the ceiling and acar arms follow grad's trajectory, so their
    probe is grad's, as it is when they are read off the grad run)."""
    A, B = run.bank
    if table is not None:
        return _table_losses(table, A, B, run.task, run.scale).mean(-1)
    return domain_losses(run.rcfg, run.params, A, B, run.task, feats, step, run.scale).mean(-1)


def _finish(dom: Tensor, alive: Tensor, div_step: Tensor, steps: int):
    """Final balanced loss ``(S,)`` (NaN for diverged rows), diverged flags, their steps, alive."""
    final = dom.mean(-1)
    bad = ~torch.isfinite(final) & alive
    div_step = div_step.clone()
    div_step[bad] = steps
    alive = alive & ~bad
    final = torch.where(alive, final, torch.full_like(final, float("nan")))
    return final, ~alive, div_step, alive
