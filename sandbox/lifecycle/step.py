"""The composed lifecycle event (`lifecycle_step`): death ranks over the batch, each read off a
`DeathRank` record, the newborn's fine-tune, and the rows of ``lifecycle.csv`` (`event_rows`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sandbox.adapters import AdapterBank, product_inner, rand, slot_gram
from sandbox.errors import require
from sandbox.lifecycle.config import FinetuneLoss, LifecycleConfig, _plugin_mutate
from sandbox.lifecycle.draws import Generators, _draw, _only, _rows
from sandbox.lifecycle.kinds import dying, inherit, inheritance_operator, reallocate, receiver_of
from sandbox.lifecycle.operators import _put, _take, fresh_factors, mutate_svd, slerp_factors
from sandbox.lifecycle.population import Population, select_parent


def _unpack(banks) -> tuple[dict[str, tuple[Tensor, Tensor, float]], str]:
    """Banks as ``{name: (A, B, scale)}`` and the input kind (``bank``, ``tuple`` or ``dict``)."""
    def one(b):
        if isinstance(b, AdapterBank):
            return b.A.detach(), b.B.detach(), b.scale
        A, B = b
        return A, B, 1.0
    if isinstance(banks, dict):
        return {k: one(v) for k, v in banks.items()}, "dict"
    return {"": one(banks)}, "bank" if isinstance(banks, AdapterBank) else "tuple"


def _work(x: Tensor) -> Tensor:
    """Half-precision factors are processed in fp32 (QR/SVD need it) and cast back at the end."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _repack(banks, kind: str, new: dict[str, tuple[Tensor, Tensor]]):
    def one(old, AB):
        if isinstance(old, AdapterBank):
            old.set_factors(*AB)  # in place, so optimisers keep their Parameters
            return old
        return AB
    if kind == "dict":
        return {k: one(banks[k], new[k]) for k in banks}
    return one(banks, new[""])


def _replace_slot(A: Tensor, B: Tensor, d: Tensor, nb: Tensor, parent: Tensor, v: Tensor, cfg: LifecycleConfig,
                  generator: Generators, do_blend: bool, do_child: bool, parent2: Tensor | None = None,
                  t: Tensor | None = None, inheritance=None):
    """One layer's part of one death rank: the dying slot ``d`` passes on to ``nb`` (an inheritance
    whose receiver is the neighbour, e.g. blend), then ``d`` is filled with the (mutated) parent
    clone, or the SLERP of ``parent`` and ``parent2`` at ``t`` (crossover), or a fresh init, which
    then inherits from the dying slot (receiver newborn, e.g. child). ``inheritance``: the
    operator (`sandbox.lifecycle.kinds`), needed when ``do_blend`` or ``do_child``.
    A ``(n, K, r, d_in)``, B ``(n, K, d_out, r)``; rows with ``v`` False untouched.
    Returns new A, B and ``||child - parent||_F^2``, ``||parent||_F^2`` per row (unscaled)."""
    r, d_in, d_out = A.shape[-2], A.shape[-1], B.shape[-2]
    A_d, B_d = _take(A, d), _take(B, d)
    if do_blend:
        A_nb, B_nb = inherit(cfg, inheritance, _take(A, nb), _take(B, nb), A_d, B_d, generator)
        A, B = _put(A, nb, A_nb, v), _put(B, nb, B_nb, v)
    A_p, B_p = _take(A, parent), _take(B, parent)
    A_b, B_b = A_p, B_p
    if parent2 is not None:
        A_b, B_b = slerp_factors(A_p, B_p, _take(A, parent2), _take(B, parent2), t, r)
    if cfg.svd_mutation:
        A_c, B_c = mutate_svd(A_b, B_b, cfg.mutation_sigma, cfg.rotation, generator, r)
    elif cfg.plugin_mutation:
        A_c, B_c = _plugin_mutate(cfg, A_b, B_b, generator)
    elif cfg.mutation or parent2 is not None:  # fine-tune only, or an unmutated crossover child
        A_c, B_c = A_b.clone(), B_b.clone()
    else:
        A_c, B_c = fresh_factors(A.shape[0], r, d_in, d_out, generator, A)
    if do_child:
        A_c, B_c = inherit(cfg, inheritance, A_c, B_c, A_d, B_d, generator)
    par2 = product_inner(A_p, B_p, A_p, B_p).to(torch.float64)
    diff2 = (product_inner(A_c, B_c, A_c, B_c).to(torch.float64) + par2
             - 2 * product_inner(A_c, B_c, A_p, B_p).to(torch.float64)).clamp_min(0)
    return _put(A, d, A_c, v), _put(B, d, B_c, v), diff2, par2


