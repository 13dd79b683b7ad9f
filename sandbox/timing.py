"""Timing helpers and the benchmark configuration shared by the benchmark sections of every layer.

The machine this runs on is usually shared and noisy, so every comparison is timed *interleaved*:
the candidates of one comparison run in alternating rounds, each sample repeats a call until it
lasts at least `min_sample_s`, and a candidate's time is the median of its per-call sample times.
Noise that hits one round hits every candidate of that round, so the ratios are far steadier than
the absolute times. The sections themselves live where their layer is (`substrate.bench` for
the transformer, `sandbox.app.bench` for the sandbox and the runner that composes them).
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from sandbox.errors import check, require

SECTIONS = ("loss", "mixture", "adaptation", "fitness", "sweep", "grid", "heatmap")
#: Sections run by default; `heatmap` (a 21 x 21 x 16-seed map, minutes) runs on request.
DEFAULT_SECTIONS = ("loss", "mixture", "adaptation", "fitness", "sweep", "grid")


@dataclass(frozen=True)
class BenchConfig:
    """What `sandbox bench` measures. Errors name the field as a flag (``min_sample_s`` is
    ``--min-sample-s``); the command sets `repeats`, `presets`, `sections` (``--only``), `device`
    and `quick`, the rest are library knobs."""

    quick: bool = False
    """Small sizes and few repeats (a smoke run of every figure, ~30 s)."""
    repeats: int = 7
    """Timed rounds per comparison; each figure is the median over rounds."""
    min_sample_s: float = 0.05
    """Each timed sample repeats a call until it lasts at least this long (seconds)."""
    loss_dims: tuple[int, ...] = (64, 256, 1024)
    """Sandbox dimensions d for the Gram-vs-dense loss comparison."""
    loss_seeds: int = 4
    """Seeds S in one sandbox loss evaluation."""
    loss_draws: int = 8
    """Routing-feature draws per domain in one sandbox loss evaluation."""
    mixture_dims: tuple[int, ...] = (256, 1536)
    """Widths D (= d_in = d_out) for the gated-mixture comparison."""
    tokens: int = 4096
    """N: tokens per gated-mixture call."""
    slots: int = 16
    """K: adapter slots of the gated mixture."""
    rank: int = 8
    """r: adapter rank of the gated mixture."""
    presets: tuple[str, ...] = ("tiny", "small", "widened-1536")
    """Substrate presets whose adaptation step is timed."""
    sections: tuple[str, ...] = DEFAULT_SECTIONS
    """Which sections run."""
    seed: int = 0
    """Seed of every random input."""
    device: str = "cpu"
    """Device of the adaptation step, the fitness section and the analytic grid/heatmap: cpu
    (fraction of measured matmul) or cuda (MFU vs the bf16 peak)."""

    def __post_init__(self) -> None:
        require(isinstance(self.repeats, int) and 1 <= self.repeats <= 1000, "repeats", self.repeats, "an integer in [1, 1000]")
        check(isinstance(self.min_sample_s, (int, float)) and 0 <= self.min_sample_s <= 60, "min_sample_s",
                self.min_sample_s, "a number of seconds in [0, 60]")
        check(all(isinstance(d, int) and 2 <= d <= 4096 for d in self.loss_dims), "loss_dims", self.loss_dims,
                "integers in [2, 4096]")
        check(isinstance(self.loss_seeds, int) and 1 <= self.loss_seeds <= 1024, "loss_seeds", self.loss_seeds,
                "an integer in [1, 1024]")
        check(isinstance(self.loss_draws, int) and 1 <= self.loss_draws <= 4096, "loss_draws", self.loss_draws,
                "an integer in [1, 4096]")
        check(all(isinstance(d, int) and 1 <= d <= 16384 for d in self.mixture_dims), "mixture_dims",
                self.mixture_dims, "integers in [1, 16384]")
        for name in ("tokens", "slots", "rank"):
            v = getattr(self, name)
            require(isinstance(v, int) and 1 <= v <= 1 << 20, name, v, "an integer in [1, 1048576]")
        require(all(s in SECTIONS for s in self.sections) and len(self.sections) > 0, "only", ",".join(self.sections),
                "a comma list of " + ", ".join(SECTIONS))
        require(self.device in ("cpu", "cuda"), "device", self.device, "cpu or cuda")

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """Small sizes for a smoke run: every figure, in well under a minute on 2 cores."""
        base = dict(quick=True, repeats=3, min_sample_s=0.005, loss_dims=(32, 128), loss_seeds=2, loss_draws=4,
                    mixture_dims=(64, 256), tokens=512, presets=("tiny", "small", "widened-1536"))
        base.update(overrides)
        return cls(**base)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call seconds of one candidate: `median` over rounds, `best` round, `inner` calls per sample."""

    median: float
    best: float
    inner: int
    samples: list[float] = field(default_factory=list)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, min_sample_s: float, warmup: int = 1,
                budget_s: float | None = 60.0) -> dict[str, Timing]:
    """Time several candidates in alternating rounds and return each one's median per-call time.

    Each candidate is called once untimed (compiles/allocates; its duration calibrates the
    sample), then `warmup` more times unless that first call took over a second. A sample repeats
    the call ``inner = ceil(min_sample_s / t_first)`` times. Each round takes one sample of every
    candidate, starting at a rotating candidate so that none always runs first. With `budget_s`,
    slow comparisons run fewer rounds (never fewer than 3) so one comparison takes about that long.
    The garbage collector is off while a sample runs.
    """
    names = list(fns)
    inner, first = {}, {}
    for n in names:
        t = time.perf_counter()
        fns[n]()
        first[n] = max(time.perf_counter() - t, 1e-7)
        if first[n] < 1.0:
            for _ in range(max(warmup, 0)):
                fns[n]()
        inner[n] = max(1, math.ceil(min_sample_s / first[n]))
    if budget_s is not None:
        round_s = sum(first[n] * inner[n] for n in names)
        repeats = min(repeats, max(3, int(budget_s // round_s)))
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for j in range(len(names)):
            n = names[(r + j) % len(names)]
            f, k = fns[n], inner[n]
            gc_was = gc.isenabled()
            gc.disable()
            try:
                t = time.perf_counter()
                for _ in range(k):
                    f()
                samples[n].append((time.perf_counter() - t) / k)
            finally:
                if gc_was:
                    gc.enable()
    return {n: Timing(statistics.median(s), min(s), inner[n], s) for n, s in samples.items()}


def matmul_case(n: int, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> Callable[[], Tensor]:
    """A closure computing one dense ``(n, n) @ (n, n)`` product (``2 n^3`` FLOPs); on CUDA it
    synchronises, so a timed call covers the kernel."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    if torch.device(device).type == "cuda":
        return lambda: (torch.mm(a, b, out=out), torch.cuda.synchronize())[0]
    return lambda: torch.mm(a, b, out=out)


def machine_info() -> dict:
    """CPU model, core count, torch version and thread count, load average, date (UTC)."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "platform": platform.platform(), "load_avg_1_5_15": load,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


