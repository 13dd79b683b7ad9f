"""One factorial cell on the transformer substrate: config, adaptation loop, checkpoints, metrics.

A cell is a set of factors (`sandbox.factors`): R, E, L. Every cell runs the same loop on the same
frozen, pretrained base with the same starting bank for a seed (common random numbers, so cells
pair by seed); the letters only switch what the loop does:

- **R (router)**: off = ``softmax`` router on causal prefix means of the token embeddings
  (``routing_features(kind="embed")``); on = ``sigmoid`` router (learnable floor, bounded
  temperature anneal) on causal prefix means of the base's post-stack hidden states
  (``kind="hidden"``). Gates ``(B, T, K)`` are shared by every adapted projection.
- **E (scope)**: adapter fitness ``fit_k = agg_m (L_m^{-k} - L_m)`` with ``agg`` = equal-weight mean
  over domains (off, ``global``) or ``per_domain_agg`` (default max) over domains (on,
  ``per-domain``). Fitness is measured and logged every ``interval`` steps in EVERY cell
  (``fitness.csv``); without L it changes nothing else, so E alone (or R+E) trains exactly like R
  and differs only in what is logged. That is the study's design: scope only matters through
  the lifecycle's choice of who dies.
- **L (lifecycle)**: every ``interval`` steps `sandbox.lifecycle.lifecycle_step` kills the least
  fit slots (age >= ``min_age``), blends them into their nearest neighbour (alpha
  ``inherit_alpha``), clones and SVD-mutates a fit parent into the freed slot and reallocates its
  router column toward the worst domain; Adam's moments of the replaced slots are zeroed.

Leave-one-out losses (the input of fitness) are measured on a *selection batch*: ``fit_windows``
fresh training windows per domain drawn for that step (never the held-out evaluation windows,
so selection never sees the test data). ``L_m^{-k}`` is the mean token NLL on domain m with slot
k's gate zeroed (`sandbox.lifecycle.loo_gates`), ``L_m`` with every slot.

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
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from sandbox import gatestats
from sandbox.adapters import AdapterBank
from sandbox.factors import Cell, parse_cell
from sandbox.errors import BadInput, require
from sandbox.lifecycle import (LifecycleConfig, Population, event_rows, fitness, lifecycle_step, loo_gates,
                               reset_adam_state, reset_mask)
from sandbox.results import RunDir, atomic_save_torch, claim_run_dir, load_torch, read_json, to_jsonable
from sandbox.router import Router, RouterConfig, gate_rows, kind_of, router_gates
from sandbox.streams import Purpose, generator
from substrate import acar
from substrate.defaults import MAX_EPOCHS, ROUTER_LR_RATIO
from substrate.corpus import Corpus, CorpusConfig, fresh_batch, load_text_domains, sample_batch, synthetic_corpus
from substrate.model import GPT, POOLINGS, PRESETS, autocast, freeze_base, load_banks, preset, routing_features
from substrate.train import (TrainConfig, clip_gradients, evaluate, initial_banks, lr_at, pretrain, pretraining,
                            train_specialists)

DEVICES = ("cpu", "cuda")
ROUTER_KINDS = ("auto", "acar")
# Purposes of the per-step generators (`sandbox.streams`).
_BATCH, _FIT, _LIFE = Purpose.CELL_BATCH, Purpose.CELL_FITNESS, Purpose.CELL_LIFECYCLE
_INIT, _PERTURB = Purpose.CELL_INIT, Purpose.CELL_PERTURB

#: Per-preset substrate settings (corpus size, context, pretraining and specialist budgets).
#: ``context`` is the window length T used for pretraining and adaptation (<= the preset's seq_len).
SUBSTRATE: dict[str, dict] = {
    "tiny": dict(context=32, clusters=16, train_windows=128, heldout_windows=16, pretrain_steps=60,
                 pretrain_batch=16, specialist_steps=30),
    "small": dict(context=64, clusters=64, train_windows=4096, heldout_windows=32, pretrain_steps=1200,
                  pretrain_batch=16, specialist_steps=80),
    "widened-1536": dict(context=512, clusters=256, train_windows=4096, heldout_windows=128, pretrain_steps=3000,
                         pretrain_batch=32, specialist_steps=500),
}


#: The router a cell starts from. Its knobs are the sigmoid rewrite's (a B3 cell runs the softmax and
#: ignores them); ``kind``, ``n_slots`` and ``n_features`` are set from the cell and the preset, and
#: ``anneal_steps=None`` anneals over all the run's steps (`CellConfig.router_config`).
#: ``tau_scales="input"``: the anneal divides only the input-dependent part of the sigmoid's logit, so
#: the fair start's operating point survives it (with ``logit``, the earlier behaviour, the anneal from
#: 2 to 0.5 took the start's logit from -3.4 to -13.6 and shut every gate onto its floor).
CELL_ROUTER = RouterConfig(init="mass", init_mass=1.0, anneal_steps=None, tau_scales="input")

#: The lifecycle a cell runs (factor L); ``scope`` is set from factor E. ``interval`` and
#: ``min_age`` suit the default 200 steps (the CLI scales them to the step count, `schedule`).
CELL_LIFECYCLE = LifecycleConfig(interval=50, min_age=50)

#: The nested knobs a cell exposes under flat names (CLI flags, `CellConfig.flat`, `identity`, the
#: ledgers' payloads): flat name -> (group, field). Every other nested field keeps its default.
NESTED: dict[str, tuple[str, str]] = {
    **{n: ("router", n) for n in ("floor_max", "tau_start", "tau_end", "tau_min", "tau_max", "anneal_steps",
                                  "tau_scales")},
    "router_init": ("router", "init"),
    **{n: ("lifecycle", n) for n in ("interval", "n_die", "min_age", "inherit_alpha", "inherit_mode", "mutation_sigma",
                                     "per_domain_agg", "selection", "crossover", "crossover_t")},
    "mutation": ("lifecycle", "mutation_kind"), "death": ("lifecycle", "death_kind"),
    "reallocation": ("lifecycle", "reallocation_kind"),
    **{n: ("lifecycle", n) for n in ("finetune_steps", "finetune_lr")},
}


@dataclass(frozen=True)
class CellConfig:
    """One cell run: the run's own settings, the router (`RouterConfig`) and the lifecycle
    (`LifecycleConfig`). Field names are CLI flags of ``sandbox full`` (``n_die`` is ``--n-die``); the
    nested knobs are flags under their flat names (`NESTED`: ``router.init`` is ``--router-init``).
    Build one from flat names with `CellConfig.of`."""

    cell: str = "B3"
    """Factors switched on: B3, R, E, L, R+E, R+L, E+L, R+E+L; order and case free."""
    preset: str = "small"
    """Model preset: tiny, small or widened-1536."""
    steps: int = 200
    """Adaptation steps (Adam steps on adapters and router)."""
    seed: int = 42
    """Seed of the starting bank, the slot assignment, the data order and the lifecycle draws."""
    bases: int = 1
    """N: pretrained bases the seeds are spread over; seed s adapts base s mod N, pretrained (with its
    specialists) from seed s mod N, so replicates resample the base (1: every seed adapts base 0)."""
    alignment: float = 0.5
    """a in [0, 1]: starting adapters between random (0) and the per-domain specialists (1)."""
    batch: int = 8
    """Training windows per step."""
    lr: float = 3e-3
    """Peak Adam learning rate of the adapters (warm-up then cosine decay to 10%)."""
    router_lr: float | None = None
    """Peak Adam learning rate of the router, in its own parameter group on the adapters' warm-up and
    decay; None is `substrate.defaults.ROUTER_LR_RATIO` x --lr, and --lr itself is the single learning
    rate of earlier runs."""
    eval_every: int = 50
    """Steps between held-out evaluations (also at step 0 and at the end)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (0 = only when a run stops early)."""
    router: RouterConfig = CELL_ROUTER
    """The router's knobs (`CELL_ROUTER`)."""
    lifecycle: LifecycleConfig = CELL_LIFECYCLE
    """The lifecycle's knobs (`CELL_LIFECYCLE`); fitness is measured every ``lifecycle.interval`` steps
    in every cell."""
    fit_windows: int = 4
    """Selection-batch windows per domain for leave-one-out fitness."""
    router_kind: str = "auto"
    """Router kind: auto (the cell's: softmax for B3, sigmoid with R), acar (sigma routing,
    `substrate.acar`: top-3 slots by held-in loss, gated 1/2/3 equally by the probes' agreement;
    nothing of the router is trained), or a router plugin (an entry point name in molora.routers,
    or module:Name; docs/plugins.md) that replaces the sigmoid router in the cells with R."""
    pooling: str = "causal"
    """Routing-feature pooling: causal prefix means, or sequence (leaks future tokens)."""
    perturb_base: float = 0.0
    """Probe: Gaussian noise of this relative scale (times each weight's RMS) on the frozen base."""
    slots: int = 16
    """K: adapter slots."""
    rank: int = 8
    """r: adapter rank."""
    domains: int = 4
    """M: synthetic domains (ignored with --data)."""
    context: int | None = None
    """T: window length (default per preset: tiny 32, small 64, widened-1536 512)."""
    pretrain_steps: int | None = None
    """Base pretraining steps (default per preset; cached by config)."""
    specialist_steps: int | None = None
    """Per-domain specialist steps (default per preset; cached)."""
    eval_windows: int | None = None
    """Held-out windows per domain per evaluation (default all)."""
    data: str | None = None
    """A real text folder (one subfolder of .txt files per domain) instead of synthetic domains."""
    train_data: str | None = None
    """Training windows of adaptation and selection: windows (the corpus's fixed training windows,
    read again once the run outlasts them) or fresh (new windows from the synthetic domains' generator
    at every draw, never read twice; not with --data); None: fresh when the run would read each fixed
    window more than once (`CellConfig.expected_epochs`), else windows (always windows with --data)."""
    device: str = "cpu"
    """cpu or cuda (fp32 on CPU, bf16 autocast on CUDA)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "cell", parse_cell(self.cell).name)
        require(self.preset in PRESETS, "preset", self.preset, "one of " + ", ".join(PRESETS))
        for name, lo in (("steps", 1), ("seed", 0), ("bases", 1), ("batch", 1), ("eval_every", 1), ("checkpoint_every", 0),
                         ("fit_windows", 1), ("slots", 2), ("rank", 1), ("domains", 1)):
            _int(getattr(self, name), name, lo)
        for name in ("pretrain_steps", "specialist_steps", "eval_windows", "context"):
            if getattr(self, name) is not None:
                _int(getattr(self, name), name, 1)
        require(_num(self.alignment) and 0 <= self.alignment <= 1, "alignment", self.alignment, "a number in [0, 1]")
        require(_num(self.lr) and 0 < self.lr <= 1, "lr", self.lr, "a number in (0, 1]")
        require(self.router_lr is None or (_num(self.router_lr) and 0 < self.router_lr <= 1), "router_lr",
                self.router_lr, "a number in (0, 1]")
        require(_num(self.perturb_base) and 0 <= self.perturb_base <= 10, "perturb_base", self.perturb_base,
                "a number in [0, 10]")
        require(self.pooling in POOLINGS, "pooling", self.pooling, "one of " + ", ".join(POOLINGS))
        require(self.device in DEVICES, "device", self.device, "cpu or cuda")
        require(self.train_data in TRAIN_DATA, "train_data", self.train_data, "windows or fresh")
        require(self.train_data != "fresh" or self.data is None, "train_data", self.train_data,
                "windows with --data (fresh windows need the synthetic domains' generator)")
        require(self.bases <= 1000, "bases", self.bases, "an integer in [1, 1000] (each base is one pretraining run)")
        require(self.domains <= self.slots, "domains", self.domains, f"at most --slots ({self.slots})")
        ctx = self.context or SUBSTRATE[self.preset]["context"]
        require(ctx <= PRESETS[self.preset].seq_len, "context", ctx, f"at most the preset's {PRESETS[self.preset].seq_len}")
        require(isinstance(self.router, RouterConfig), "router", self.router, "a RouterConfig")
        require(isinstance(self.lifecycle, LifecycleConfig), "lifecycle", self.lifecycle, "a LifecycleConfig")
        ra = self.router.anneal_steps
        require(ra is None or (isinstance(ra, int) and not isinstance(ra, bool) and ra >= 0), "anneal_steps", ra,
                "an integer >= 0")
        # The parts the cell decides (so a stored config is whole and never contradicts itself).
        # A router plugin (`sandbox.plugins`) replaces the rewrite's sigmoid in the cells with R; B3's
        # softmax baseline stays, so the factorial's router contrast is "your router vs B3".
        plugin = self.router_kind not in ROUTER_KINDS and self.router_kind not in ("softmax", "sigmoid")
        if plugin:
            kind_of(replace(self.router, kind=self.router_kind))   # resolved and probed, or one line naming --router
        object.__setattr__(self, "router", replace(
            self.router, kind=(self.router_kind if plugin else "sigmoid") if self.factors.router else "softmax",
            n_slots=self.slots,
            n_features=PRESETS[self.preset].d_model, init_mass=1.0))
        object.__setattr__(self, "lifecycle", replace(
            self.lifecycle, scope="per-domain" if self.factors.per_domain else "global"))
        require(self.router_kind in ROUTER_KINDS or plugin, "router_kind", self.router_kind, "one of " + ", ".join(ROUTER_KINDS))
        require(self.router_kind != "acar" or self.slots >= 3, "slots", self.slots, "at least 3 with --router-kind acar")

    @classmethod
    def of(cls, **flat) -> "CellConfig":
        """A config from flat names (the CLI's flags, `flat`'s keys): ``CellConfig.of(cell="R+L",
        interval=20, router_init="zero")``. Nested knobs not given keep their defaults."""
        groups: dict[str, dict] = {"router": {}, "lifecycle": {}}
        top = {}
        for k, v in flat.items():
            if k in NESTED:
                g, f = NESTED[k]
                groups[g][f] = v
            else:
                top[k] = v
        router = replace(top.pop("router", CELL_ROUTER), **groups["router"])
        lifecycle = replace(top.pop("lifecycle", CELL_LIFECYCLE), **groups["lifecycle"])
        return cls(router=router, lifecycle=lifecycle, **top)

    def flat(self) -> dict:
        """Every setting under its flat name (the nested knobs of `NESTED` beside the run's own)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("router", "lifecycle")}
        for k, (g, f) in NESTED.items():
            d[k] = getattr(getattr(self, g), f)
        return d

    @property
    def factors(self) -> Cell:
        return parse_cell(self.cell)

    def model_config(self):
        return preset(self.preset, slots=self.slots, rank=self.rank)

    @property
    def router_lr_value(self) -> float:
        """The router's peak learning rate: ``router_lr``, else `ROUTER_LR_RATIO` x ``lr``."""
        return float(self.router_lr) if self.router_lr is not None else ROUTER_LR_RATIO * self.lr

    def router_config(self, n_features: int) -> RouterConfig:
        """The cell's router over ``n_features``-wide features, its anneal resolved to the run's steps."""
        a = self.router.anneal_steps
        return replace(self.router, n_features=n_features, anneal_steps=self.steps if a is None else a)

    def lifecycle_config(self) -> LifecycleConfig:
        return self.lifecycle

    @property
    def features(self) -> str:
        """Routing-feature kind: token-embedding means (B3 router) or post-stack hidden states (R)."""
        return "hidden" if self.factors.router else "embed"

    def substrate(self) -> dict:
        """Resolved per-preset substrate settings (`SUBSTRATE` with this config's overrides)."""
        s = dict(SUBSTRATE[self.preset])
        for k in ("context", "pretrain_steps", "specialist_steps"):
            if getattr(self, k) is not None:
                s[k] = getattr(self, k)
        return s

    @property
    def base_seed(self) -> int:
        """The base this run adapts: ``seed mod bases`` (its pretraining and specialists' seed)."""
        return self.seed % self.bases

    def expected_reads(self, domains: int | None = None) -> float:
        """Training windows one domain gives this run, in expectation: the adaptation batches
        (``steps x batch / domains``) and the selection batches (``fit_windows`` per fitness event).
        `domains`: the corpus's number (default ``domains``; a real text folder has its own)."""
        return (self.steps * self.batch / (domains or self.domains)
                + (self.steps // self.lifecycle.interval) * self.fit_windows)

    def expected_epochs(self, windows: int | None = None) -> float:
        """How often the run reads each fixed training window in expectation: `expected_reads` over the
        windows per domain (default: the preset's, `SUBSTRATE`)."""
        return self.expected_reads() / (windows or SUBSTRATE[self.preset]["train_windows"])

    @property
    def train_data_value(self) -> str:
        """``train_data`` resolved: fresh when the fixed windows would be read more than once in
        expectation (synthetic domains only), else windows."""
        if self.train_data is not None:
            return self.train_data
        return "fresh" if self.data is None and self.expected_epochs() > 1 else "windows"

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed (every flat setting except the device).

        Options added after folders and ledgers were first written are left out at the value those
        runs had (`LATER_DEFAULTS`), so old folders still resume. The base enters as ``base_seed``
        (``seed mod bases``, left out for base 0), not as ``bases``: the run is the same whatever the
        number of bases its seed was spread over; ``train_data`` enters resolved."""
        d = self.flat()
        d.pop("device")
        d.pop("bases")
        d["train_data"] = self.train_data_value
        if self.base_seed:
            d["base_seed"] = self.base_seed
        for k, v in LATER_DEFAULTS.items():
            if d[k] == v:
                d.pop(k)
        if d["router_lr"] is not None and d["router_lr"] == d["lr"]:   # one learning rate, as earlier runs
            d.pop("router_lr")
        return d


#: Options added after the first folders and ledgers were written, at the value those runs had:
#: left out of `CellConfig.identity` at that value. ``router_kind`` auto (the cell's own router),
#: ``router_init`` zero (the zero-bias start of every earlier run), the EvoMerge operators off and
#: ``tau_scales`` logit (the anneal on the whole logit) and ``train_data`` windows (the fixed training
#: windows). ``router_lr`` is left out when it equals ``lr``.
LATER_DEFAULTS = dict(router_kind="auto", router_init="zero", selection="tournament", crossover="none",
                      crossover_t=None, mutation="svd", finetune_steps=1, finetune_lr=0.01, tau_scales="logit",
                      train_data="windows", death="least-fit", reallocation="worst-domain")

#: The values of `CellConfig.train_data` (None resolves, `CellConfig.train_data_value`).
TRAIN_DATA = (None, "windows", "fresh")


def _num(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x, name: str, lo: int) -> None:
    require(isinstance(x, int) and not isinstance(x, bool) and x >= lo, name, x, f"an integer >= {lo}")


def data_check(cfg: CellConfig, corpus: Corpus, reads: list | None = None) -> dict:
    """How often the run reads its training data: ``{train_data, train_windows (fixed windows per domain,
    fewest), windows_read, epochs, max_epochs, revisited, counted}``. ``epochs`` is the most any domain
    reads each of its fixed windows (windows read over windows held; fresh windows: 1, each read once),
    from `reads` (per domain, counted by `train_batch`) or, before the run, their expectation
    (`CellConfig.expected_reads`; ``counted`` False). ``revisited``: more than
    `substrate.defaults.MAX_EPOCHS`, where held-out loss starts to measure memorised windows (the
    manifest's warning)."""
    held = [int(w.shape[0]) for w in corpus.train]
    per = list(reads) if reads is not None else [cfg.expected_reads(corpus.domains)] * corpus.domains
    fresh = cfg.train_data_value == "fresh"
    epochs = (1.0 if sum(per) else 0.0) if fresh else max(r / n for r, n in zip(per, held))
    total = sum(per)
    return {"train_data": cfg.train_data_value, "train_windows": min(held),
            "windows_read": int(total) if reads is not None else float(total), "epochs": float(epochs),
            "max_epochs": MAX_EPOCHS, "revisited": bool(epochs > MAX_EPOCHS), "counted": reads is not None}


def revisit_warning(check: dict) -> str | None:
    """The printed warning of a `data_check` that found the data revisited, else None."""
    if not check["revisited"]:
        return None
    return (f"WARNING: the run reads each of its {check['train_windows']} training windows per domain "
            f"{check['epochs']:.1f} times (more than {check['max_epochs']:g}): held-out loss measures memorised "
            f"windows; use --train-data fresh (synthetic domains) or fewer --steps")


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


def build_state(cfg: CellConfig, sub: Substrate) -> RunState:
    """The starting state of a cell: frozen (optionally perturbed) base, the seed's starting bank
    by alignment, a fresh router of the cell's kind, Adam, founder population."""
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
    rlr = cfg.router_lr_value
    if rlr == cfg.lr:   # one group, exactly the optimiser of the runs before --router-lr
        opt = torch.optim.Adam(params + list(router.parameters()), lr=cfg.lr)
    else:               # the router's own group; "scale" = its lr over the adapters' (`train_step`)
        opt = torch.optim.Adam([{"params": params, "scale": 1.0},
                                {"params": list(router.parameters()), "lr": rlr, "scale": rlr / cfg.lr}], lr=cfg.lr)
    st = RunState(model, router, opt, Population.founders((), cfg.slots), assignment)   # population on CPU
    st.reads = [0] * sub.corpus.domains
    if cfg.router_kind == "acar":
        st.acar_score = acar_held_in_score(cfg, st, sub.corpus)
    return st


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
                domains: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Training windows for the run (`substrate.corpus.sample_batch` from the fixed windows, or
    `substrate.corpus.fresh_batch` with ``train_data`` fresh), counted per domain in ``st.reads``."""
    draw = fresh_batch if cfg.train_data_value == "fresh" else (lambda c, *a, **k: sample_batch(c, "train", *a, **k))
    x, y, dom = draw(corpus, batch, gen, domains=domains)
    for m, n in enumerate(torch.bincount(dom, minlength=corpus.domains).tolist()):
        st.reads[m] += n
    return x, y, dom


def train_step(cfg: CellConfig, st: RunState, corpus: Corpus, tcfg: TrainConfig) -> float:
    """One gradient step ``st.step`` on the batch of ``(seed, step)``; returns the loss."""
    x, y, _ = train_batch(cfg, st, corpus, cfg.batch, step_generator(cfg.seed, st.step, _BATCH))
    x, y = x.to(cfg.device), y.to(cfg.device)
    for group in st.opt.param_groups:
        group["lr"] = lr_at(st.step, tcfg) * group.get("scale", 1.0)
    with autocast(cfg.device):
        _, loss = st.model(x, gates_for(cfg, st, x, st.step), y)
    st.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in st.opt.param_groups for p in g["params"]]
    clip_gradients(params, tcfg)
    st.opt.step()
    return float(loss.detach())


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


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellResult:
    """What a finished (or stopped) run reports; ``metrics`` is metrics.json (None if stopped early)."""

    out: Path
    done: bool
    step: int
    metrics: dict | None


def run_cell(cfg: CellConfig, out: str | Path, cache_dir: str | Path = "runs/cache", *, substrate: Substrate | None = None,
             stop_after: int | None = None, draw_figures: Callable[[Path], object] | None = None,
             argv: list[str] | None = None,
             progress: Callable[[int, int, dict], None] | None = None,
             log: Callable[[str], None] | None = None,
             stage: Callable[[str, int, int], None] | None = None) -> CellResult:
    """Run (or resume, or just report) one cell into the run folder `out`.

    Writes ``manifest.json``, ``checkpoint.pt`` (every ``checkpoint_every`` steps, atomic),
    ``curves.csv``, ``gates.csv``, ``fitness.csv``, ``lifecycle.csv``, ``train_loss.csv``,
    ``metrics.json`` and, with `draw_figures` (e.g. `figures.report.build_report`, passed in by
    the caller: this layer never imports the figures), the figures it draws from the folder.
    A folder with a finished run of the same config returns its metrics without training; one with
    a checkpoint resumes from it. `stop_after` caps the steps of THIS invocation (it checkpoints
    and returns ``done=False``), which is how a run is interrupted on purpose.
    `progress(step, steps, info)` is called after every step; `stage` goes to `prepare_substrate`.
    """
    out = Path(out)
    claim_run_dir(out, "full")   # one run per folder, never another command's folder
    ck_path = out / "checkpoint.pt"
    if (out / "metrics.json").exists():
        m = read_json(out / "metrics.json", "--out", "metrics.json",
                      "delete it and rerun to resume from the checkpoint, or delete the folder to start over")
        if m.get("config", {}) != to_jsonable(cfg.identity()):
            raise BadInput("--out", str(out), "an empty folder or one holding a run of the same config (this one "
                           "holds a finished run with a different config)")
        run = RunDir(out)
        if not run.manifest_path.exists():
            run = RunDir.create(out, "full", cfg, seeds=[cfg.seed], argv=argv)
        if run.read_manifest().get("ended") is None or ck_path.exists():
            _complete(run, m, draw_figures)   # killed between metrics.json and the end: finish the folder now
        else:
            run.release()
        return CellResult(out, True, m["steps"], m)
    ck = None
    if ck_path.exists():
        ck = load_torch(ck_path, "--out", "checkpoint", "delete it and rerun to restart this seed from step 0",
                        map_location="cpu", weights_only=False)
    if ck is not None and ck["config"] != cfg.identity():
        raise BadInput("--out", str(out), "an empty folder or one holding a run of the same config (its "
                       "checkpoint has a different config)")
    sub = substrate or prepare_substrate(cfg, cache_dir, log, stage)
    corpus = sub.corpus
    data = data_check(cfg, corpus)
    run = RunDir.create(out, "full", cfg, seeds=[cfg.seed], argv=argv,
                        extra={"substrate": cfg.substrate(), "corpus": corpus.config, "base_seed": cfg.base_seed,
                               "data": data})
    if revisit_warning(data) and log is not None:
        log(revisit_warning(data))
    st = build_state(cfg, sub)
    if ck is not None:
        restore(st, ck)
        if "reads" not in ck["tables"]:   # a checkpoint written before reads were counted: their expectation
            st.reads = [round(replace(cfg, steps=st.step).expected_reads())] * corpus.domains
    else:
        st.curves.extend(evaluate_state(cfg, st, corpus).rows(step=0, seed=cfg.seed, cell=cfg.cell))
        gate_record(cfg, st, corpus, "before")
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, batch=cfg.batch, warmup=max(1, cfg.steps // 20), min_lr_ratio=0.1)
    lcfg = cfg.lifecycle_config()
    t0, ran = time.perf_counter(), 0
    while st.step < cfg.steps and st.diverged_step is None:
        loss = train_step(cfg, st, corpus, tcfg)
        if not math.isfinite(loss):
            st.diverged_step = st.step
            break
        st.step += 1
        ran += 1
        if st.step % 10 == 0 or st.step == cfg.steps:
            st.train_loss.append({"step": st.step, "loss": loss, "lr": lr_at(st.step - 1, tcfg)})
        if lcfg.due(st.step):
            fitness_event(cfg, st, corpus)
        if st.step % cfg.eval_every == 0 or st.step == cfg.steps:
            st.curves.extend(evaluate_state(cfg, st, corpus).rows(step=st.step, seed=cfg.seed, cell=cfg.cell))
        if progress is not None:
            progress(st.step, cfg.steps, {"loss": loss})
        stopping = stop_after is not None and ran >= stop_after and st.step < cfg.steps
        if stopping or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < cfg.steps):
            st.wall_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            atomic_save_torch(ck_path, checkpoint(cfg, st))
        if stopping:
            _write_tables(run, st)
            run.release()
            return CellResult(out, False, st.step, None)
    st.wall_s += time.perf_counter() - t0
    metrics = finish(cfg, st, sub, run)
    _complete(run, metrics, draw_figures)
    return CellResult(out, True, st.step, metrics)


def _complete(run: RunDir, metrics: dict, draw_figures: Callable[[Path], object] | None) -> None:
    """Everything after ``metrics.json``: the figures, the checkpoint removed, then the manifest's
    end time (the last write, so a folder is finished exactly when ``ended`` is set and no
    checkpoint is left). Idempotent: a rerun of a folder killed in between calls it again."""
    if draw_figures is not None:
        draw_figures(run.path)
    ck_path = run.path / "checkpoint.pt"
    if ck_path.exists():
        ck_path.unlink()
    run.finish(metrics=metrics)


def _write_tables(run: RunDir, st: RunState) -> None:
    import pandas as pd

    for name in ("curves", "gates", "fitness", "train_loss"):
        run.write_csv(f"{name}.csv", pd.DataFrame(getattr(st, name)))
    cols = ["step", "event", "slot", "slot_id", "parent_id", "neighbour_id", "fitness", "mutation_size", "inherit_alpha",
            "domain", "seed"]
    # Events restored from a checkpoint written before the column was named inherit_alpha carry "alpha".
    events = [{("inherit_alpha" if k == "alpha" else k): v for k, v in e.items()} for e in st.events]
    cols += [c for c in ("parent2_id", "crossover_t", "finetune_loss_before", "finetune_loss_after")
             if any(c in e for e in events)]   # EvoMerge options, only when used
    run.write_csv("lifecycle.csv", pd.DataFrame(events, columns=cols))


def finish(cfg: CellConfig, st: RunState, sub: Substrate, run: RunDir) -> dict:
    """Final gates and metrics; writes every table and metrics.json."""
    corpus = sub.corpus
    diverged = st.diverged_step is not None
    if not diverged:
        gate_record(cfg, st, corpus, "after")
        final = evaluate_state(cfg, st, corpus)
        nll = final.nll.tolist()
        if not all(math.isfinite(v) for v in nll):
            st.diverged_step, diverged = st.step, True
    if diverged:
        nll = [math.nan] * corpus.domains
    _write_tables(run, st)
    floors = corpus.floors.tolist()
    balanced = sum(nll) / len(nll)
    tokens = st.step * cfg.batch * corpus.seq_len
    first = [r for r in st.curves if r["step"] == 0 and r["domain"] == "balanced"]
    initial = first[0]["log_ppl"] if first else math.nan
    base = sum(sub.base_nll) / len(sub.base_nll)   # the plain frozen base, no adapters
    data = data_check(cfg, corpus, st.reads)
    metrics = {
        "config": to_jsonable(cfg.identity()), "cell": cfg.cell, "seed": cfg.seed, "preset": cfg.preset,
        "balanced_log_ppl": balanced,
        "log_ppl": dict(zip(corpus.names, nll)),
        "floor": dict(zip(corpus.names, floors)),
        "gap_to_floor": {n: v - f for n, v, f in zip(corpus.names, nll, floors)},
        "balanced_gap_to_floor": balanced - sum(floors) / len(floors),
        "initial_balanced_log_ppl": initial,
        "base_balanced_log_ppl": base,
        "initial_gap_to_base": initial - base,
        "steps": st.step, "tokens": tokens, "wall_s": st.wall_s,
        "tokens_per_s": tokens / st.wall_s if st.wall_s > 0 else math.nan,
        "diverged": diverged, "diverged_step": st.diverged_step,
        "lifecycle_events": sum(e["event"] == "death" for e in st.events),
        "router": "acar" if cfg.router_kind == "acar" else st.router.cfg.kind, "features": cfg.features, "scope": cfg.lifecycle_config().scope,
        "assignment": st.assignment.tolist(), "device": cfg.device,
        "router_lr": cfg.router_lr_value,
        "base_seed": cfg.base_seed,
        "data": data, "train_epochs": data["epochs"],
        "gates": {p: st.gate_stats[p] for p in ("before", "after") if p in st.gate_stats},
    }
    if cfg.router_kind == "acar" and not diverged:
        metrics["router_kind"] = "acar"
        metrics["acar"] = acar_usage(cfg, st, corpus, run)
    atomic_save_torch(run.path / FINAL, final_state(cfg, st))   # before metrics.json: a finished folder has it
    run.write_json("metrics.json", metrics)
    return metrics


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
