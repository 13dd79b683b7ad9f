"""The regime map's arms on the transformer: gradient, routing search, restart control, oracle ceiling.

The same comparison as the analytic sandbox (`sandbox.analytic`), on a frozen pretrained base with
an adapter bank per adapted projection and one router. Every arm of one seed starts from the same
state (`substrate.adapt.build_state`: the bank interpolated between random and the per-domain
specialists by the alignment, a fresh router) and sees the same training batches (the batch of
step t is a pure function of (seed, t)): common random numbers, so deltas are paired by seed.

* ``grad``: Adam on the router and, at ``lr * plasticity``, on the adapters (warm-up + cosine): the
  cells' own step and optimiser (`substrate.adapt.train_step`, `substrate.adapt.optimizer`) on the
  fixed training windows, the router at ``lr`` (``router_lr`` is a cell setting).
* ``evo``: the same steps plus, every `interval` steps, one generation of the routing search of
  `sandbox.evolution` (the same implementation as the sandbox: ``es``, ``cma`` or ``fixed``) on
  the router's parameters. Its objective is the balanced (equal weight per domain) mean token NLL
  on *fresh training windows* drawn for that generation, never on held-out data. The population
  is evaluated in one batched forward pass: every member's gates are computed from its own
  parameters and the members are folded into the batch (`population_losses`, tested equal to a
  loop over members). The router's Adam state is kept on acceptance (``reset_on_accept`` resets it).
* ``restart`` (control): the grad steps with the router's Adam state reset at every event.
* ``acar`` (only with ``acar=True``, ``--acar``): sigma routing (ACAR, `substrate.acar`)
  on the grad arm's final router and adapters: per token, the top-3 slots of the router's logits
  (``h W + b`` on its causal prefix features), three one-slot probes' next-token argmax, causal
  prefix sigma, 1 / 2 / 3 of the candidates gated equally; held-out evaluation only (no gradient,
  nothing trained), with the held-out tokens gated with 1, 2 and 3 slots counted.
* ``oracle`` (ceiling, not a method): domain-oracle routing on the grad arm's final adapters,
  every token of domain m gated to m's slot only (on the synthetic corpus the slot holding m's
  specialist at the start; gate 1 there, 0 elsewhere).

Reported metric: balanced held-out log-PPL per arm (nats); ``delta = log PPL_grad - log PPL_evo``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from sandbox import evolution as evo
from sandbox.arms import arms_of
from sandbox.errors import check, require
from sandbox.identity import later, rules
from sandbox.router import params_to_vector, router_gates, router_logits, vector_to_params
from sandbox.streams import Purpose, generator
from substrate import acar
from substrate.adapt import RunState, Substrate, adaptation, build_state, train_step
from substrate.config import CellConfig
from substrate.fitness import evaluate_state, folded_nll
from substrate.corpus import sample_batch
from substrate.model import autocast, routing_features
from substrate.train import evaluate

#: The map's arms on the transformer (`sandbox.arms`: no beta2 control), and with acar (added by
#: ``RoutingArms.acar``).
ARMS = arms_of("substrate", acar=False)
ALL_ARMS = arms_of("substrate", acar=True)


@dataclass(frozen=True)
class RoutingArms:
    """One seed's comparison on the transformer. Field names are CLI flags."""

    cell: CellConfig = field(default_factory=lambda: CellConfig.of(cell="B3", preset="tiny", steps=100))
    """The substrate, router kind (cell B3: softmax; R: sigmoid), steps, batch, lr, alignment, seed."""
    evolution: evo.EvolutionConfig = field(default_factory=evo.EvolutionConfig)
    """The routing search (method, population, initial step, interval)."""
    plasticity: float = 1.0
    """Adapter learning rate = lr * plasticity; 0 freezes the adapters (only routing moves)."""
    reset_on_accept: bool = False
    """Reset the router's Adam state when the search replaces the router."""
    search_windows: int = 2
    """Fresh training windows per domain in the search objective of one generation."""
    confirm: bool = False
    """Re-evaluate an accepted child against its parent on a second fresh batch and keep it only if
    it still wins (the best of P children on one small batch wins by chance nearly always)."""
    acar: bool = field(default=False, metadata=rules(later("the acar arm came after the first map folders and "
                                                           "ledgers: off, a point is named as before")))
    """Add the acar arm: sigma routing (ACAR) over the grad arm's final router (top-3 of its logits per
    token) and adapters, paired against grad; counts the held-out tokens gated with 1, 2 and 3 slots."""

    def __post_init__(self) -> None:
        require(isinstance(self.plasticity, (int, float)) and math.isfinite(self.plasticity)
                and 0 <= self.plasticity <= 100, "plasticity", self.plasticity, "a number in [0, 100]")
        require(isinstance(self.search_windows, int) and 1 <= self.search_windows <= 256, "search_windows",
                self.search_windows, "an integer in [1, 256]")
        require(isinstance(self.acar, bool), "acar", self.acar, "true or false")
        require(not self.acar or self.cell.slots >= 3, "slots", self.cell.slots, "at least 3 with --acar")
        require(not self.cell.factors.lifecycle, "cell", self.cell.cell, "a cell without L (B3 or R: the map "
                "compares routing, the lifecycle is the factorial's question)")
        require(self.cell.router_kind != "acar", "router_kind", self.cell.router_kind, "auto or a router plugin "
                "(sigma routing is the map's acar arm: --acar)")
        require(self.cell.bases == 1, "bases", self.cell.bases, "1 in a routing map (every seed adapts base 0)")

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms a point runs: `ARMS`, and acar when `acar` is on."""
        return ALL_ARMS if self.acar else ARMS


def _reset_router_state(opt: torch.optim.Adam, st: RunState) -> None:
    """Forget the router's Adam moments (and step count): what an optimiser restart does."""
    for p in st.router.parameters():
        opt.state.pop(p, None)


