"""Grid points stacked on the batch dimension: the trainable `State` every arm starts from, the
`group_key` of points that can share a batch, `Rows` (per-row knobs as tensors) and the routing
features of every row."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sandbox import evolution as evo
from sandbox.analytic.config import DTYPE, AnalyticConfig, router_config
from sandbox.errors import require
from sandbox.router import RouterConfig, init_router_params
from sandbox.streams import Purpose, generator
from sandbox.tasks import Task, TaskSpec, initial_adapters, make_task, noisy_contexts


@dataclass
class State:
    """Trainable state for S seeds: router params ``(S, ...)`` and bank A ``(S, K, r, d)``, B ``(S, K, d, r)``."""

    params: dict[str, Tensor]
    A: Tensor
    B: Tensor

    def clone(self) -> "State":
        return State({k: v.clone() for k, v in self.params.items()}, self.A.clone(), self.B.clone())

    def to(self, device: torch.device | str) -> "State":
        return State({k: v.to(device) for k, v in self.params.items()}, self.A.to(device), self.B.to(device))


@dataclass
class Solver:
    """One `solve_rows` run as its steps and events read it (instead of a dozen positional arguments):
    the rows' task and settings on the solver's device, and the tensors it trains. ``tensors`` holds
    the router parameters (the keys of ``state.params``) and, when the adapters train, ``A`` and
    ``B``: the same tensor objects as ``state``'s, updated in place by every step and event."""

    task: Task                      # the rows' task on the device, U and V in float64 (`_task_to`)
    rcfg: RouterConfig
    cfg: AnalyticConfig             # the group's shared knobs (per-row ones are tensors in `Rows`)
    evolution: evo.EvolutionConfig  # ``cfg.evolution``, built once
    state: State                    # bank A (S, K, r, d), B (S, K, d, r) stored transposed, router params
    tensors: dict[str, Tensor]      # what Adam updates: router params (+ A, B when the adapters train)
    scale: float | Tensor           # (S,) bank scale lora_alpha / rank per row (or one float)

    @property
    def params(self) -> dict[str, Tensor]:
        """The router parameters as they stand, ``{name: (S, ...)}``."""
        return {k: self.tensors[k] for k in self.state.params}

    @property
    def bank(self) -> tuple[Tensor, Tensor]:
        """The adapters as they stand, ``A (S, K, r, d)``, ``B (S, K, d, r)`` (trained or frozen)."""
        return self.tensors.get("A", self.state.A), self.tensors.get("B", self.state.B)


def initial_state(task: Task, spec: TaskSpec, cfg: AnalyticConfig) -> State:
    """The shared starting point of both arms: pre-aligned bank and a fresh router, per seed."""
    scale = cfg.scale(spec)
    A, B = initial_adapters(task, spec, scale=scale)
    rcfg = router_config(spec, cfg)
    per_seed = [init_router_params(rcfg, (), generator(Purpose.ROUTER_INIT, s)) for s in task.seeds]
    params = {k: torch.stack([p[k] for p in per_seed]).to(DTYPE) for k in per_seed[0]}
    return State(params, A.to(DTYPE), B.to(DTYPE))


def group_key(spec: TaskSpec, cfg: AnalyticConfig) -> tuple[TaskSpec, AnalyticConfig]:
    """Points with equal keys share every tensor shape and schedule, so their rows can be stacked:
    the key is the point with its per-row knobs blanked, keeping whether routing noise is on (it
    sets the number of draws) and whether the adapters train (it sets the optimised tensors)."""
    s = dataclasses.replace(spec, alignment=0.0, overlap=0.0, context_noise=float(spec.context_noise > 0))
    c = dataclasses.replace(cfg, lr=1.0, plasticity=float(cfg.plasticity > 0), mutation_scale=1.0, loss_floor=0.0,
                            lora_alpha=1.0, beta2=0.999, control_beta2=0.9)
    return s, c


