"""Every arm over many grid points: `run_points` stacks points of one `group_key` in chunks and
reads the ceiling and acar arms off the grad run; `run_arms` for one point."""

from __future__ import annotations

import time
from typing import Sequence

import torch

from sandbox.analytic.config import AnalyticConfig
from sandbox.analytic.result import ArmResult, split_result
from sandbox.analytic.rows import group_key, initial_rows_state, stack_rows
from sandbox.analytic.solver import solve_rows
from sandbox.errors import require
from sandbox.tasks import TaskSpec


def run_arms(spec: TaskSpec, cfg: AnalyticConfig, seeds: Sequence[int],
             arms: Sequence[str] | None = None) -> dict[str, ArmResult]:
    """The arms (default ``cfg.arms``) for every seed from one task and one shared initial state
    (common random numbers)."""
    return run_points([(spec, cfg, seeds)], arms)[0]


#: Default bound on the rows (point x seed) solved in one batch: memory grows with rows x P x M x N x K.
CHUNK_ROWS = 512


def run_points(points: Sequence[tuple[TaskSpec, AnalyticConfig, Sequence[int]]], arms: Sequence[str] | None = None,
               chunk_rows: int = CHUNK_ROWS, on_chunk=None, device: torch.device | str | None = None,
               diagnostics: bool = True) -> list[dict[str, ArmResult]]:
    """Every arm for many grid points ``(spec, cfg, seeds)``: points of one `group_key` are stacked
    on the batch dim (in chunks of at most `chunk_rows` rows; a larger point runs alone), so the
    per-operation overhead is paid once per chunk instead of once per point. Each point's rows see
    exactly what they would alone (per-seed streams, per-row knobs), so a point's results do not
    depend on which points share its batch (tested against one point at a time).

    ``arms``: the arms of every point (default: each point's ``cfg.arms``, acar included when on).
    ``on_chunk(indices, results)`` is called after each chunk with the point indices it solved.
    ``device`` holds the solver's tensors (`solve_rows`; default CPU); ``diagnostics`` as there.
    Returns one ``{arm: ArmResult}`` per point, in input order.
    """
    require(isinstance(chunk_rows, int) and chunk_rows >= 1, "chunk_rows", chunk_rows, "an integer >= 1")
    groups: dict = {}
    for i, (spec, cfg, _) in enumerate(points):
        groups.setdefault(group_key(spec, cfg), []).append(i)
    out: list = [None] * len(points)
    for idx in groups.values():
        chunk, size = [], 0
        for i in idx + [None]:
            n = len(points[i][2]) if i is not None else 0
            if chunk and (i is None or size + n > chunk_rows):
                rows = stack_rows([points[j] for j in chunk])
                state = initial_rows_state(rows)
                per_arm = {}
                chunk_arms = rows.cfg.arms if arms is None else tuple(arms)   # acar is in the group key
                shared = "grad" in chunk_arms and "oracle" in chunk_arms and rows.cfg.oracle == "ceiling"
                shared_acar = "grad" in chunk_arms and "acar" in chunk_arms
                for arm in chunk_arms:
                    if (shared and arm == "oracle") or (shared_acar and arm == "acar"):
                        continue                  # taken from the grad arm's run below
                    t0 = time.perf_counter()
                    res = solve_rows(rows, arm, state, with_ceiling=shared and arm == "grad",
                                     with_acar=shared_acar and arm == "grad", device=device,
                                     diagnostics=diagnostics)
                    res.wall_s = time.perf_counter() - t0
                    for read_off in (res.ceiling, res.acar):
                        if read_off is not None:
                            read_off.wall_s = 0.0       # its cost is inside the grad arm's
                    per_arm[arm] = split_result(res, rows)
                    if shared and arm == "grad":
                        per_arm["oracle"] = [part.ceiling for part in per_arm[arm]]
                    if shared_acar and arm == "grad":
                        per_arm["acar"] = [part.acar for part in per_arm[arm]]
                for k, j in enumerate(chunk):
                    out[j] = {arm: per_arm[arm][k] for arm in chunk_arms}
                if on_chunk is not None:
                    on_chunk(list(chunk), [out[j] for j in chunk])
                chunk, size = [], 0
            if i is not None:
                chunk.append(i)
                size += n
    return out
