"""Random draws of the lifecycle: one generator for the whole (flattened) batch, or one per row, so a
row's numbers depend on its own generator only."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


Generators = torch.Generator | Sequence[torch.Generator]
"""One generator for the whole batch, or one per flattened batch element (row-major)."""


def _rows(generators: Sequence[torch.Generator], n: int) -> list[torch.Generator]:
    gens = list(generators)
    if len(gens) != n or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"expected one torch.Generator or {n} of them (one per batch row), got {len(gens)} items")
    return gens


def _draw(fn: Callable[..., Tensor], shape: tuple[int, ...], generators: Generators, dtype: torch.dtype,
          device) -> Tensor:
    """A random tensor of ``shape = (n, *row)`` from ``fn(shape, generator, dtype, device)`` (`randn`
    or `rand`). One generator: one draw of the whole shape. A sequence of n generators: row i is
    ``fn(row, generators[i])``, so its numbers depend on its own generator only."""
    if isinstance(generators, torch.Generator):
        return fn(shape, generators, dtype, device)
    n, row = shape[0], tuple(shape[1:])
    gens = _rows(generators, n)
    if n == 0:
        return torch.empty(tuple(shape), dtype=dtype, device=device)
    return torch.stack([fn(row, g, dtype, device) for g in gens])  # (n, *row)


def _multinomial(w: Tensor, size: int, generators: Generators) -> Tensor:
    """``size`` indices per row drawn with replacement from weights ``w (n, K)``: ``(n, size)`` long,
    on the generator's device (per row with a sequence of generators, as in `_draw`)."""
    if isinstance(generators, torch.Generator):
        return torch.multinomial(w.to(generators.device), size, replacement=True, generator=generators)
    gens = _rows(generators, w.shape[0])
    if not gens:
        return torch.empty((0, size), dtype=torch.long, device=w.device)
    rows = [torch.multinomial(w[i].to(g.device), size, replacement=True, generator=g).to(w.device)
            for i, g in enumerate(gens)]
    return torch.stack(rows)  # (n, size)


def _only(generators: Generators, rows: Tensor) -> Generators:
    """The generators with those of rows where ``rows (n,)`` is False swapped for throwaway ones, so a
    row's generator is advanced only by the draws it uses (a single generator is returned as is)."""
    if isinstance(generators, torch.Generator):
        return generators
    return [g if keep else torch.Generator(device=g.device) for g, keep in zip(generators, rows.tolist())]
