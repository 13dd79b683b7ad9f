"""Folded passes, leave-one-out fitness, held-out evaluation and gate usage of a cell's run.

Leave-one-out losses (the input of fitness) are measured on a *selection batch*: ``fit_windows``
fresh training windows per domain drawn for that step (never the held-out evaluation windows,
so selection never sees the test data). ``L_m^{-k}`` is the mean token NLL on domain m with slot
k's gate zeroed (`sandbox.lifecycle.loo_gates`), ``L_m`` with every slot.

Gate variants (slot k zeroed; the routing search's population) are folded into the batch
(`folded_nll`), ``fold_rows(device)`` rows per forward pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sandbox import gatestats
from sandbox.adapters import AdapterBank
from sandbox.lifecycle import event_rows, fitness, lifecycle_step, loo_gates, reset_adam_state, reset_mask
from sandbox.results import RunDir
from sandbox.router import gate_rows, router_gates
from substrate import acar
from substrate.adapt import _FIT, _LIFE, RunState, gates_for, step_generator, train_batch
from substrate.config import CellConfig
from substrate.corpus import Corpus
from substrate.model import GPT, autocast, routing_features
from substrate.train import evaluate



#: Rows (windows x variants) per forward pass when gate variants are folded into the batch (the
#: leave-one-out pass, `loo_losses`; the search population, `substrate.routing.population_losses`),
#: by device type. CPU: 32, measured fastest or tied among 16 / 32 / 64 on tiny and small
#: (BENCHMARKS.md section 6; a CPU forward is compute-bound, and bigger folds fall out of cache).
#: CUDA: 64, not yet measured (more variants per forward should pay where one forward leaves the
#: device idle).
FOLD_ROWS = {"cpu": 32, "cuda": 64}


def fold_rows(device: str | torch.device) -> int:
    """`FOLD_ROWS` for `device` (CUDA's for any other accelerator)."""
    return FOLD_ROWS.get(torch.device(device).type, FOLD_ROWS["cuda"])


@torch.no_grad()
def folded_nll(model: GPT, x: Tensor, y: Tensor, gates: Tensor, device: str | torch.device) -> Tensor:
    """Mean token NLL ``(V, N)`` of windows ``x, y (N, T)`` under each of V gate variants
    ``gates (V, N, T, K)``: the variants folded into the batch, ``fold_rows(device) // N`` of them
    per forward pass."""
    V, N, T, K = gates.shape
    chunk = max(1, fold_rows(device) // N)                                      # variants per forward pass
    out = []
    for v0 in range(0, V, chunk):
        g = gates[v0:v0 + chunk]
        c = g.shape[0]
        with autocast(device):
            out.append(model.token_nll(x.repeat(c, 1), y.repeat(c, 1), g.reshape(c * N, T, K)).mean(-1).view(c, N))
    return torch.cat(out)


@torch.no_grad()
def loo_losses(cfg: CellConfig, st: RunState, corpus: Corpus, step: int) -> tuple[Tensor, Tensor, Tensor]:
    """Leave-one-out losses on the selection batch of `step`.

    Returns ``loo (K, M)`` (mean token NLL on domain m with slot k's gate zeroed), ``full (M,)``
    and the mean routing feature per domain ``(M, F)`` (for reallocation).
    """
    M, w = corpus.domains, cfg.fit_windows
    dom = torch.arange(M).repeat_interleave(w)                                  # (M*w,)
    x, y, _ = train_batch(cfg, st, corpus, M * w, step_generator(cfg.seed, step, _FIT), domains=dom)
    x, y = x.to(cfg.device), y.to(cfg.device)
    feats = routing_features(st.model, x, cfg.features, cfg.pooling)            # (N, T, F)
    gates = gates_for(cfg, st, x, step) if cfg.router_kind == "acar" else st.router(feats, step)   # (N, T, K)
    onehot = torch.nn.functional.one_hot(dom, M).double().to(cfg.device)        # (N, M)
    per_domain = lambda nll: (nll.double() @ onehot) / w                        # (..., N) -> (..., M)
    with autocast(cfg.device):
        full = per_domain(st.model.token_nll(x, y, gates).mean(-1))             # (M,)
    lg = loo_gates(gates).transpose(0, 1)                # (N, K, T, K) -> (K, N, T, K): slot k zeroed in row k
    loo = per_domain(folded_nll(st.model, x, y, lg, cfg.device))               # (K, M)
    hbar = (onehot.T.float() @ feats.mean(1).float()) / w                       # (M, F)
    return loo.cpu(), full.cpu(), hbar.cpu()


def fitness_event(cfg: CellConfig, st: RunState, corpus: Corpus) -> None:
    """Measure fitness (every cell) and, with L, run one lifecycle step; log both."""
    lcfg = cfg.lifecycle_config()
    loo, full, hbar = loo_losses(cfg, st, corpus, st.step)
    fit = fitness(loo, full, lcfg.scope, lcfg.per_domain_agg)                   # (K,) on CPU
    ids = st.pop.ids.tolist()
    for k in range(cfg.slots):
        st.fitness.append({"step": st.step, "slot": k, "slot_id": ids[k], "scope": lcfg.scope,
                           "fitness": float(fit[k]), "fitness_global": float((loo[k] - full).mean())})
    if not cfg.factors.lifecycle:
        return
    # The lifecycle runs on CPU copies (its generator is a CPU generator; the tensors are small),
    # then the new factors and router columns are copied back in place, so Adam keeps its Parameters.
    banks = st.model.banks()
    cpu_banks = {n: AdapterBank.from_factors(b.A.detach().cpu(), b.B.detach().cpu(), b.lora_alpha) for n, b in banks.items()}
    rp = {k: v.detach().cpu() for k, v in st.router.params().items()}
    st.pop, _, rp, events = lifecycle_step(st.pop, cpu_banks, rp, fit.to(torch.float64), lcfg,
                                           step_generator(cfg.seed, st.step, _LIFE), st.step,
                                           domain_losses=full, domain_features=hbar,
                                           finetune=finetune_loss(cfg, st, corpus) if lcfg.finetunes else None)
    for n, b in banks.items():
        b.set_factors(cpu_banks[n].A, cpu_banks[n].B)
    st.router.load_params(rp)
    mask = reset_mask(events, (), cfg.slots).to(cfg.device)                    # (K,)
    for b in banks.values():
        reset_adam_state(st.opt, b.A, mask, -3)
        reset_adam_state(st.opt, b.B, mask, -3)
    for p in st.router.params().values():
        reset_adam_state(st.opt, p, mask, -1)
    st.events.extend(event_rows(events, [cfg.seed]))


def finetune_loss(cfg: CellConfig, st: RunState, corpus: Corpus):
    """The loss callback of the fine-tune mutation (`sandbox.lifecycle.FinetuneLoss`): mean token
    NLL of ``cfg.batch`` fresh training windows of the target domain (all domains for -1), drawn
    from the lifecycle's generator, with the given factors in every bank (a functional call: the
    live model is untouched) and the router's reallocated parameters; gates carry no gradient."""
    names = list(st.model.banks())
    rcfg = st.router.cfg

    def loss(fac, rp, target, k, gen):
        m = int(target.reshape(-1)[0])
        dom = torch.full((cfg.batch,), m, dtype=torch.long) if m >= 0 else None
        x, y, _ = train_batch(cfg, st, corpus, cfg.batch, gen, domains=dom)
        x, y = x.to(cfg.device), y.to(cfg.device)
        with torch.no_grad():
            feats = routing_features(st.model, x, cfg.features, cfg.pooling)
            gates = router_gates(rcfg, {n: v.to(cfg.device) for n, v in rp.items()}, feats, st.step)
        over = {}
        for n in names:
            A, B = fac[n]
            over[f"{n}.bank.A"], over[f"{n}.bank.B"] = A.to(cfg.device), B.to(cfg.device)
        with autocast(cfg.device):
            nll = torch.func.functional_call(_TokenNLL(st.model), {f"m.{k}": v for k, v in over.items()}, (x, y, gates))
        return nll.mean().float().cpu().reshape(1)

    return loss


class _TokenNLL(torch.nn.Module):
    """``token_nll`` as a module's forward (so `torch.func.functional_call` can swap parameters)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.m = model

    def forward(self, x: Tensor, y: Tensor, gates: Tensor) -> Tensor:
        return self.m.token_nll(x, y, gates)


def evaluate_state(cfg: CellConfig, st: RunState, corpus: Corpus):
    """Held-out per-domain evaluation with the run's router at the current step."""
    return evaluate(st.model, corpus, "heldout", lambda x, m: gates_for(cfg, st, x, st.step),
                    max_windows=cfg.eval_windows, device=cfg.device)


@torch.no_grad()
def held_out_gates(cfg: CellConfig, st: RunState, corpus: Corpus, batch: int = 64) -> tuple[Tensor, Tensor]:
    """The run's gates at the current step on the held-out evaluation windows (``eval_windows`` per
    domain, default all): ``gates (n, K)`` (one row per token, float32 on the CPU) and the token's
    domain ``(n,)``."""
    gs, labels = [], []
    for m, w in enumerate(corpus.heldout):
        w = w[:cfg.eval_windows] if cfg.eval_windows else w
        for i in range(0, w.shape[0], batch):
            x = w[i:i + batch, :-1].long().to(cfg.device)                       # (b, T)
            g = gates_for(cfg, st, x, st.step).float().cpu()                    # (b, T, K)
            gs.append(g.reshape(-1, g.shape[-1]))
            labels.append(torch.full((g.shape[0] * g.shape[1],), m))
    return torch.cat(gs), torch.cat(labels)


def gate_record(cfg: CellConfig, st: RunState, corpus: Corpus, phase: str) -> None:
    """Gates at the current step on the held-out windows: the ``gates.csv`` rows of `phase` (mean gate
    per domain and slot) and the diagnostics `sandbox.gatestats.gate_stats` in ``st.gate_stats[phase]``
    (floors: the sigmoid router's; own slots: the slot the starting bank aligned with each domain's
    specialist)."""
    gates, dom = held_out_gates(cfg, st, corpus)
    st.gates.extend(gate_rows(gates, dom, phase, list(corpus.names), seed=cfg.seed, cell=cfg.cell))
    sigmoid = cfg.router_kind != "acar" and st.router.cfg.kind == "sigmoid"
    floors = st.router.floors().detach().float().cpu() if sigmoid else None
    stats = gatestats.gate_stats(gates, dom, corpus.domains, floors=floors, own_slots=st.assignment.tolist())
    names = list(corpus.names)
    st.gate_stats[phase] = {k: (dict(zip(names, v)) if isinstance(v, list) else v) for k, v in stats.items()}



@torch.no_grad()
def acar_usage(cfg: CellConfig, st: RunState, corpus: Corpus, run: RunDir, batch: int = 64) -> dict:
    """--router acar: mode usage on the held-out evaluation windows (the final evaluation's), one
    acar.csv row per domain plus ``all``; returns the ``all`` row (`substrate.acar.usage_row`)."""
    import pandas as pd

    rows, total = [], {m: 0 for m in acar.MODES}
    for m, windows in enumerate(corpus.heldout):
        w = windows[:cfg.eval_windows] if cfg.eval_windows else windows
        counts = {k: 0 for k in acar.MODES}
        for i in range(0, w.shape[0], batch):
            x = w[i:i + batch, :-1].long().to(cfg.device)
            with autocast(cfg.device):
                c = acar.acar_gates(st.model, x, st.acar_score, cfg.slots).counts()
            for k in acar.MODES:
                counts[k] += c[k]
                total[k] += c[k]
        rows.append(acar.usage_row(counts, step=st.step, domain=corpus.names[m], seed=cfg.seed, cell=cfg.cell))
    rows.append(acar.usage_row(total, step=st.step, domain="all", seed=cfg.seed, cell=cfg.cell))
    run.write_csv("acar.csv", pd.DataFrame(rows))
    return rows[-1]