@dataclass
class Rows:
    """The rows (point, seed) of one or more grid points that share a `group_key`, stacked on the
    leading batch dim in point order; per-row knobs are tensors ``(S,)``."""

    task: Task
    parts: list                 # [(TaskSpec, AnalyticConfig)] per point, in row order
    sizes: list                 # rows per point
    scale: Tensor               # (S,) bank scale lora_alpha / rank
    loss_floor: Tensor          # (S,) loss floor
    lr: Tensor                  # (S,) router learning rate
    adapter_lr: Tensor          # (S,) adapter learning rate lr * plasticity
    step0: Tensor               # (S,) initial search step (mutation_scale)
    beta2: Tensor               # (S,) Adam beta2 of the arms
    control_beta2: Tensor       # (S,) Adam beta2 of the beta2 control arm

    @property
    def spec(self) -> TaskSpec:
        return self.parts[0][0]

    @property
    def cfg(self) -> AnalyticConfig:
        return self.parts[0][1]

    @property
    def noisy(self) -> bool:
        return self.spec.context_noise > 0

    def bounds(self, i: int) -> tuple[int, int]:
        lo = sum(self.sizes[:i])
        return lo, lo + self.sizes[i]

    def part_task(self, i: int) -> Task:
        lo, hi = self.bounds(i)
        t = self.task
        return Task(U=t.U[lo:hi], V=t.V[lo:hi], contexts=t.contexts[lo:hi], assignment=t.assignment[lo:hi],
                    seeds=t.seeds[lo:hi])


def stack_rows(points: Sequence[tuple[TaskSpec, AnalyticConfig, Sequence[int]]],
               tasks: Sequence[Task] | None = None) -> Rows:
    """Stack points ``(spec, cfg, seeds)`` of one `group_key` into `Rows` (tasks drawn unless given)."""
    keys = {group_key(spec, cfg) for spec, cfg, _ in points}
    require(len(keys) == 1, "points", len(keys), "points of one group_key (equal shapes and schedules)")
    tasks = list(tasks) if tasks is not None else [make_task(spec, seeds) for spec, _, seeds in points]
    cat = lambda name: torch.cat([getattr(t, name) for t in tasks])               # noqa: E731
    task = Task(U=cat("U"), V=cat("V"), contexts=cat("contexts"), assignment=cat("assignment"),
                seeds=tuple(s for t in tasks for s in t.seeds))
    per_row = lambda f: torch.cat([torch.full((len(t.seeds),), float(f(spec, cfg)), dtype=DTYPE)  # noqa: E731
                                   for (spec, cfg, _), t in zip(points, tasks)])
    return Rows(task=task, parts=[(spec, cfg) for spec, cfg, _ in points], sizes=[len(t.seeds) for t in tasks],
                scale=per_row(lambda sp, c: c.scale(sp)), loss_floor=per_row(lambda sp, c: c.loss_floor),
                lr=per_row(lambda sp, c: c.lr), adapter_lr=per_row(lambda sp, c: c.lr * c.plasticity),
                step0=per_row(lambda sp, c: c.mutation_scale), beta2=per_row(lambda sp, c: c.beta2),
                control_beta2=per_row(lambda sp, c: c.control_beta2))


def initial_rows_state(rows: Rows) -> State:
    """`initial_state` of every point, stacked: each point alone would start from the same."""
    states = [initial_state(rows.part_task(i), spec, cfg) for i, (spec, cfg) in enumerate(rows.parts)]
    return State({k: torch.cat([s.params[k] for s in states]) for k in states[0].params},
                 torch.cat([s.A for s in states]), torch.cat([s.B for s in states]))


def _features(rows: "Rows", salt: int, draws: int, device: torch.device | None = None) -> Tensor:
    """Routing features of every row ``(S, M, N, F)``: the contexts when the group is noise-free,
    else each point's own noise level on its own rows (each seed's own stream). Drawn on the CPU
    (the rows' task stays there), then moved to `device`."""
    if not rows.noisy:
        return rows.task.contexts[:, :, None, :].to(DTYPE).to(device)             # (S, M, 1, F)
    parts = [noisy_contexts(rows.part_task(i), spec.context_noise, draws, salt) for i, (spec, _) in
             enumerate(rows.parts)]
    return torch.cat(parts).to(DTYPE).to(device)                                   # (S, M, N, F)


def _task_to(task: Task, device: torch.device) -> Task:
    """The task's tensors on `device`, its factors U, V in the solver's float64 (an exact cast, done
    once instead of at every loss evaluation); the CPU original keeps drawing routing noise."""
    return dataclasses.replace(task, U=task.U.to(device, DTYPE), V=task.V.to(device, DTYPE),
                               contexts=task.contexts.to(device), assignment=task.assignment.to(device))
