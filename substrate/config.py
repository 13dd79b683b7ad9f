"""A cell's configuration: `CellConfig` (the run's settings, its router and lifecycle under flat
names), the per-preset substrate settings, the identity a checkpoint must match, and the check of how
often a run reads its training data.

The cell itself, the loop and its tables are `substrate.cell`; the live state, checkpoints and the
gradient step are `substrate.adapt`; leave-one-out fitness and evaluation are `substrate.fitness`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

from sandbox.factors import Cell, parse_cell
from sandbox.errors import require
from sandbox.identity import MAPS, RUNS, flat, identity, later, never, resolved, rules, same_as
from sandbox.lifecycle import LifecycleConfig
from sandbox.router import RouterConfig, kind_of
from substrate.defaults import MAX_EPOCHS, ROUTER_LR_RATIO
from substrate.corpus import Corpus
from substrate.model import POOLINGS, PRESETS, preset

DEVICES = ("cpu", "cuda")
ROUTER_KINDS = ("auto", "acar")

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

#: The views in which a cell enters under its flat names (`NESTED`): its run, a factorial's template and
#: the map's ledger point; the map's folder holds it nested, as the map first wrote it.
_FLAT_VIEWS = RUNS + ("map-point",)


@dataclass(frozen=True)
class CellConfig:
    """One cell run: the run's own settings, the router (`RouterConfig`) and the lifecycle
    (`LifecycleConfig`). Field names are CLI flags of ``sandbox full`` (``n_die`` is ``--n-die``); the
    nested knobs are flags under their flat names (`NESTED`: ``router.init`` is ``--router-init``).
    Build one from flat names with `CellConfig.of`."""

    cell: str = field(default="B3", metadata=rules(never("a factorial's cells share one study", views="template")))
    """Factors switched on: B3, R, E, L, R+E, R+L, E+L, R+E+L; order and case free."""
    preset: str = "small"
    """Model preset: tiny, small or widened-1536."""
    steps: int = 200
    """Adaptation steps (Adam steps on adapters and router)."""
    seed: int = field(default=42, metadata=rules(never("a factorial's seeds share one study; a map point holds "
                                                       "every seed", views=("template", "map-point"))))
    """Seed of the starting bank, the slot assignment, the data order and the lifecycle draws."""
    bases: int = field(default=1, metadata=rules(
        resolved("base_seed", "a run is the same whatever the number of bases its seed was spread over: "
                 "it enters as the base it adapts", name="base_seed", views="run"),
        later("base 0: the one base of earlier runs", value=0, views="run"),
        later("one base: the factorials and maps written before --bases", value=1, views=("template",) + MAPS)))
    """N: pretrained bases the seeds are spread over; seed s adapts base s mod N, pretrained (with its
    specialists) from seed s mod N, so replicates resample the base (1: every seed adapts base 0)."""
    alignment: float = 0.5
    """a in [0, 1]: starting adapters between random (0) and the per-domain specialists (1)."""
    batch: int = 8
    """Training windows per step."""
    lr: float = 3e-3
    """Peak Adam learning rate of the adapters (warm-up then cosine decay to 10%)."""
    router_lr: float | None = field(default=None, metadata=rules(same_as(
        "lr", "a router learning rate equal to lr is the single learning rate of earlier runs", views=RUNS)))
    """Peak Adam learning rate of the router, in its own parameter group on the adapters' warm-up and
    decay; None is `substrate.defaults.ROUTER_LR_RATIO` x --lr, and --lr itself is the single learning
    rate of earlier runs."""
    eval_every: int = 50
    """Steps between held-out evaluations (also at step 0 and at the end)."""
    checkpoint_every: int = 50
    """Steps between checkpoints (0 = only when a run stops early)."""
    router: RouterConfig = field(default=CELL_ROUTER, metadata=rules(flat(
        {k: f for k, (g, f) in NESTED.items() if g == "router"}, "the router's flags", views=_FLAT_VIEWS)))
    """The router's knobs (`CELL_ROUTER`)."""
    lifecycle: LifecycleConfig = field(default=CELL_LIFECYCLE, metadata=rules(flat(
        {k: f for k, (g, f) in NESTED.items() if g == "lifecycle"}, "the lifecycle's flags", views=_FLAT_VIEWS)))
    """The lifecycle's knobs (`CELL_LIFECYCLE`); fitness is measured every ``lifecycle.interval`` steps
    in every cell."""
    fit_windows: int = 4
    """Selection-batch windows per domain for leave-one-out fitness."""
    router_kind: str = field(default="auto", metadata=rules(later("added after the first folders: auto, the cell's own "
                                                                  "router, as those runs had", views=RUNS)))
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
    train_data: str | None = field(default=None, metadata=rules(
        resolved("train_data_value", "a run's data as it reads it", views=RUNS),
        later("added after the first folders: the fixed windows every earlier run read", value="windows", views=RUNS),
        later("read by a cell run only, never the map's arms", value=None, views=MAPS)))
    """Training windows of adaptation and selection: windows (the corpus's fixed training windows,
    read again once the run outlasts them) or fresh (new windows from the synthetic domains' generator
    at every draw, never read twice; not with --data); None: fresh when the run would read each fixed
    window more than once (`CellConfig.expected_epochs`), else windows (always windows with --data)."""
    device: str = field(default="cpu", metadata=rules(never("where a run computes, not what", views=RUNS + ("map-point",))))
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
        """What must match for a checkpoint to be resumed: every flat setting after its field's rules
        (`sandbox.identity`; the nested ones' on `RouterConfig` and `LifecycleConfig`): not the device;
        the base as ``base_seed`` (``seed mod bases``, left out for base 0), not ``bases``;
        ``train_data`` resolved; the options added since the first folders left out at the value
        those runs had; ``router_lr`` left out when it equals ``lr``."""
        return identity(self)


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
