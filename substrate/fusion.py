"""Independent specialist fusion on the transformer substrate: one (point, seed) of `sandbox fusion`.

From one shared frozen base (`substrate.cell.prepare_substrate`, cached), the M per-domain
specialists are trained for ``specialist_steps`` steps (`substrate.train.train_specialists`, seed
= the trial's seed, cached), then fused: an M-slot bank whose slot m holds specialist m's LoRA
factors, frozen, with a router trained alone (Adam, warm-up + cosine) for ``router_steps`` steps on
balanced training batches. Both routers of the factorial are fused on the same specialists:

- ``B3``: softmax router on causal prefix means of the token embeddings;
- ``R``: sigmoid router (learnable floor, annealed temperature, fair ``mass`` start) on causal
  prefix means of the base's post-stack hidden states.

Baselines on the same specialists (no training): ``uniform`` (every slot gated 1/M, i.e. the base
plus the mean of the specialists' updates: weight averaging of the fine-tuned copies) and
``oracle`` (domain-oracle routing: each held-out window of domain m gated one-hot on slot m).
``best_specialist`` is the single specialist with the lowest balanced held-out loss when it
serves every domain; ``base`` is the plain shared base (no adapter), reported on the same gain scale.

Every loss is the held-out mean token NLL per domain (nats), balanced = equal weight per domain.

- divergence = mean over specialists m of ``100 (L_base(m) - L_spec_m(m)) / L_base(m)``;
- gain(method) = ``100 (L_best - L_method) / L_best`` on balanced losses (percent, positive =
  the fused model beats the best single specialist).

Randomness: specialists from `train_specialists(seed=seed)`; the router's start from
``Purpose.CELL_INIT`` and its batches from ``Purpose.CELL_BATCH`` (keys: step) of the seed, as a
cell run draws them.

``specialists="full"`` (presets tiny and small only): each domain's specialist is instead a full
fine-tuned copy of the shared base (`train_full_copies`: every base weight trained on its domain
for ``specialist_steps`` steps, AdamW without weight decay or clipping, warm-up + cosine, the same
balanced batches from ``Purpose.SPECIALIST_BATCH`` as the LoRA specialists, copy m trained on the
rows of domain m; cached). The M copies are stacked and run in one batched pass
(`torch.func.functional_call` under `torch.vmap`), and fusion is an output mixture
(`mixture_nll`): per token the fused next-token distribution is ``sum_m g_m p_m(. | prefix)``,
the gate-weighted mixture of the copies' *probabilities* (not logits), computed as
``logsumexp_m(log g_m + log p_m(y))``. Probabilities, because that is a mixture of experts in
the literal sense: with one-hot gates it is exactly the chosen copy, with uniform gates the
ensemble average, the fused NLL never exceeds ``-log g_m - log p_m`` for any copy m (so a router
can always fall back on one copy), and it is a proper distribution for any convex gates; mixing
logits would be a product of experts, whose loss has no such bound. B3's softmax gates are used as
they are; R's sigmoid gates are normalised to sum to 1 per token (``g / sum_k g_k``; the sum is
at least the sum of R's floors, and in practice near the ``mass`` start of 1) so the mixture is a
distribution while R still decides each copy independently before the normalisation. Features
are the same as for LoRA (B3: the base's token-embedding prefix means; R: the base's post-stack
hidden-state prefix means). ``uniform`` is then the mixture with every gate 1/M (output
averaging of the copies, not weight averaging), ``oracle`` each domain on its own copy,
``best_specialist`` the copy with the lowest balanced loss.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

from sandbox.errors import require
from sandbox.identity import identity, key, later, never, rules
from sandbox.results import atomic_save_torch, load_torch
from sandbox.router import Router
from sandbox.streams import Purpose, generator
from substrate.adapt import Substrate
from substrate.config import DEVICES, CellConfig
from substrate.corpus import sample_batch
from substrate.model import GPT, PRESETS, autocast, load_banks, routing_features
from substrate.train import clip_gradients, evaluate, lr_at, lr_schedule, train_specialists, weights_fingerprint

METHODS = ("best_specialist", "base", "uniform", "oracle", "B3", "R")
SPECIALISTS = ("lora", "full")
#: Default peak learning rate of the specialists: LoRA slots, and full copies (whole weights move).
SPECIALIST_LR = {"lora": 1e-2, "full": 1e-3}
#: Presets small enough for full fine-tuned copies (M copies of every base weight, trained and run at once).
FULL_PRESETS = ("tiny", "small")


@dataclass(frozen=True)
class FusionConfig:
    """One fusion trial. Field names are CLI flags of ``sandbox fusion`` (``router_steps`` is ``--router-steps``)."""

    preset: str = "tiny"
    """Model preset of the shared base: tiny, small or widened-1536."""
    specialist_steps: int = 30
    """Steps of each specialist (the point's divergence knob)."""
    specialist_lr: float | None = None
    """Peak learning rate of the specialists (None: `SPECIALIST_LR` of the kind of specialists)."""
    router_steps: int = 100
    """Router-only training steps of each fused model."""
    router_lr: float = 1e-2
    """Peak Adam learning rate of the router."""
    batch: int = 8
    """Training windows per router step."""
    seed: int = field(default=0, metadata=rules(never("a point holds every seed")))
    """Seed of the specialists, the router's start and its batch order."""
    domains: int = 4
    """M: synthetic domains (= slots of the fused bank)."""
    eval_windows: int | None = None
    """Held-out windows per domain (default all)."""
    device: str = field(default="cpu", metadata=rules(never("where a trial computes, not what")))
    """cpu or cuda."""
    specialists: str = field(default="lora", metadata=rules(later("added after the first fusion ledgers: LoRA "
                                                                  "slots, the specialists those trials had")))
    """lora (LoRA slots of one bank) or full (full fine-tuned copies of the base; tiny and small only)."""

    def __post_init__(self) -> None:
        require(self.preset in PRESETS, "preset", self.preset, "one of " + ", ".join(PRESETS))
        require(self.specialists in SPECIALISTS, "specialists", self.specialists, "lora or full")
        if self.specialist_lr is None:
            object.__setattr__(self, "specialist_lr", SPECIALIST_LR[self.specialists])
        require(self.specialists == "lora" or self.preset in FULL_PRESETS, "specialists", self.specialists,
                f"lora with --preset {self.preset} (full copies only with --preset {' or '.join(FULL_PRESETS)})")
        for name, lo in (("specialist_steps", 1), ("router_steps", 1), ("batch", 1), ("seed", 0), ("domains", 2)):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, v, f"an integer >= {lo}")
        for name in ("specialist_lr", "router_lr"):
            v = getattr(self, name)
            require(isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= 1, name, v, "a number in (0, 1]")
        if self.eval_windows is not None:
            require(isinstance(self.eval_windows, int) and self.eval_windows >= 1, "eval_windows", self.eval_windows,
                    "an integer >= 1")
        require(self.device in DEVICES, "device", self.device, "cpu or cuda")

    def cell(self, router: str = "B3") -> CellConfig:
        """The cell whose substrate (corpus, base) and router settings the fusion reuses. The sigmoid
        router keeps the anneal on the whole logit (``tau_scales="logit"``, the fusion's behaviour since
        it was written: its ledger keys do not hold the router's settings, so a change here would mix
        old and new trials under one key)."""
        return CellConfig.of(cell=router, preset=self.preset, steps=self.router_steps, seed=self.seed, slots=self.domains,
                          domains=self.domains, batch=self.batch, lr=self.router_lr, eval_windows=self.eval_windows,
                          device=self.device, tau_scales="logit")

    def identity(self) -> dict:
        """Everything that determines a trial's numbers except the seed and the device (the fields'
        rules, `sandbox.identity`)."""
        return identity(self)