@torch.no_grad()
def population_losses(rc: RoutingArms, st: RunState, vectors: Tensor, x: Tensor, y: Tensor, domains: Tensor,
                      n_domains: int) -> Tensor:
    """Balanced mean token NLL of every router in ``vectors (P, D)`` on windows ``x, y (N, T)``:
    ``(P,)``. Member p's gates come from its own parameters and the members are folded into the
    batch, each row with its member's gates (`substrate.fitness.folded_nll`: ``fold_rows(device) // N``
    members per forward pass)."""
    cell = rc.cell
    P, (N, T) = vectors.shape[0], x.shape
    feats = routing_features(st.model, x, cell.features, cell.pooling)               # (N, T, F)
    params = vector_to_params(vectors.to(feats.dtype), st.router.cfg)                # (P, ...) each
    gates = router_gates(st.router.cfg, params, feats.reshape(1, N * T, -1), st.step)  # (P, N*T, K)
    per_window = folded_nll(st.model, x, y, gates.reshape(P, N, T, -1), cell.device).double()   # (P, N)
    onehot = torch.nn.functional.one_hot(domains.to(x.device), n_domains).double()   # (N, M)
    per_domain = (per_window @ onehot) / onehot.sum(0).clamp_min(1)                  # (P, M)
    return per_domain.mean(-1).cpu()


def _search_batch(rc: RoutingArms, sub: Substrate, purpose: Purpose, step: int):
    """``search_windows`` fresh training windows per domain: ``x, y (N, T)``, ``domains (N,)``."""
    cell, M = rc.cell, sub.corpus.domains
    dom = torch.arange(M).repeat_interleave(rc.search_windows)
    x, y, dom = sample_batch(sub.corpus, "train", len(dom), generator(purpose, cell.seed, step), domains=dom)
    return x.to(cell.device), y.to(cell.device), dom


def _generation(rc: RoutingArms, st: RunState, sub: Substrate, search: evo.SearchState, gens: list) -> tuple[bool, bool]:
    """One generation of routing search on fresh training windows: ``(router changed, a child won
    on the search batch but lost the confirmation)``."""
    M = sub.corpus.domains
    x, y, dom = _search_batch(rc, sub, Purpose.SEARCH_BATCH, st.step)
    params = {k: v.detach().double().cpu() for k, v in st.router.params().items()}
    vec = params_to_vector(params)[None]                                             # (1, D)
    ecfg = rc.evolution
    unit = evo.mutation_scales({k: v[None] for k, v in params.items()}) if ecfg.method == "fixed" \
        else evo.logit_units({k: v[None] for k, v in params.items()})
    pop = evo.propose(vec, params_to_vector(unit), search, ecfg, gens)                # (1, P, D)
    obj = population_losses(rc, st, pop[0], x, y, dom, M)[None]                      # (1, P)
    new, took = evo.advance(search, pop, obj, ecfg)
    if bool(took[0]) and rc.confirm:
        x2, y2, dom2 = _search_batch(rc, sub, Purpose.SEARCH_CONFIRM, st.step)
        parent, child = population_losses(rc, st, torch.cat([vec, new]), x2, y2, dom2, M).tolist()
        if not child < parent:
            search.accepted[0] -= 1                       # not a change after all
            return False, True
    if bool(took[0]):
        with torch.no_grad():
            st.router.load_params({k: v[0].to(st.router.bias.dtype) for k, v in
                                   vector_to_params(new, st.router.cfg).items()})
    return bool(took[0]), False


def _oracle_gates(st: RunState, K: int):
    """Domain-oracle gates: every token of domain m on m's slot (`assignment`), ``(B, 1, K)``."""
    def gates_fn(x: Tensor, m: int) -> Tensor:
        g = torch.zeros(x.shape[0], 1, K, device=x.device)
        g[:, :, int(st.assignment[m])] = 1.0
        return g
    return gates_fn


