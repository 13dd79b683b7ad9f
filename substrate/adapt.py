"""A cell's live state: the substrate (corpus, cached base and specialists), the run state, its
checkpoints and final state, the optimiser and THE gradient step of the transformer (every cell of
`substrate.cell` and every trained arm of `substrate.routing` takes its steps here).

One gradient step ``t`` (0-based): training windows ``sample_batch`` from a generator seeded by
``(seed, t)`` only, features (no grad), gates, forward with every bank gated, mean token
cross-entropy, backward, global-norm clip, Adam on adapter factors and router parameters (the router
in its own group at ``router_lr``, by default `substrate.defaults.ROUTER_LR_RATIO` times ``lr``), learning
rate warm-up then cosine decay (`substrate.train.lr_at`). All randomness of step t comes from
generators seeded by ``(seed, t, purpose)``, so the data order and every lifecycle draw are pure
functions of (seed, step): a run resumed from a checkpoint replays exactly the same numbers, and
on CPU its final metrics equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from sandbox.errors import require
from sandbox.lifecycle import Population
from sandbox.router import Router
from sandbox.streams import Purpose, generator
from substrate import acar
from substrate.config import CellConfig
from substrate.corpus import Corpus, CorpusConfig, fresh_batch, load_text_domains, sample_batch, synthetic_corpus
from substrate.model import GPT, autocast, freeze_base, load_banks, routing_features
from substrate.train import (TrainConfig, clip_gradients, evaluate, initial_banks, lr_at, pretrain, pretraining, lr_schedule,
                            train_specialists)

# Purposes of the per-step generators (`sandbox.streams`).
_BATCH, _FIT, _LIFE = Purpose.CELL_BATCH, Purpose.CELL_FITNESS, Purpose.CELL_LIFECYCLE
_INIT, _PERTURB = Purpose.CELL_INIT, Purpose.CELL_PERTURB


def step_generator(seed: int, step: int, purpose: Purpose) -> torch.Generator:
    """The CPU generator of a run's `purpose` at `step` (`sandbox.streams.generator`)."""
    return generator(purpose, seed, step)


# ---------------------------------------------------------------------------------------------
# The substrate: corpus, cached base, cached specialists
# ---------------------------------------------------------------------------------------------


@dataclass
class Substrate:
    """Everything shared by the cells of one preset: the corpus, the frozen base's weights, the
    specialists ``{bank: (A (M, r, d_in), B (M, d_out, r))}`` and the plain base's held-out NLL."""

    corpus: Corpus
    base_state: dict[str, Tensor]
    specialists: dict[str, tuple[Tensor, Tensor]]
    base_nll: list[float]


def prepare_substrate(cfg: CellConfig, cache_dir: str | Path, log: Callable[[str], None] | None = None,
                      stage: Callable[[str, int, int], None] | None = None) -> Substrate:
    """Build the corpus, pretrain the base and train the specialists, each cached in `cache_dir`.
    `stage(name, done, total)` reports the progress of the long steps (not called on a cache hit).

    The base and the specialists do not depend on the cell: they are pretrained from the run's
    ``base_seed`` (``seed mod bases``; 0, the one base of earlier runs, with ``bases = 1``), so the cells
    of a seed adapt the same frozen base and contrasts pair on it. The corpus does not depend on the
    base.
    """
    say = log or (lambda m: None)
    s = cfg.substrate()
    mcfg = cfg.model_config()
    if cfg.data is not None:
        corpus = load_text_domains(cfg.data, mcfg.vocab, s["context"], cache_dir=cache_dir)
    else:
        corpus = synthetic_corpus(CorpusConfig(domains=cfg.domains, vocab=mcfg.vocab, clusters=s["clusters"],
                                               seq_len=s["context"], train_windows=s["train_windows"],
                                               heldout_windows=s["heldout_windows"]), cache_dir)
    require(corpus.domains <= cfg.slots, "slots", cfg.slots, f"at least the number of domains ({corpus.domains})")
    say(f"substrate {cfg.preset}, base {cfg.base_seed}: {corpus.domains} domains, context {s['context']}; pretraining "
        f"{s['pretrain_steps']} steps (cached in {cache_dir})")
    tell = (lambda name, total: None if stage is None else (lambda row: stage(name, row["step"] + 1, total)))
    base = pretrain(mcfg, corpus, pretraining(s["pretrain_steps"], batch=s["pretrain_batch"], seed=cfg.base_seed),
                    device=cfg.device,
                    cache_dir=cache_dir, progress=tell("pretraining the base", s["pretrain_steps"]))
    say(f"specialists: {s['specialist_steps']} steps (cached)")
    spec = train_specialists(base, corpus, steps=s["specialist_steps"], device=cfg.device, cache_dir=cache_dir,
                             seed=cfg.base_seed,
                             progress=tell("specialists", s["specialist_steps"]))
    plain = evaluate(base, corpus, "heldout", None, max_windows=cfg.eval_windows, device=cfg.device)
    return Substrate(corpus, {k: v.cpu() for k, v in base.base_state_dict().items()}, spec, plain.nll.tolist())


