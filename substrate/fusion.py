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
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sandbox.errors import require
from sandbox.router import Router
from sandbox.streams import Purpose, generator
from substrate.cell import DEVICES, CellConfig, Substrate
from substrate.corpus import sample_batch
from substrate.model import GPT, PRESETS, autocast, load_banks, routing_features
from substrate.train import TrainConfig, evaluate, lr_at, train_specialists

ROUTERS = {"B3": "B3", "R": "R"}
METHODS = ("best_specialist", "base", "uniform", "oracle", "B3", "R")


@dataclass(frozen=True)
class FusionConfig:
    """One fusion trial. Field names are CLI flags of ``sandbox fusion`` (``router_steps`` is ``--router-steps``)."""

    preset: str = "tiny"
    """Model preset of the shared base: tiny, small or widened-1536."""
    specialist_steps: int = 30
    """Steps of each specialist (the point's divergence knob)."""
    specialist_lr: float = 1e-2
    """Peak learning rate of the specialists."""
    router_steps: int = 100
    """Router-only training steps of each fused model."""
    router_lr: float = 1e-2
    """Peak Adam learning rate of the router."""
    batch: int = 8
    """Training windows per router step."""
    seed: int = 0
    """Seed of the specialists, the router's start and its batch order."""
    domains: int = 4
    """M: synthetic domains (= slots of the fused bank)."""
    eval_windows: int | None = None
    """Held-out windows per domain (default all)."""
    device: str = "cpu"
    """cpu or cuda."""

    def __post_init__(self) -> None:
        require(self.preset in PRESETS, "preset", self.preset, "one of " + ", ".join(PRESETS))
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
        """The cell whose substrate (corpus, base) and router settings the fusion reuses."""
        return CellConfig(cell=router, preset=self.preset, steps=self.router_steps, seed=self.seed, slots=self.domains,
                          domains=self.domains, batch=self.batch, lr=self.router_lr, eval_windows=self.eval_windows,
                          device=self.device)

    def identity(self) -> dict:
        """Everything that determines a trial's numbers except the seed and the device."""
        d = asdict(self)
        d.pop("seed")
        d.pop("device")
        return d


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
    model = GPT(mcfg, torch.Generator().manual_seed(0))
    missing, unexpected = model.load_state_dict(sub.base_state, strict=False)
    assert not unexpected and all(".bank." in k for k in missing)
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


def train_router(model: GPT, sub: Substrate, cfg: FusionConfig, router: str) -> tuple[Router, list[float]]:
    """Router-only training on the fused bank for ``router_steps`` steps; returns the router and the losses."""
    cell = cfg.cell(router)
    g = generator(Purpose.CELL_INIT, cfg.seed, 0)
    rt = Router(cell.router_config(model.cfg.d_model), generator=g).to(cfg.device)
    opt = torch.optim.Adam(rt.parameters(), lr=cfg.router_lr)
    tcfg = TrainConfig(steps=cfg.router_steps, lr=cfg.router_lr, warmup=max(1, cfg.router_steps // 10))
    losses = []
    for step in range(cfg.router_steps):
        x, y, _ = sample_batch(sub.corpus, "train", cfg.batch, generator(Purpose.CELL_BATCH, cfg.seed, step))
        x, y = x.to(cfg.device), y.to(cfg.device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        feats = routing_features(model, x, cell.features, cell.pooling)
        with autocast(cfg.device):
            _, loss = model(x, rt(feats, step), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(rt.parameters()), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return rt, losses


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
    rows = summarize(losses)
    total = time.perf_counter() - t0
    for row in rows:
        row["wall_s"] = walls.get(row["method"], 0.0) if row["method"] in routers else 0.0
        row["trial_wall_s"] = total
    return {"losses": {k: np.asarray(v).tolist() for k, v in losses.items()}, "rows": rows, "wall_s": walls}


__all__ = ["FusionConfig", "METHODS", "divergence", "gain", "best_specialist", "summarize", "run_fusion",
           "fused_model", "specialists_for", "train_router"]
