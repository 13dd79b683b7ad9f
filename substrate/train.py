"""Training the substrate as plain functions: from-scratch pretraining (cached), per-domain
specialists (cached), the initial banks of a cell by alignment, evaluation and throughput.

- `pretrain`: AdamW (beta2 0.95, decoupled weight decay on matrices only), linear warm-up then
  cosine decay to ``min_lr_ratio * lr``, global-norm clipping, batches drawn as a balanced domain
  mixture. Cached on disk by a hash of (base shape, corpus key, training config), so a second call
  with the same arguments loads the weights instead of training (atomic save).
- `train_specialists`: one rank-r adapter per domain on the frozen base. All M specialists train at
  once as an M-slot bank with one-hot gates (example of domain m -> slot m): slot m only receives
  gradient from domain m's examples and Adam acts elementwise, so this equals M separate runs on
  ``batch / M`` examples each (up to Adam's epsilon), at a fraction of the cost.
- `initial_banks`: the cell's starting bank by alignment a, following `sandbox.tasks`:
  ``A_k = sqrt(1 - a^2) A_rand,k + a A_spec,m`` (same for B) for the slot k = assignment[m] of
  domain m, with the specialists refactored to balanced SVD form and the random adapters
  Gaussian, rescaled so each random slot's update ``(alpha/r) B A`` has the bank's mean specialist
  update norm. So a = 1 gives exactly the specialists and a = 0 independent random adapters of the
  same size; the other K - M slots are random; random draws do not depend on a.
- `evaluate`: per-domain mean token NLL (nats) and token counts on a split, with optional gates.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as Fn
from torch import Tensor

from sandbox.adapters import init_factors, product_norm, refactor
from sandbox.errors import check, require
from sandbox.identity import identity, key
from sandbox.results import atomic_save_torch, load_torch
from sandbox.streams import Purpose, generator
from substrate.corpus import Corpus, sample_batch
from substrate.model import GPT, ModelConfig, autocast, build_model, freeze_base


@dataclass(frozen=True)
class TrainConfig:
    """One optimisation run. Field names are CLI flags (``min_lr_ratio`` is ``--min-lr-ratio``)."""

    steps: int = 300
    """Optimiser steps."""
    lr: float = 3e-3
    """Peak learning rate."""
    batch: int = 32
    """Windows per step (each of seq_len tokens)."""
    warmup: int = 30
    """Linear warm-up steps (then cosine decay to min_lr_ratio * lr at the last step)."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on 2-D weights (not on norms)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    seed: int = 0
    """Seed of the initial weights and of the batch order."""

    def __post_init__(self) -> None:
        for name, lo in (("steps", 1), ("batch", 1), ("warmup", 0), ("seed", 0)):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and v >= lo, name, v, f"an integer >= {lo}")
        require(_pos(self.lr) and self.lr <= 10, "lr", self.lr, "a number in (0, 10]")
        check(_num(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
        check(_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", self.weight_decay, "a number >= 0")
        check(_num(self.grad_clip) and self.grad_clip >= 0, "grad_clip", self.grad_clip, "a number >= 0")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pos(x) -> bool:
    return _num(x) and x > 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate at `step` (0-based): linear warm-up over ``warmup`` steps, then cosine to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - 1 - cfg.warmup, 1)
    p = min(max((step - cfg.warmup) / span, 0.0), 1.0)
    lr_min = cfg.min_lr_ratio * cfg.lr
    return lr_min + (cfg.lr - lr_min) * 0.5 * (1 + math.cos(math.pi * p))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def _adamw(params_decay: list, params_plain: list, cfg: TrainConfig, device: str | torch.device):
    groups = [{"params": params_decay, "weight_decay": cfg.weight_decay},
              {"params": params_plain, "weight_decay": 0.0}]
    fused = torch.device(device).type == "cuda"
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(0.9, 0.95), fused=fused)


def pretrain_key(model_cfg: ModelConfig, corpus: Corpus, train_cfg: TrainConfig) -> str:
    """Cache key of a pretrained base: base shape (not K, r, alpha, targets), corpus, training config."""
    return key({"model": identity(model_cfg, "base"), "corpus": corpus.key, "train": train_cfg}, 16)


#: The one warm-up rule, ``warmup = max(1, steps // share)``, and its two shares. Training from
#: scratch or from the frozen base (pretraining, the specialists, fusion's full copies and its
#: router) warms up over a tenth of the run; adapting a cell (`substrate.adapt.adaptation`: a cell
#: run, the map's arms, the benchmark's step) over a twentieth, as every cell run since the first
#: did. One share for both would change every cell number and every cached specialist's key
#: (`TrainConfig` enters the cache key), so the two values stay; the rule is written once.
WARMUP_SHARE = {"train": 10, "adapt": 20}


def warmup_steps(steps: int, phase: str = "train") -> int:
    """Linear warm-up steps of a run of ``steps`` steps in ``phase`` (`WARMUP_SHARE`)."""
    return max(1, steps // WARMUP_SHARE[phase])


def lr_schedule(steps: int, phase: str = "train", **settings) -> TrainConfig:
    """A run of ``steps`` steps: `TrainConfig`'s settings with the warm-up of `warmup_steps`."""
    return TrainConfig(steps=steps, **{"warmup": warmup_steps(steps, phase), **settings})


def pretraining(steps: int, **settings) -> TrainConfig:
    """The pretraining run of ``steps`` steps (`lr_schedule`: warm-up a tenth of the steps)."""
    return lr_schedule(steps, "train", **settings)


def clip_gradients(params, cfg: TrainConfig) -> None:
    """Clip the global gradient norm of ``params`` to ``cfg.grad_clip`` (0: no clipping)."""
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)


def pretrain(model_cfg: ModelConfig, corpus: Corpus, tcfg: TrainConfig | None = None,
             device: str | torch.device = "cpu", cache_dir: str | Path | None = None, *, log: list | None = None,
             log_every: int = 10, progress: Callable[[dict], None] | None = None) -> GPT:
    """Pretrain a base from scratch on the balanced domain mixture of ``corpus.train`` under ``tcfg``
    (default `pretraining` of `TrainConfig`'s steps).

    Returns the model in eval mode on `device`. With `cache_dir`, the base weights and the loss log
    are stored as ``cache_dir/base-<key>.pt`` (see `pretrain_key`) and reloaded on a later call.
    `log` (a list) receives rows ``{step, loss, lr, tokens, elapsed_s}`` every `log_every` steps and
    at the last step (from the cache on a hit); `progress` is called with each row.
    """
    check(corpus.vocab == model_cfg.vocab, "vocab", model_cfg.vocab, f"the corpus vocabulary {corpus.vocab}")
    check(corpus.seq_len <= model_cfg.seq_len, "seq_len", corpus.seq_len, f"at most the model context {model_cfg.seq_len}")
    tcfg = pretraining(TrainConfig.steps) if tcfg is None else tcfg
    model = build_model(model_cfg, tcfg.seed, device)
    path = Path(cache_dir) / f"base-{pretrain_key(model_cfg, corpus, tcfg)}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        state = load_torch(path, "--cache", "cached base checkpoint", "delete it and rerun to pretrain the base again",
                           map_location=device, weights_only=True)
        _load_base(model, state["weights"])
        if log is not None:
            log.extend(state["log"])
        return model.eval()
    rows = _fit_base(model, corpus, tcfg, device, log_every, progress)
    if log is not None:
        log.extend(rows)
    if path is not None:
        atomic_save_torch(path, {"weights": {k: v.cpu() for k, v in model.base_state_dict().items()}, "log": rows,
                                 "model": model_cfg.base_fields, "corpus": corpus.key, "train": asdict(tcfg)})
    return model.eval()