# ---------------------------------------------------------------------------------------------
# Definitions (pure functions of per-domain losses; tested on hand cases)
# ---------------------------------------------------------------------------------------------


def divergence(base_nll, own_nll) -> float:
    """Mean over specialists of ``100 (L_base(m) - L_spec_m(m)) / L_base(m)`` (percent)."""
    b, s = np.asarray(base_nll, float), np.asarray(own_nll, float)
    return float(np.mean(100.0 * (b - s) / b))


def gain(best: float, method: float) -> float:
    """Gain over the best specialist, ``100 (L_best - L_method) / L_best`` (percent; positive = better)."""
    return 100.0 * (float(best) - float(method)) / float(best)


def best_specialist(spec_nll) -> tuple[int, float]:
    """``spec_nll (K, M)``: specialist k's held-out NLL on domain m. Returns the index and balanced
    loss (mean over domains, equal weight) of the specialist with the lowest balanced loss."""
    bal = np.asarray(spec_nll, float).mean(1)
    k = int(np.argmin(bal))
    return k, float(bal[k])


def summarize(losses: dict) -> list[dict]:
    """Rows (one per method in `METHODS` present) from per-domain losses.

    `losses`: ``base (M,)``, ``spec (M, M)`` (row k = specialist k on every domain), and per method
    ``uniform``, ``oracle``, ``B3``, ``R`` ``(M,)``. The oracle's loss on domain m is specialist m's
    own loss, so ``oracle`` defaults to the diagonal of ``spec``.
    """
    spec = np.asarray(losses["spec"], float)
    base = np.asarray(losses["base"], float)
    div = divergence(base, np.diag(spec))
    k, best = best_specialist(spec)
    per = {"best_specialist": spec[k], "base": base, "oracle": np.asarray(losses.get("oracle", np.diag(spec)), float)}
    for m in ("uniform", "B3", "R"):
        if m in losses:
            per[m] = np.asarray(losses[m], float)
    rows = []
    for method in METHODS:
        if method not in per:
            continue
        bal = float(per[method].mean())
        ok = math.isfinite(bal)
        rows.append({"method": method, "divergence": div, "balanced_nll": bal if ok else float("nan"),
                     "gain": gain(best, bal) if ok else float("nan"), "best_specialist": k,
                     "best_specialist_nll": best, "base_nll": float(base.mean()), "diverged": not ok,
                     **{f"nll_{i}": float(v) for i, v in enumerate(per[method])}})
    return rows


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def fused_model(sub: Substrate, cfg: FusionConfig, specialists: dict[str, tuple[Tensor, Tensor]]) -> GPT:
    """The frozen base with an M-slot bank holding the specialists (slot m = specialist m), all frozen."""
    mcfg = replace(cfg.cell().model_config(), slots=cfg.domains)
    model = GPT(mcfg, generator(Purpose.MODEL_INIT, 0))    # every weight is overwritten just below
    missing, unexpected = model.load_state_dict(sub.base_state, strict=False)
    assert not unexpected and all(GPT.is_adapter(k) for k in missing)
    load_banks(model, specialists)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(cfg.device).eval()