# ---------------------------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------------------------


@dataclass
class RunState:
    """The live objects of a run; `checkpoint` / `restore` move them to and from a dict."""

    model: GPT
    router: Router
    opt: torch.optim.Optimizer
    pop: Population
    assignment: Tensor
    step: int = 0
    wall_s: float = 0.0
    diverged_step: int | None = None
    curves: list = dataclasses.field(default_factory=list)
    gates: list = dataclasses.field(default_factory=list)
    events: list = dataclasses.field(default_factory=list)
    fitness: list = dataclasses.field(default_factory=list)
    train_loss: list = dataclasses.field(default_factory=list)
    acar_score: Tensor | None = None
    """--router acar: the cheap per-slot score ``(K,)`` (minus held-in loss, measured at build)."""
    gate_stats: dict = dataclasses.field(default_factory=dict)
    """Phase (before / after) -> the gate diagnostics on the held-out windows (`gate_record`)."""
    reads: list = dataclasses.field(default_factory=list)
    """Training windows read so far per domain (adaptation and selection batches, `train_batch`)."""


def perturb_(model: GPT, scale: float, generator: torch.Generator) -> None:
    """Add ``scale * rms(W) * N(0, 1)`` noise to every frozen base matrix W (dim >= 2) in place."""
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if GPT.is_adapter(name) or p.dim() < 2:
                continue
            rms = p.float().pow(2).mean().sqrt()
            p.add_(scale * rms * torch.randn(p.shape, generator=generator).to(p))


def build_state(cfg: CellConfig, sub: Substrate, *, adapter_scale: float = 1.0,
                router_scale: float | None = None) -> RunState:
    """The starting state of a cell: frozen (optionally perturbed) base, the seed's starting bank
    by alignment, a fresh router of the cell's kind, Adam (`optimizer`), founder population.

    The optimiser's learning rates are ``cfg.lr`` times the scales: the adapters' `adapter_scale` (0
    freezes them: the routing map's plasticity) and the router's `router_scale` (None: the cell's
    ``router_lr_value / lr``, 1 when the router's lr equals ``lr``)."""
    mcfg = cfg.model_config()
    model = GPT(mcfg, torch.Generator().manual_seed(0))
    missing, unexpected = model.load_state_dict(sub.base_state, strict=False)
    assert not unexpected and all(GPT.is_adapter(k) for k in missing)
    if cfg.perturb_base > 0:
        perturb_(model, cfg.perturb_base, step_generator(cfg.seed, 0, _PERTURB))
    g = step_generator(cfg.seed, 0, _INIT)
    factors, assignment = initial_banks(sub.specialists, cfg.alignment, cfg.slots, g,
                                        scale=mcfg.lora_alpha / mcfg.rank)
    load_banks(model, factors)
    model = model.to(cfg.device)
    params = freeze_base(model)
    router = Router(cfg.router_config(mcfg.d_model), generator=g).to(cfg.device)
    if router_scale is None:
        rlr = cfg.router_lr_value
        router_scale = 1.0 if rlr == cfg.lr else rlr / cfg.lr
    opt = optimizer(params, list(router.parameters()), cfg.lr, adapter_scale=adapter_scale, router_scale=router_scale)
    st = RunState(model, router, opt, Population.founders((), cfg.slots), assignment)   # population on CPU
    st.reads = [0] * sub.corpus.domains
    if cfg.router_kind == "acar":
        st.acar_score = acar_held_in_score(cfg, st, sub.corpus)
    return st