def _load_base(model: GPT, weights: dict[str, Tensor]) -> None:
    missing, unexpected = model.load_state_dict(weights, strict=False)
    check(not unexpected and all(GPT.is_adapter(k) for k in missing), "cache_dir", sorted(unexpected)[:3] or sorted(missing)[:3],
            "a cached base whose weights match the model")


def _fit_base(model: GPT, corpus: Corpus, cfg: TrainConfig, device, log_every: int, progress) -> list[dict]:
    model.train()
    decay = [p for n, p in model.named_parameters() if not GPT.is_adapter(n) and p.dim() >= 2]
    plain = [p for n, p in model.named_parameters() if not GPT.is_adapter(n) and p.dim() < 2]
    opt = _adamw(decay, plain, cfg, device)
    g = generator(Purpose.PRETRAIN_BATCH, cfg.seed)
    rows, t0 = [], time.perf_counter()
    for step in range(cfg.steps):
        _set_lr(opt, lr_at(step, cfg))
        x, y, _ = sample_batch(corpus, "train", cfg.batch, g)
        x, y = x.to(device), y.to(device)
        with autocast(device):
            _, loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(decay + plain, cfg)
        opt.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            row = {"step": step, "loss": loss.item(), "lr": lr_at(step, cfg), "tokens": (step + 1) * x.numel(),
                   "elapsed_s": time.perf_counter() - t0}
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def weights_fingerprint(model: GPT) -> str:
    """SHA-256 (16 hex) of the base weights: the identity of a base in downstream cache keys."""
    h = hashlib.sha256()
    for k, v in sorted(model.base_state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_specialists(base: GPT, corpus: Corpus, steps: int = 200, lr: float = 1e-2, batch: int | None = None,
                      device: str | torch.device = "cpu", cache_dir: str | Path | None = None, seed: int = 0, *,
                      log: list | None = None, log_every: int = 10,
                      progress: Callable[[dict], None] | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """One adapter (rank ``base.cfg.rank``) per domain, trained on the frozen base.

    Returns ``{bank name: (A (M, r, d_in), B (M, d_out, r))}`` on CPU: row m is domain m's
    specialist. Trained jointly as an M-slot bank with one-hot gates and equal examples per domain
    (``batch`` rounded up to a multiple of M, default 8 per domain), AdamW without weight decay,
    warm-up + cosine. Cached as ``cache_dir/specialists-<key>.pt`` keyed by the base weights'
    fingerprint, the corpus and these settings. `progress` is called with each logged row (not on a
    cache hit).
    """
    M = corpus.domains
    per = max(1, math.ceil((batch or 8 * M) / M))
    tcfg = lr_schedule(steps, "train", lr=lr, batch=per * M, weight_decay=0.0, grad_clip=0.0, seed=seed)
    name = key({"base": weights_fingerprint(base), "cfg": base.cfg, "corpus": corpus.key, "train": tcfg}, 16)
    path = Path(cache_dir) / f"specialists-{name}.pt" if cache_dir is not None else None
    if path is not None and path.exists():
        state = load_torch(path, "--cache", "cached specialists checkpoint", "delete it and rerun to train them again",
                           map_location="cpu", weights_only=True)
        if log is not None:
            log.extend(state["log"])
        return {k: (v["A"], v["B"]) for k, v in state["factors"].items()}
    model = GPT(replace(base.cfg, slots=M), generator(Purpose.SPECIALIST_INIT, seed)).to(device)
    _load_base(model, base.base_state_dict())
    params = freeze_base(model)
    opt = _adamw([], params, tcfg, device)
    g = generator(Purpose.SPECIALIST_BATCH, seed)
    domains = torch.arange(M).repeat_interleave(per)                            # (B,) balanced
    gates = Fn.one_hot(domains, M).float()[:, None, :].to(device)               # (B, 1, M)
    rows, t0 = [], time.perf_counter()
    model.train()
    for step in range(steps):
        _set_lr(opt, lr_at(step, tcfg))
        x, y, _ = sample_batch(corpus, "train", tcfg.batch, g, domains=domains)
        with autocast(device):
            _, loss = model(x.to(device), gates, y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == steps - 1:
            rows.append({"step": step, "loss": loss.item(), "lr": lr_at(step, tcfg), "elapsed_s": time.perf_counter() - t0})
            if progress is not None:
                progress(rows[-1])
    factors = {n: (b.A.detach().cpu().clone(), b.B.detach().cpu().clone()) for n, b in model.banks().items()}
    if log is not None:
        log.extend(rows)
    if path is not None:
        atomic_save_torch(path, {"factors": {n: {"A": A, "B": B} for n, (A, B) in factors.items()}, "log": rows})
    return factors


def initial_banks(specialists: dict[str, tuple[Tensor, Tensor]], alignment: float, slots: int,
                  generator: torch.Generator, assignment: Tensor | None = None, scale: float = 1.0
                  ) -> tuple[dict[str, tuple[Tensor, Tensor]], Tensor]:
    """The starting bank of a cell: ``{name: (A (K, r, d_in), B (K, d_out, r))}`` and the assignment ``(M,)``.

    See the module docstring for the interpolation. `assignment` (M distinct slots) is drawn from
    `generator` (``randperm(K)[:M]``) when not given, before the random factors; `scale` is the
    banks' ``alpha / r`` (it only sets the random adapters' size in the units of the update).
    """
    require(_num(alignment) and 0 <= alignment <= 1, "alignment", alignment, "a number in [0, 1]")
    M = next(iter(specialists.values()))[0].shape[0]
    require(isinstance(slots, int) and slots >= M, "slots", slots, f"an integer >= the number of domains ({M})")
    if assignment is None:
        assignment = torch.randperm(slots, generator=generator)[:M]
    check(assignment.shape == (M,) and len(set(assignment.tolist())) == M and int(assignment.max()) < slots,
            "assignment", assignment.tolist(), f"{M} distinct slots in [0, {slots})")
    keep = math.sqrt(1.0 - alignment * alignment)
    out = {}
    for name, (SA, SB) in specialists.items():
        r = SA.shape[-2]
        A_s, B_s = refactor(SB.double(), SA.double(), r)                     # balanced (M, r, d_in), (M, d_out, r)
        norm = float((product_norm(A_s, B_s) * scale).mean())
        A, B = init_factors((), slots, r, SA.shape[-1], SB.shape[-2], "random", generator, scale=scale,
                            init_norm=max(norm, 1e-12), dtype=torch.float64)  # (K, r, d_in), (K, d_out, r)
        A[assignment] = keep * A[assignment] + alignment * A_s
        B[assignment] = keep * B[assignment] + alignment * B_s
        out[name] = (A.to(SA.dtype), B.to(SB.dtype))
    return out, assignment


@dataclass(frozen=True)
class EvalResult:
    """Per-domain evaluation: ``nll`` mean token NLL (nats) ``(M,)``, ``nll_sum``, ``tokens`` ``(M,)``, ``floors``."""

    names: tuple[str, ...]
    nll: Tensor
    nll_sum: Tensor
    tokens: Tensor
    floors: Tensor

    @property
    def balanced(self) -> float:
        """Balanced log-PPL: the mean over domains of per-domain mean token NLL (equal weight per domain)."""
        return float(self.nll.mean())

    def rows(self, **extra) -> list[dict]:
        """Tidy rows ``domain, nll, log_ppl, floor, tokens`` plus a ``balanced`` row (for curves.csv)."""
        out = [{"domain": n, "nll": float(v), "log_ppl": float(v), "floor": float(f), "tokens": int(t), **extra}
               for n, v, f, t in zip(self.names, self.nll, self.floors, self.tokens)]
        out.append({"domain": "balanced", "nll": self.balanced, "log_ppl": self.balanced,
                    "floor": float(self.floors.mean()), "tokens": int(self.tokens.sum()), **extra})
        return out


@torch.no_grad()
def evaluate(model: GPT, corpus: Corpus, split: str = "heldout",
             gates_fn: Callable[[Tensor, int], Tensor | None] | None = None, batch: int = 64,
             max_windows: int | None = None, device: str | torch.device | None = None) -> EvalResult:
    """Per-domain mean token NLL of `model` on every window of a split (or the first `max_windows`).

    ``gates_fn(idx (B, T), domain) -> gates (B, T, K) | (B, 1, K) | None`` supplies the gates (a real
    router ignores `domain`; it is there for oracle routing); None runs the plain base.
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = [], []
    for m, windows in enumerate(corpus.split(split)):
        w = windows[:max_windows] if max_windows else windows
        total, n = torch.zeros((), dtype=torch.float64), 0
        for i in range(0, w.shape[0], batch):
            chunk = w[i:i + batch].long().to(device)                              # (b, T+1)
            x, y = chunk[:, :-1], chunk[:, 1:]
            gates = gates_fn(x, m) if gates_fn is not None else None
            with autocast(device):
                nll = model.token_nll(x, y, gates)                                # (b, T)
            total += nll.double().sum().cpu()
            n += y.numel()
        sums.append(total)
        counts.append(n)
    model.train(was_training)
    s, t = torch.stack(sums), torch.tensor(counts, dtype=torch.float64)
    return EvalResult(corpus.names, s / t, s, t.long(), corpus.floors.clone())