@dataclass(frozen=True)
class DeathRank:
    """What one death rank of `lifecycle_step` did, per batch row: the record its events are read
    from (`events`). Tensors are ``(n,)`` over the flattened batch; rows where ``valid`` is False had
    no death at this rank.

    Attributes:
        step: the step of the lifecycle event.
        valid: rows with a death at this rank.
        dying, neighbour, parent: slots of the dying adapter, its nearest surviving neighbour and
            the newborn's parent.
        target: the domain the freed router column was pushed toward (-1: none).
        fitness: ``(n, K)`` fitness of every slot.
        old_id, new_id, parent_id, neighbour_id: slot ids (the dying one, the newborn's, ...).
        mutation_size: ``||child - parent|| / ||parent||`` of the newborn (NaN when not mutated).
        alpha: the inheritance alpha in effect (0 without inheritance).
        blended: the dying adapter passed on to its neighbour (``blend``, or a plugin whose receiver is the
            neighbour).
        child: the newborn inherited from the dying adapter (``child``, or a plugin whose receiver is the
            newborn).
        uses_parent: the newborn descends from ``parent`` (mutation, crossover or reallocation).
        extra: more columns of the birth events, name -> ``(n,)`` (only with the EvoMerge options).
    """

    step: int
    valid: Tensor
    dying: Tensor
    neighbour: Tensor
    parent: Tensor
    target: Tensor
    fitness: Tensor
    old_id: Tensor
    new_id: Tensor
    parent_id: Tensor
    neighbour_id: Tensor
    mutation_size: Tensor
    alpha: float
    blended: bool
    child: bool
    uses_parent: bool
    extra: dict[str, Tensor] = field(default_factory=dict)

    def events(self) -> list[dict]:
        """Event dicts (rows of ``lifecycle.csv``) for the rows with a death: death, inherit (if
        any), birth."""
        events = []
        d, nb, parent, f = self.dying, self.neighbour, self.parent, self.fitness
        blend_, child, uses = self.blended, self.child, self.uses_parent
        for row in torch.nonzero(self.valid).flatten().tolist():
            base = {"step": self.step, "batch": row, "inherit_alpha": self.alpha}
            blank = {"mutation_size": math.nan, "domain": -1}
            events.append({**base, "event": "death", "slot": int(d[row]), "slot_id": int(self.old_id[row]),
                           "parent_id": -1, "neighbour_id": int(self.neighbour_id[row]) if blend_ else -1,
                           "fitness": float(f[row, d[row]]), **blank,
                           "parent_slot": -1, "neighbour_slot": int(nb[row]) if blend_ else -1})
            if blend_:  # the receiver is the neighbour; its "parent" here is the dying donor
                events.append({**base, "event": "inherit", "slot": int(nb[row]), "slot_id": int(self.neighbour_id[row]),
                               "parent_id": int(self.old_id[row]), "neighbour_id": int(self.neighbour_id[row]),
                               "fitness": float(f[row, nb[row]]), **blank,
                               "parent_slot": int(d[row]), "neighbour_slot": int(nb[row])})
            if child:  # the receiver is the newborn
                events.append({**base, "event": "inherit", "slot": int(d[row]), "slot_id": int(self.new_id[row]),
                               "parent_id": int(self.old_id[row]), "neighbour_id": -1,
                               "fitness": float(f[row, d[row]]), **blank,
                               "parent_slot": int(d[row]), "neighbour_slot": -1})
            events.append({**base, "event": "birth", "slot": int(d[row]), "slot_id": int(self.new_id[row]),
                           "parent_id": int(self.parent_id[row]) if uses else -1, "neighbour_id": -1,
                           "fitness": float(f[row, parent[row]]) if uses else math.nan,
                           "mutation_size": float(self.mutation_size[row]), "domain": int(self.target[row]),
                           "parent_slot": int(parent[row]) if uses else -1, "neighbour_slot": -1,
                           **{k: x[row].item() for k, x in self.extra.items()}})
        return events