def base_model(sub: Substrate, cfg: FusionConfig) -> GPT:
    """The plain shared base (its bank shape is the preset's; only the base weights matter)."""
    model = GPT(cfg.cell().model_config(), torch.Generator().manual_seed(0))
    model.load_state_dict(sub.base_state, strict=False)
    return model.to(cfg.device).eval()


def specialists_for(sub: Substrate, cfg: FusionConfig, cache_dir: str | Path | None) -> dict[str, tuple[Tensor, Tensor]]:
    """The trial's specialists: `train_specialists` on the shared base (seed = the trial's seed; cached)."""
    return train_specialists(base_model(sub, cfg), sub.corpus, steps=cfg.specialist_steps, lr=cfg.specialist_lr,
                             device=cfg.device, cache_dir=cache_dir, seed=cfg.seed)


def _const_gates(x: Tensor, g: Tensor) -> Tensor:
    return g.to(x.device)[None, None, :].expand(x.shape[0], 1, g.shape[0])       # (B, 1, K)


def _fit_router(model: GPT, sub: Substrate, cfg: FusionConfig, router: str, loss_fn) -> tuple[Router, list[float]]:
    """Router-only training for ``router_steps`` steps: a fresh router of the cell's kind (the
    cell's init stream), the cell's batches, warm-up + cosine, clip 1; ``loss_fn(x, y, gates)``
    is the fused loss. Returns the router and the per-step losses."""
    cell = cfg.cell(router)
    rt = Router(cell.router_config(model.cfg.d_model), generator=generator(Purpose.CELL_INIT, cfg.seed, 0)).to(cfg.device)
    opt = torch.optim.Adam(rt.parameters(), lr=cfg.router_lr)
    tcfg = lr_schedule(cfg.router_steps, "train", lr=cfg.router_lr)
    losses = []
    for step in range(cfg.router_steps):
        x, y, _ = sample_batch(sub.corpus, "train", cfg.batch, generator(Purpose.CELL_BATCH, cfg.seed, step))
        x, y = x.to(cfg.device), y.to(cfg.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        feats = routing_features(model, x, cell.features, cell.pooling)
        loss = loss_fn(x, y, rt(feats, step))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(list(rt.parameters()), tcfg)
        opt.step()
        losses.append(float(loss.detach()))
    return rt, losses


def train_router(model: GPT, sub: Substrate, cfg: FusionConfig, router: str) -> tuple[Router, list[float]]:
    """Router-only training on the fused bank (`_fit_router`); returns the router and the losses."""
    def loss_fn(x, y, gates):
        with autocast(cfg.device):
            return model(x, gates, y)[1]
    return _fit_router(model, sub, cfg, router, loss_fn)


def held_out(model: GPT, sub: Substrate, cfg: FusionConfig, gates_fn) -> np.ndarray:
    """Per-domain held-out mean token NLL ``(M,)`` under ``gates_fn(x, m)``."""
    return evaluate(model, sub.corpus, "heldout", gates_fn, max_windows=cfg.eval_windows,
                    device=cfg.device).nll.numpy()


def run_fusion(cfg: FusionConfig, sub: Substrate, cache_dir: str | Path | None = None,
               specialists: dict[str, tuple[Tensor, Tensor]] | None = None,
               routers: tuple[str, ...] = ("B3", "R")) -> dict:
    """One (point, seed): train (or take) the specialists, fuse them, measure every method.

    Returns ``{"losses": {...}, "rows": summarize(losses) with wall_s, "wall_s": {...}}``.
    """
    if cfg.specialists == "full":
        return run_fusion_full(cfg, sub, cache_dir, copies=specialists, routers=routers)
    t0 = time.perf_counter()
    require(sub.corpus.domains == cfg.domains, "domains", cfg.domains, f"the corpus's {sub.corpus.domains} domains")
    spec = specialists if specialists is not None else specialists_for(sub, cfg, cache_dir)
    t_spec = time.perf_counter() - t0
    M = cfg.domains
    model = fused_model(sub, cfg, spec)
    eye = torch.eye(M)
    losses = {"base": held_out(model, sub, cfg, None),
              "spec": np.stack([held_out(model, sub, cfg, lambda x, m, k=k: _const_gates(x, eye[k])) for k in range(M)]),
              "uniform": held_out(model, sub, cfg, lambda x, m: _const_gates(x, torch.full((M,), 1.0 / M))),
              "oracle": held_out(model, sub, cfg, lambda x, m: _const_gates(x, eye[m]))}
    walls = {"specialists": t_spec}
    for r in routers:
        t = time.perf_counter()
        rt, _ = train_router(model, sub, cfg, r)
        cell = cfg.cell(r)
        with torch.no_grad():
            losses[r] = held_out(model, sub, cfg, lambda x, m: rt(routing_features(model, x, cell.features, cell.pooling),
                                                                   cfg.router_steps))
        walls[r] = time.perf_counter() - t
    return _trial_result(losses, walls, routers, time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------
# Full fine-tuned copies (``specialists="full"``)
# ---------------------------------------------------------------------------------------------


def base_weights(model: GPT) -> dict[str, Tensor]:
    """The base's trainable weights by parameter name (no adapter factors), detached."""
    return {n: p.detach() for n, p in model.named_parameters() if not model.is_adapter(n)}


def copy_logits(model: GPT, copies: dict[str, Tensor], x: Tensor) -> Tensor:
    """Logits ``(M, B, T, V)`` of the M stacked copies ``{name: (M, ...)}`` on ``x (B, T)`` in one
    batched pass (`functional_call` under `vmap`; the model's own weights are only the template)."""
    from torch.func import functional_call

    with warnings.catch_warnings():                      # CPU SDPA has no vmap batching rule: falls back to a loop
        warnings.filterwarnings("ignore", message=".*batching rule.*")
        return torch.vmap(lambda w: functional_call(model, w, (x,)))(copies)


def copy_logprobs(model: GPT, copies: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
    """Per-token log-probabilities of the targets under each copy: ``(M, B, T)`` (fp32 log-softmax)."""
    logits = copy_logits(model, copies, x).float()
    return torch.log_softmax(logits, -1).gather(-1, y[None, :, :, None].expand(logits.shape[0], -1, -1, 1))[..., 0]


def mixture_nll(logp: Tensor, gates: Tensor) -> Tensor:
    """Per-token NLL ``(B, T)`` of the gate-weighted mixture of the copies' probabilities.

    ``logp (M, B, T)``: each copy's log-probability of the target; ``gates (B, T, M) | (B, 1, M)``
    convex weights (rows sum to 1). ``-log sum_m g_m p_m = -logsumexp_m(log g_m + log p_m)``;
    a zero gate contributes nothing (log 0 = -inf).
    """
    lg = torch.log(gates.float()).permute(2, 0, 1)                          # (M, B, T|1)
    return -torch.logsumexp(lg + logp, dim=0)


def normalise_gates(gates: Tensor, router: str) -> Tensor:
    """Mixture weights from a router's gates: B3's softmax as is, R's sigmoid gates divided by their sum."""
    if router == "B3":
        return gates
    return gates / gates.sum(-1, keepdim=True).clamp_min(1e-12)


def train_full_copies(base: GPT, corpus, steps: int, lr: float, seed: int = 0, batch: int | None = None,
                      device: str | torch.device = "cpu", cache_dir: str | Path | None = None) -> dict[str, Tensor]:
    """M full fine-tuned copies of `base`, one per domain: ``{name: (M, ...)}`` on CPU (row m = domain m's copy).

    Every base weight of copy m is trained on domain m only for `steps` steps: AdamW (betas 0.9,
    0.95, no weight decay, no clipping), warm-up + cosine (`lr_at`), the same balanced batches as
    `train_specialists` (``Purpose.SPECIALIST_BATCH`` of the seed, ``batch`` rounded up to a
    multiple of M, default 8 per domain); copy m sees the rows of domain m. All copies train at
    once as stacked weights under `vmap`; the loss is the sum over copies of each copy's mean token
    NLL, so copy m's gradient is exactly that of its own run. `base` is not modified. Cached as
    ``cache_dir/fullcopies-<key>.pt`` keyed like the LoRA specialists (base fingerprint, corpus,
    settings).
    """
    M = corpus.domains
    per = max(1, math.ceil((batch or 8 * M) / M))
    tcfg = lr_schedule(steps, "train", lr=lr, batch=per * M, weight_decay=0.0, grad_clip=0.0, seed=seed)
    name = key({"kind": "full", "base": weights_fingerprint(base), "cfg": base.cfg, "corpus": corpus.key,
                "train": tcfg}, 16)
    path = Path(cache_dir) / f"fullcopies-{name}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        return load_torch(path, "--cache", "cached full-copy specialists", "delete it and rerun to train them again",
                          map_location="cpu", weights_only=True)
    template = base.to(device)
    copies = {n: w.detach().to(device)[None].repeat(M, *([1] * w.dim())).requires_grad_(True)
              for n, w in base_weights(template).items()}
    fused = torch.device(device).type == "cuda"
    opt = torch.optim.AdamW(list(copies.values()), lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)
    g = generator(Purpose.SPECIALIST_BATCH, seed)
    domains = torch.arange(M).repeat_interleave(per)                             # (B,) balanced, grouped by domain
    was_training = template.training
    template.train()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        x, y, _ = sample_batch(corpus, "train", tcfg.batch, g, domains=domains)
        x, y = x.to(device).view(M, per, -1), y.to(device).view(M, per, -1)    # copy m <- domain m's rows
        from torch.func import functional_call

        def one(w, xm, ym):
            logits = functional_call(template, w, (xm,))
            return Fn.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ym.reshape(-1))

        with warnings.catch_warnings(), autocast(device):
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            loss = torch.vmap(one)(copies, x, y).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    template.train(was_training)
    out = {n: w.detach().cpu().clone() for n, w in copies.items()}
    if path is not None:
        atomic_save_torch(path, out)
    return out


def full_copies_for(sub: Substrate, cfg: FusionConfig, cache_dir: str | Path | None) -> dict[str, Tensor]:
    """The trial's full fine-tuned copies (seed = the trial's seed; cached)."""
    return train_full_copies(base_model(sub, cfg), sub.corpus, steps=cfg.specialist_steps, lr=cfg.specialist_lr,
                             seed=cfg.seed, device=cfg.device, cache_dir=cache_dir)


def train_mixture_router(model: GPT, copies: dict[str, Tensor], sub: Substrate, cfg: FusionConfig,
                         router: str) -> tuple[Router, list[float]]:
    """Router-only training over the frozen copies' output mixture (`_fit_router`: the same start,
    batches, schedule and clipping as `train_router`); returns the router and the losses."""
    def loss_fn(x, y, gates):
        with torch.no_grad(), autocast(cfg.device):
            logp = copy_logprobs(model, copies, x, y)                           # frozen copies
        return mixture_nll(logp, normalise_gates(gates, router)).mean()
    return _fit_router(model, sub, cfg, router, loss_fn)


@torch.no_grad()
def held_out_full(model: GPT, copies: dict[str, Tensor], sub: Substrate, cfg: FusionConfig,
                  routers: dict[str, Router], batch: int = 64) -> dict[str, np.ndarray]:
    """Per-domain held-out mean token NLL of every method in one pass over the held-out windows
    (the copies' log-probabilities computed once per chunk): ``base (M,)``, ``spec (M, M)``,
    ``uniform``, ``oracle`` and each router's ``(M,)``."""
    M = cfg.domains
    names = ["base", *(f"spec{k}" for k in range(M)), "uniform", "oracle", *routers]
    sums = {n: np.zeros(M) for n in names}
    counts = np.zeros(M)
    model.eval()
    for m, windows in enumerate(sub.corpus.split("heldout")):
        w = windows[:cfg.eval_windows] if cfg.eval_windows else windows
        for i in range(0, w.shape[0], batch):
            chunk = w[i:i + batch].long().to(cfg.device)
            x, y = chunk[:, :-1], chunk[:, 1:]
            with autocast(cfg.device):
                logp = copy_logprobs(model, copies, x, y)                       # (M, b, T)
                base_nll = model.token_nll(x, y, None)
            per = {"base": base_nll, "uniform": mixture_nll(logp, torch.full((1, 1, M), 1.0 / M, device=x.device)),
                   "oracle": -logp[m]}
            for k in range(M):
                per[f"spec{k}"] = -logp[k]
            for r, rt in routers.items():
                cell = cfg.cell(r)
                gates = rt(routing_features(model, x, cell.features, cell.pooling), cfg.router_steps)
                per[r] = mixture_nll(logp, normalise_gates(gates, r))
            for n, v in per.items():
                sums[n][m] += float(v.double().sum())
            counts[m] += y.numel()
    out = {n: sums[n] / counts for n in names}
    res = {"base": out["base"], "spec": np.stack([out[f"spec{k}"] for k in range(M)]), "uniform": out["uniform"],
           "oracle": out["oracle"]}
    res.update({r: out[r] for r in routers})
    return res


def run_fusion_full(cfg: FusionConfig, sub: Substrate, cache_dir: str | Path | None = None,
                    copies: dict[str, Tensor] | None = None, routers: tuple[str, ...] = ("B3", "R")) -> dict:
    """`run_fusion` with full fine-tuned copies as the specialists (``cfg.specialists == "full"``)."""
    t0 = time.perf_counter()
    require(sub.corpus.domains == cfg.domains, "domains", cfg.domains, f"the corpus's {sub.corpus.domains} domains")
    copies = copies if copies is not None else full_copies_for(sub, cfg, cache_dir)
    copies = {n: w.to(cfg.device) for n, w in copies.items()}
    walls = {"specialists": time.perf_counter() - t0}
    model = base_model(sub, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    trained = {}
    for r in routers:
        t = time.perf_counter()
        trained[r], _ = train_mixture_router(model, copies, sub, cfg, r)
        walls[r] = time.perf_counter() - t
    t = time.perf_counter()
    losses = held_out_full(model, copies, sub, cfg, trained)
    walls["eval"] = time.perf_counter() - t
    return _trial_result(losses, walls, routers, time.perf_counter() - t0)


__all__ = ["FusionConfig", "METHODS", "SPECIALISTS", "FULL_PRESETS", "mixture_nll", "copy_logits", "copy_logprobs",
           "train_full_copies", "run_fusion_full", "divergence", "gain", "best_specialist", "summarize", "run_fusion",
           "fused_model", "specialists_for", "train_router"]


def _trial_result(losses: dict, walls: dict, routers, total: float) -> dict:
    """A trial's result: its held-out losses, the summary rows (each router's training wall time
    and the trial's total on every row) and the wall times."""
    rows = summarize(losses)
    for row in rows:
        row["wall_s"] = walls.get(row["method"], 0.0) if row["method"] in routers else 0.0
        row["trial_wall_s"] = total
    return {"losses": {k: np.asarray(v).tolist() for k, v in losses.items()}, "rows": rows, "wall_s": walls}