def optimizer(adapters: list, router: list, lr: float, *, adapter_scale: float = 1.0,
              router_scale: float = 1.0) -> torch.optim.Adam:
    """THE optimiser of a transformer run: Adam on the adapter parameters at ``lr * adapter_scale`` and
    the router's at ``lr * router_scale``. Each group's ``scale`` is what `train_step` multiplies the
    scheduled rate by (``lr_at(step) x scale``). Both scales 1: one group, exactly the optimiser of the
    runs before --router-lr (their checkpoints hold one group); else the adapters' group, then the
    router's. ``adapter_scale`` 0: the adapters are frozen (``requires_grad`` off) and left out, so only
    the router moves (the routing map at plasticity 0)."""
    if adapter_scale == 0:
        for p in adapters:
            p.requires_grad_(False)
        return torch.optim.Adam([{"params": router, "lr": lr * router_scale, "scale": router_scale}], lr=lr)
    if adapter_scale == 1 and router_scale == 1:
        return torch.optim.Adam(adapters + router, lr=lr)
    return torch.optim.Adam([{"params": adapters, "lr": lr * adapter_scale, "scale": adapter_scale},
                             {"params": router, "lr": lr * router_scale, "scale": router_scale}], lr=lr)


def acar_held_in_score(cfg: CellConfig, st: RunState, corpus: Corpus) -> Tensor:
    """--router acar: minus each slot's held-in loss ``(K,)`` on ``fit_windows`` training windows per
    domain, drawn from the fitness stream of step 0 (which no fitness event uses: those run at
    steps >= 1), so the score is a pure function of (seed, starting bank)."""
    M, w = corpus.domains, cfg.fit_windows
    dom = torch.arange(M).repeat_interleave(w)
    x, y, _ = train_batch(cfg, st, corpus, M * w, step_generator(cfg.seed, 0, _FIT), domains=dom)
    with autocast(cfg.device):
        return acar.held_in_score(st.model, x.to(cfg.device), y.to(cfg.device), cfg.slots)


def checkpoint(cfg: CellConfig, st: RunState) -> dict:
    return {"config": cfg.identity(), "step": st.step, "wall_s": st.wall_s, "diverged_step": st.diverged_step,
            "banks": {n: (b.A.detach().cpu(), b.B.detach().cpu()) for n, b in st.model.banks().items()},
            "router": {k: v.detach().cpu() for k, v in st.router.state_dict().items()},
            "opt": st.opt.state_dict(), "assignment": st.assignment,
            "pop": {k: getattr(st.pop, k) for k in ("ids", "ages", "parents", "next_id", "step")},
            "tables": {k: getattr(st, k) for k in ("curves", "gates", "events", "fitness", "train_loss", "gate_stats",
                                                   "reads")},
            "torch_rng": torch.get_rng_state()}


FINAL = "final.pt"
"""The finished run's trained state in its folder (`final_state`); `sandbox export` reads it."""


def final_state(cfg: CellConfig, st: RunState) -> dict:
    """What a finished run keeps (``final.pt``): the final bank ``{name: (A (K, r, d_in), B (K, d_out,
    r))}``, the router (state dict, config, features, pooling, the step its temperature is read at),
    the frozen base it was trained on (perturbed when ``perturb_base > 0``) and the model config, so
    `substrate.export` can write every slot in a standard format without the cache."""
    return {"config": cfg.identity(), "step": st.step, "model": dataclasses.asdict(cfg.model_config()),
            "banks": {n: (b.A.detach().cpu(), b.B.detach().cpu()) for n, b in st.model.banks().items()},
            "router_kind": cfg.router_kind, "features": cfg.features, "pooling": cfg.pooling,
            "router_config": dataclasses.asdict(st.router.cfg),
            "router": {k: v.detach().cpu() for k, v in st.router.state_dict().items()},
            "acar_score": None if st.acar_score is None else st.acar_score.detach().cpu(),
            "assignment": st.assignment, "base": {k: v.detach().cpu() for k, v in st.model.base_state_dict().items()}}


