"""Figures computed from stored result tables only (never from torch or live models).

Each module pairs ``collect(tables...) -> DataFrame`` with ``plot(df) -> matplotlib Figure``
(pyplot-free, Agg), in the house style of `figures.style`; every figure records what it encodes on
``fig.encoding``. `figures.report.build_report(run_dir)` rebuilds all of a run folder's figures.

- `figures.regime`: regime-boundary heatmap over two axes, regime curve along one.
- `figures.attribution`: forest plot of the factorial's named contrasts and the chain's sum.
- `figures.gates`: domains x slots mean gate before / after, with the monopoly index.
- `figures.lineage`: lifecycle timeline (deaths, births with parents, inheritance).
- `figures.curves`: learning curves with entropy floors; balanced log-PPL per cell.
"""
