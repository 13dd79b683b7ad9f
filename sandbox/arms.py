"""The arms of the regime map: one list for both systems (`sandbox.analytic`, `substrate.routing`).

``grad`` (the gradient solution) and ``evo`` (the same steps plus routing search) are the methods;
``restart`` (an optimiser restart alone, no search) and ``beta2`` (grad with a short Adam
second-moment memory: what the restart's reset explains) are the controls; ``oracle`` is the
ceiling; ``acar`` (sigma routing on grad's final router and adapters) runs only with ``--acar``.
Each system runs the arms of this list it supports, in this order (the order of results.csv):
the transformer has no ``beta2`` control.
"""

from __future__ import annotations

#: Every arm of the map in table order; acar last (added by ``--acar``).
ALL_ARMS = ("grad", "evo", "restart", "beta2", "oracle", "acar")
#: The arms a system never runs.
NOT_RUN = {"analytic": (), "substrate": ("beta2",)}


def arms_of(system: str, acar: bool) -> tuple[str, ...]:
    """The arms `system` (``analytic`` or ``substrate``) runs, in table order; ``acar`` only when `acar`."""
    return tuple(a for a in ALL_ARMS if a not in NOT_RUN[system] and (acar or a != "acar"))