def _finetune(new: dict[str, tuple[Tensor, Tensor]], layers: dict, kind: str, rp: dict[str, Tensor] | None,
              router_params: dict[str, Tensor] | None, slot: Tensor, valid: Tensor, target: Tensor,
              cfg: LifecycleConfig, loss_fn: FinetuneLoss, bshape: tuple[int, ...], k0: int, generator: Generators):
    """``cfg.finetune_steps`` normalised gradient steps on the newborn ``slot (n,)`` alone (rows where
    ``valid``): the gradient of ``loss_fn`` is masked to that slot's factors in every layer (every
    other slot, and rows without a birth, are untouched), and each row moves ``finetune_lr`` along
    its own gradient direction. Returns the new factors and the loss per row before and after."""
    n, K = slot.shape[0], next(iter(new.values()))[0].shape[1]
    sel = (torch.nn.functional.one_hot(slot, K).bool() & valid.unsqueeze(-1))  # (n, K)
    rpar = router_params if rp is None else {k: x.reshape(router_params[k].shape) for k, x in rp.items()}
    tgt = target.reshape(bshape)

    def loss_of(fac, j):
        shaped = {name: (A.reshape(*bshape, *A.shape[1:]), B.reshape(*bshape, *B.shape[1:])) for name, (A, B) in fac.items()}
        arg = shaped if kind == "dict" else shaped[""]
        return loss_fn(arg, rpar, tgt, j, generator).reshape(n)

    before = None
    for j in range(cfg.finetune_steps):
        with torch.enable_grad():
            leaves = {name: (A.detach().requires_grad_(True), B.detach().requires_grad_(True)) for name, (A, B) in new.items()}
            loss = loss_of(leaves, k0 + j)
            flat = [x for AB in leaves.values() for x in AB]
            grads = torch.autograd.grad(loss.sum(), flat, allow_unused=True)
        if before is None:
            before = loss.detach().to(torch.float64)
        grads = [torch.zeros_like(x) if g is None else
                 torch.where(sel.reshape(n, K, 1, 1), torch.nan_to_num(g.detach()), torch.zeros_like(g))
                 for x, g in zip(flat, grads)]
        sq = sum(g.to(torch.float64).pow(2).sum((1, 2, 3)) for g in grads)  # (n,)
        step = (cfg.finetune_lr / sq.sqrt().clamp_min(1e-30)).where(sq > 0, torch.zeros_like(sq))  # (n,)
        it = iter(grads)
        new = {name: (A - step.to(A.dtype).reshape(n, 1, 1, 1) * next(it), B - step.to(B.dtype).reshape(n, 1, 1, 1) * next(it))
               for name, (A, B) in new.items()}
    after = loss_of(new, k0 + cfg.finetune_steps).detach().to(torch.float64)
    return new, before, after


