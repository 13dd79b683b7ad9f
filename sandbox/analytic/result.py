"""What an arm returns (`ArmResult`), its split per grid point and its results.csv rows."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

from sandbox import acar as acr
from sandbox.analytic.config import DTYPE, LOG_CLAMP
from sandbox.analytic.rows import Rows


@dataclass
class ArmResult:
    """Outcome of one arm for S seeds (tensors over the seed dim)."""

    arm: str
    final_loss: Tensor          # (S,) balanced expected loss on the evaluation draws (nan if diverged)
    domain_loss: Tensor         # (S, M)
    initial_loss: Tensor        # (S,) same measure at the shared starting point
    loss_evals: int             # loss evaluations per seed
    grad_steps: int
    diverged: Tensor            # (S,) bool
    diverged_step: Tensor       # (S,) long, -1 if not diverged
    curve: Tensor               # (S, grad_steps) training objective per step
    generations: int = 0        # events on the arm's schedule (searches, restarts, oracle replacements)
    accepted: Tensor | None = None   # (S,) long: generations in which the search replaced the router
    step_size: Tensor | None = None  # (S,) the search's final step size (es / cma), logit units
    events: list = field(default_factory=list)
    modes: Tensor | None = None      # (S, 3) long: inputs gated with 1, 2, 3 slots (acar arm)
    excess: Tensor | None = None          # (S,) final loss minus the loss floor (computed without it)
    initial_excess: Tensor | None = None  # (S,) the same at the shared start
    half_excess: Tensor | None = None     # (S,) the same at half the step budget (convergence probe)
    oracle_excess: Tensor | None = None   # (S,) best constant gates for this arm's own final adapters
    search_gain: Tensor | None = None     # (S,) summed objective gains of the search's generations
    wall_s: float = float("nan")          # solver seconds of the rows this result covers
    ceiling: ArmResult | None = None      # grad only: the oracle arm in ceiling mode, read off this run
    acar: ArmResult | None = None         # grad only: the acar arm, read off this run (`solve_rows`)

    def accepted_share(self) -> Tensor:
        """(S,) share of generations whose gain reached ``accept_tol`` (0 for non-search arms)."""
        S = self.final_loss.shape[0]
        if self.accepted is None or self.generations == 0:
            return torch.zeros(S, dtype=DTYPE)
        return self.accepted.to(DTYPE) / self.generations

    def lifecycle_events(self, seeds: Sequence[int]) -> list[int]:
        """Lifecycle events per seed, in the order of `seeds` (one grid point's result)."""
        return [sum(1 for ev in self.events if ev["seed"] == s) for s in seeds]


def split_result(res: ArmResult, rows: Rows) -> list[ArmResult]:
    """One `ArmResult` per point of `rows` (row slices; events re-indexed to the point's rows; the
    ``ceiling`` and ``acar`` arms read off a grad run are split with it)."""
    out = []
    companions = {k: split_result(getattr(res, k), rows) for k in ("ceiling", "acar") if getattr(res, k) is not None}
    per_seed = ("final_loss", "domain_loss", "initial_loss", "diverged", "diverged_step", "curve", "accepted",
                "step_size", "modes", "excess", "initial_excess", "half_excess", "oracle_excess", "search_gain")
    for i in range(len(rows.parts)):
        lo, hi = rows.bounds(i)
        evs = [{k: v for k, v in e.items() if k != "row"} for e in res.events if lo <= e["row"] < hi]
        sliced = {k: (None if getattr(res, k) is None else getattr(res, k)[lo:hi]) for k in per_seed}
        out.append(dataclasses.replace(res, events=evs, wall_s=res.wall_s * (hi - lo) / max(len(rows.task.seeds), 1),
                                       **sliced, **{k: parts[i] for k, parts in companions.items()}))
    return out


def result_rows(results: dict[str, ArmResult], seeds: Sequence[int], extra: dict | None = None,
                settings: dict[str, dict] | None = None) -> list[dict]:
    """Tidy rows (one per seed x arm) with the results.csv columns of ARCHITECTURE.md.

    ``rel_excess`` = final excess / initial excess (the share of the start's reducible loss an arm
    leaves; the paired contrasts of summary.csv are differences of it, so no constant moves them),
    ``rel_half`` the same at half the budget, ``rel_oracle`` for the best routing of the arm's own
    final adapters, ``rel_gain`` the search's summed gain in the same units. ``settings`` (per arm)
    adds the optimiser setting an arm ran at (``lr``, ``adapter_lr``, ``beta2``)."""
    rows = []
    for arm, r in results.items():
        gens = max(r.generations, 1)
        life = r.lifecycle_events(seeds)
        for i, seed in enumerate(seeds):
            loss = float(r.final_loss[i])
            ex0 = float(r.initial_excess[i]) if r.initial_excess is not None else float("nan")
            rel = lambda x: float(x[i]) / ex0 if x is not None and ex0 > 0 else float("nan")   # noqa: E731
            rows.append({
                **(extra or {}), "seed": int(seed), "arm": arm,
                "final_loss": loss,
                "log_loss": math.log(max(loss, LOG_CLAMP)) if math.isfinite(loss) else float("nan"),
                "rel_excess": rel(r.excess), "rel_half": rel(r.half_excess), "rel_oracle": rel(r.oracle_excess),
                "initial_excess": ex0,
                "loss_evals": r.loss_evals, "grad_steps": r.grad_steps,
                "diverged": bool(r.diverged[i]), "diverged_step": int(r.diverged_step[i]),
                "generations": r.generations,
                "accepted": float(r.accepted[i]) / gens if r.accepted is not None else 0.0,
                "rel_gain": rel(r.search_gain) if r.search_gain is not None else float("nan"),
                "step_size": float(r.step_size[i]) if r.step_size is not None else float("nan"),
                "lifecycle_events": life[i],
                "wall_s": r.wall_s / len(seeds),
                **((settings or {}).get(arm, {})),
                **(acr.usage(dict(zip(acr.MODES, r.modes[i].tolist()))) if r.modes is not None else {}),
            })
    return rows