def restore(st: RunState, ck: dict) -> None:
    load_banks(st.model, ck["banks"])
    st.router.load_state_dict(ck["router"])
    st.opt.load_state_dict(ck["opt"])
    st.pop = Population(**ck["pop"])
    st.assignment = ck["assignment"]
    st.step, st.wall_s, st.diverged_step = ck["step"], ck["wall_s"], ck["diverged_step"]
    for k, v in ck["tables"].items():
        setattr(st, k, v)
    torch.set_rng_state(ck["torch_rng"])


# ---------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------


def gates_for(cfg: CellConfig, st: RunState, x: Tensor, step: int) -> Tensor:
    """Gates ``(B, T, K)`` of the run's router for tokens ``x (B, T)`` at `step`."""
    if cfg.router_kind == "acar":                                               # no grad, no router
        with autocast(cfg.device):
            return acar.acar_gates(st.model, x, st.acar_score, cfg.slots).gates
    feats = routing_features(st.model, x, cfg.features, cfg.pooling)          # (B, T, D), no grad
    return st.router(feats, step)


def train_batch(cfg: CellConfig, st: RunState, corpus: Corpus, batch: int, gen: torch.Generator,
                domains: Tensor | None = None, train_data: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training windows for the run (`substrate.corpus.sample_batch` from the fixed windows, or
    `substrate.corpus.fresh_batch` with ``train_data`` fresh), counted per domain in ``st.reads``.
    `train_data`: windows or fresh, default the config's (`CellConfig.train_data_value`)."""
    fresh = (train_data or cfg.train_data_value) == "fresh"
    draw = fresh_batch if fresh else (lambda c, *a, **k: sample_batch(c, "train", *a, **k))
    x, y, dom = draw(corpus, batch, gen, domains=domains)
    for m, n in enumerate(torch.bincount(dom, minlength=corpus.domains).tolist()):
        st.reads[m] += n
    return x, y, dom


def adaptation(cfg: CellConfig) -> TrainConfig:
    """The learning-rate schedule of adapting a cell (`train_step`'s ``tcfg``): ``cfg.steps`` steps at
    peak ``cfg.lr`` (the router's group scaled, `build_optimizer`), the adaptation warm-up of
    `substrate.train.warmup_steps`, cosine to a tenth. Every cell run, the map's trained arms and the
    benchmark's step use it."""
    return lr_schedule(cfg.steps, "adapt", lr=cfg.lr, batch=cfg.batch, min_lr_ratio=0.1)


def train_step(cfg: CellConfig, st: RunState, corpus: Corpus, tcfg: TrainConfig, train_data: str | None = None) -> float:
    """One gradient step ``st.step`` on the batch of ``(seed, step)`` with ``st.opt``; returns the loss.
    The one step of every transformer run: the cells' (`substrate.cell.run_cell`) and the routing
    map's trained arms (`substrate.routing.run_arms`, which read the fixed windows: ``train_data``
    windows). The gates are computed inside the autocast region (bf16 on CUDA, as the cells always
    have; on the CPU autocast is a no-op)."""
    x, y, _ = train_batch(cfg, st, corpus, cfg.batch, step_generator(cfg.seed, st.step, _BATCH), train_data=train_data)
    x, y = x.to(cfg.device), y.to(cfg.device)
    for group in st.opt.param_groups:
        group["lr"] = lr_at(st.step, tcfg) * group.get("scale", 1.0)
    with autocast(cfg.device):
        _, loss = st.model(x, gates_for(cfg, st, x, st.step), y)
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in st.opt.param_groups for p in g["params"]]
    clip_gradients(params, tcfg)     # parameters without a gradient (unused router knobs) are skipped
    st.opt.step()
    return float(loss.detach())