@torch.no_grad()
def lifecycle_step(pop: Population, banks, router_params: dict[str, Tensor] | None, fitness: Tensor,
                   cfg: LifecycleConfig, generator: Generators, step: int,
                   domain_losses: Tensor | None = None, domain_features: Tensor | None = None,
                   finetune: FinetuneLoss | None = None):
    """One lifecycle event: death, inheritance, birth with SVD mutation, reallocation. Death,
    inheritance and reallocation are the operators ``cfg`` names (built-in or plugin,
    `sandbox.lifecycle.kinds`), the mutation likewise (`MutationOperator`).

    Args:
        pop: the population, batch shape ``*b``.
        banks: an `AdapterBank`, a tuple ``(A (*b, K, r, d_in), B (*b, K, d_out, r))`` or a dict
            name -> either (one bank per adapted layer; the same slot dies in every layer).
            AdapterBanks are updated in place (and returned); tuples are returned as new tensors.
        router_params: router dict (``W (*b, *e, F, K)``, ``bias``, ``phi``) or None.
        fitness: ``(*b, K)`` slot fitness (see the function `fitness`).
        generator: one ``torch.Generator`` for the whole batch, or a sequence of ``prod(*b)``
            generators, one per batch element in row-major order of ``*b``. With a sequence, element
            i's result and the state its generator is left in depend only on element i's inputs and
            generator (rows without a death at some rank draw from a throwaway generator), so
            results are independent of the batch composition.
        step: the current step (ages are advanced to it).
        domain_losses: ``(*b, M)`` current per-domain losses (for reallocation), or None.
        domain_features: ``(*b, M, F)`` mean routing feature per domain, or None.
        finetune: the loss callback of ``mutation_kind`` ``finetune`` / ``svd+finetune`` (see
            `FinetuneLoss`); the newborn is tuned on the worst domain of ``domain_losses`` (all
            domains without them). Required when ``cfg.finetunes``.

    EvoMerge options (`LifecycleConfig`): ``selection = roulette`` picks parents by
    `roulette_parent`; ``crossover = slerp`` draws a second parent among the other survivors
    (same selection) and the newborn starts from `slerp_factors` of the two at ``crossover_t``
    (drawn ``U(0, 1)`` when None); their birth events gain ``parent2_id``, ``parent2_slot``,
    ``crossover_t``, and fine-tuned births ``finetune_loss_before`` / ``finetune_loss_after``.
    With the defaults (tournament, no crossover, SVD mutation) the draws and results are exactly
    those of the lifecycle before these options existed.

    Returns:
        ``(pop, banks, router_params, events)``; events are dicts with keys ``step, batch`` (flat
        batch index), ``event`` (death/inherit/birth), ``slot, slot_id, parent_id, neighbour_id,
        fitness, mutation_size, alpha, domain, parent_slot, neighbour_slot`` for ``lifecycle.csv``
        (``*_slot``: the slot index that held ``parent_id`` / ``neighbour_id`` just before the event).
    """
    pop = pop.at(step)
    bshape, K = pop.batch_shape, pop.n_slots
    n = math.prod(bshape)
    if not isinstance(generator, torch.Generator):
        generator = _rows(generator, n)
    layers, kind = _unpack(banks)
    fac = {k: (_work(A).reshape(n, K, *A.shape[-2:]), _work(B).reshape(n, K, *B.shape[-2:]), sc)
           for k, (A, B, sc) in layers.items()}  # (n, K, r, d_in), (n, K, d_out, r)
    f = fitness.reshape(n, K).to(torch.float64)
    events: list[dict] = []
    require(not cfg.finetunes or finetune is not None, "mutation", cfg.mutation_kind,
            "svd here (this system supplies no fine-tune gradient callback)")
    if not cfg.death or K < 2:
        return pop, banks, router_params, events
    order, valid = dying(cfg, f, pop.ages.reshape(n, K), generator)   # the death operator's choice, in order
    if not bool(valid.any()):
        return pop, banks, router_params, events

    ids, ages, parents = (t.reshape(n, K).clone() for t in (pop.ids, pop.ages, pop.parents))
    next_id = pop.next_id.reshape(n).clone()
    dead = torch.zeros((n, K), dtype=torch.bool, device=f.device).scatter(-1, order, valid)
    alive = ~dead
    # cosine of whole adapters (all layers): sum_l s_l^2 <B_k A_k, B_j A_j> over norms, (n, K, K)
    gram = sum(sc * sc * slot_gram(A, B).to(torch.float64) for A, B, sc in fac.values())
    nrm = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    cos = gram / (nrm.unsqueeze(-1) * nrm.unsqueeze(-2)).clamp_min(1e-30)
    new = {k: (A, B) for k, (A, B, _) in fac.items()}
    rp = None
    if router_params is not None:
        extra = router_params["bias"].shape[len(bshape):-1]
        e = math.prod(extra)
        rp = {k: v.reshape(n, e, *v.shape[len(bshape) + len(extra):]) for k, v in router_params.items()}  # (n, e, [F,] K)
    a = float(cfg.inherit_alpha)
    inheritance = inheritance_operator(cfg.inherit_mode)   # blend, child or a plugin (sandbox.lifecycle.kinds)
    do_blend = cfg.inheritance and a > 0 and receiver_of(inheritance) == "neighbour"
    do_child = cfg.inheritance and a > 0 and receiver_of(inheritance) == "newborn"

    for i in range(order.shape[-1]):
        d, v = order[:, i], valid[:, i]  # (n,) dying slot and whether row i has this death
        if not bool(v.any()):
            continue
        gen = _only(generator, v)  # with per-row generators, rows without this death draw from throwaways
        parent = select_parent(f, alive, cfg, gen)  # (n,)
        parent2 = t = None
        extra: dict[str, Tensor] = {}
        if cfg.crossover == "slerp":  # a second parent among the other survivors (the same if none)
            others = alive & ~torch.nn.functional.one_hot(parent, K).bool()
            parent2 = select_parent(f, torch.where(others.any(-1, keepdim=True), others, alive), cfg, gen)
            t = (torch.full((n,), float(cfg.crossover_t), dtype=torch.float64, device=f.device)
                 if cfg.crossover_t is not None else _draw(rand, (n,), gen, torch.float64, f.device))
            extra = {"parent2_id": _take(ids, parent2), "parent2_slot": parent2, "crossover_t": t}
        nb = torch.where(alive, _take(cos, d), torch.full_like(f, -math.inf)).argmax(-1)  # (n,)
        sq_diff = torch.zeros(n, dtype=torch.float64, device=f.device)  # ||child - parent||^2 over layers
        sq_par = torch.zeros(n, dtype=torch.float64, device=f.device)  # ||parent||^2 over layers
        for name, (A, B) in new.items():
            A, B, diff2, par2 = _replace_slot(A, B, d, nb, parent, v, cfg, gen, do_blend, do_child, parent2, t,
                                                    inheritance)
            new[name] = (A, B)
            sq_diff += fac[name][2] ** 2 * diff2
            sq_par += fac[name][2] ** 2 * par2
        target = torch.full((n,), -1, dtype=torch.long, device=f.device)
        if rp is not None and cfg.reallocation:
            dl = domain_losses.reshape(n, -1) if domain_losses is not None else None
            df = domain_features.reshape(n, *domain_features.shape[-2:]) if domain_features is not None else None
            rp, target = reallocate(rp, d, parent, v, cfg, gen, dl, df)
        if cfg.finetunes:
            goal = (domain_losses.reshape(n, -1).argmax(-1) if domain_losses is not None
                    else torch.full((n,), -1, dtype=torch.long, device=f.device))
            new, before, after = _finetune(new, layers, kind, rp, router_params, d, v, goal.to(d.device), cfg, finetune,
                                           bshape, i * (cfg.finetune_steps + 1), gen)
            extra = {**extra, "finetune_loss_before": before, "finetune_loss_after": after}
        mutated = cfg.mutation or parent2 is not None
        msize = (sq_diff / sq_par).sqrt() if mutated else torch.full((n,), math.nan, dtype=torch.float64, device=f.device)
        uses_parent = mutated or (cfg.reallocation and rp is not None)
        old_id, par_id, nb_id = _take(ids, d), _take(ids, parent), _take(ids, nb)
        new_id = next_id.clone()
        ids = _put(ids, d, new_id, v)
        ages = _put(ages, d, torch.zeros_like(new_id), v)
        parents = _put(parents, d, par_id if uses_parent else torch.full_like(par_id, -1), v)
        next_id = next_id + v.long()
        events += DeathRank(step=step, valid=v, dying=d, neighbour=nb, parent=parent, target=target, fitness=f,
                            old_id=old_id, new_id=new_id, parent_id=par_id, neighbour_id=nb_id, mutation_size=msize,
                            alpha=a if cfg.inheritance else 0.0, blended=do_blend, child=do_child,
                            uses_parent=uses_parent, extra=extra).events()

    new_pop = Population(ids.reshape(*bshape, K), ages.reshape(*bshape, K), parents.reshape(*bshape, K),
                         next_id.reshape(bshape), step)
    out = {k: (A.reshape(layers[k][0].shape).to(layers[k][0].dtype), B.reshape(layers[k][1].shape).to(layers[k][1].dtype))
           for k, (A, B) in new.items()}
    if rp is not None:
        rp = {k: v.reshape(router_params[k].shape) for k, v in rp.items()}
    else:
        rp = router_params
    return new_pop, _repack(banks, kind, out), rp, events


def event_rows(events: list[dict], batch_labels: list[Any] | None = None, label: str = "seed") -> list[dict]:
    """Rows for ``lifecycle.csv``; ``batch_labels[batch]`` (e.g. seeds) becomes column ``label``."""
    rows = []
    for ev in events:
        row = dict(ev)
        b = row.pop("batch")
        row[label] = batch_labels[b] if batch_labels is not None else b
        rows.append(row)
    return rows