@torch.no_grad()
def acar_router_gates(cell: CellConfig, st: RunState, x: Tensor) -> acar.AcarResult:
    """ACAR's gates for tokens ``x (B, T)`` with the run's router's logits as the per-token score:
    ``h W + b`` on the cell's routing features (causal prefix means), so the candidates, like sigma,
    read only tokens <= t."""
    params = st.router.params()
    feats = routing_features(st.model, x, cell.features, cell.pooling)              # (B, T, F)
    with autocast(cell.device):
        return acar.acar_gates(st.model, x, router_logits(params, feats.to(params["W"].dtype)), cell.slots)


def _acar_eval(rc: RoutingArms, st: RunState, sub: Substrate) -> tuple:
    """The acar arm on a trained state: held-out evaluation under `acar_router_gates`; returns the
    `EvalResult` and the held-out tokens gated with 1, 2 and 3 slots ``[n1, n2, n3]``."""
    cell, counts = rc.cell, dict.fromkeys(acar.MODES, 0)

    def gates_fn(x: Tensor, m: int) -> Tensor:
        res = acar_router_gates(cell, st, x)
        for k, c in res.counts().items():
            counts[k] += c
        return res.gates

    res = evaluate(st.model, sub.corpus, "heldout", gates_fn, max_windows=cell.eval_windows, device=cell.device)
    return res, [counts[k] for k in acar.MODES]


def run_arms(rc: RoutingArms, sub: Substrate, arms=None) -> dict[str, dict]:
    """Every arm (default ``rc.arms``) for one seed; ``{arm: {balanced, nll (M,), accepted, unconfirmed,
    generations, diverged_step, step_size, wall_s}}`` (``unconfirmed``: children that won the search
    batch but lost the confirmation); the acar arm adds ``modes`` (held-out tokens gated with 1 / 2 / 3 slots)."""
    arms = rc.arms if arms is None else tuple(arms)
    check(all(a in ALL_ARMS for a in arms), "arms", ",".join(arms), "a subset of " + ", ".join(ALL_ARMS))
    cell = rc.cell
    tcfg = adaptation(cell)
    out = {}
    trained = [a for a in ("grad", "evo", "restart") if a in arms or (a == "grad" and ("oracle" in arms or "acar" in arms))]
    for arm in trained:
        t0 = time.perf_counter()
        # Adapters at lr x plasticity (frozen at 0), the router at lr: the arms ignore --router-lr.
        st = build_state(cell, sub, adapter_scale=rc.plasticity, router_scale=1.0)
        gens = [generator(Purpose.SEARCH_NOISE, cell.seed, 0)]
        D = params_to_vector({k: v.detach()[None] for k, v in st.router.params().items()}).shape[-1]
        search = evo.init_search(rc.evolution, 1, D, gens) if arm == "evo" else None
        n_events, accepted, unconfirmed, diverged = 0, 0, 0, None
        for _ in range(cell.steps):
            loss = train_step(cell, st, sub.corpus, tcfg, train_data="windows")   # the map reads the fixed windows
            st.step += 1
            if not math.isfinite(loss):
                diverged = st.step - 1
                break
            if arm != "grad" and st.step % rc.evolution.interval == 0:
                n_events += 1
                if arm == "restart":
                    _reset_router_state(st.opt, st)
                else:
                    changed, rejected = _generation(rc, st, sub, search, gens)
                    accepted += changed
                    unconfirmed += rejected
                    if not changed:
                        continue
                    if rc.reset_on_accept:
                        _reset_router_state(st.opt, st)
        nan = float("nan")
        res = evaluate_state(cell, st, sub.corpus) if diverged is None else None
        out[arm] = {"balanced": res.balanced if res else nan, "nll": res.nll.tolist() if res else [nan] * sub.corpus.domains,
                    "generations": n_events, "accepted": accepted, "unconfirmed": unconfirmed,
                    "diverged_step": -1 if diverged is None else diverged,
                    "step_size": float(search.sigma[0]) if search is not None else nan,
                    "wall_s": time.perf_counter() - t0}
        if arm == "grad" and "oracle" in arms:
            t1 = time.perf_counter()
            ores = evaluate(st.model, sub.corpus, "heldout", _oracle_gates(st, cell.slots), max_windows=cell.eval_windows,
                            device=cell.device) if diverged is None else None
            out["oracle"] = {"balanced": ores.balanced if ores else nan, "nll": ores.nll.tolist() if ores else out[arm]["nll"],
                             "generations": 0, "accepted": 0, "unconfirmed": 0, "diverged_step": out[arm]["diverged_step"],
                             "step_size": nan, "wall_s": time.perf_counter() - t1}
        if arm == "grad" and "acar" in arms:
            t1 = time.perf_counter()
            ares, modes = _acar_eval(rc, st, sub) if diverged is None else (None, [0, 0, 0])
            out["acar"] = {"balanced": ares.balanced if ares else nan, "nll": ares.nll.tolist() if ares else out[arm]["nll"],
                           "generations": 0, "accepted": 0, "unconfirmed": 0, "diverged_step": out[arm]["diverged_step"],
                           "step_size": nan, "wall_s": time.perf_counter() - t1, "modes": modes}
    return {a: out[a] for a in arms}
