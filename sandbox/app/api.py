"""The notebook API: the commands as functions that take the CLI's configs and return tables.

Each function takes the same frozen config the command builds from its flags (`SweepConfig`,
`SubstrateSweepConfig`, `FactorialConfig`, `CellConfig`, `FusionSweepConfig`), runs the same
library code into the same run folder (by default the command's own ``runs/<command>-<hash>``,
so a notebook and the CLI resume each other's runs), and returns a `Run`: the folder plus every
table in it as a pandas DataFrame, read back from the CSVs the command wrote (so they equal the
CLI's tables exactly). Nothing is printed; figures are drawn only when asked.

    >>> from sandbox.app import api
    >>> from sweeps.grid import SweepConfig
    >>> run = api.sweep(SweepConfig(points=3, seeds=(0, 1)), figures=False)   # doctest: +SKIP
    >>> run.summary[["alignment", "mean_delta", "regime"]]                     # doctest: +SKIP

The module lives in the app layer (it imports `sweeps` and `substrate`), so it is
``sandbox.app.api``: the core `sandbox` package never imports the app (docs/api.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:  # the configs, for signatures only: importing them here would load torch eagerly
    from substrate.cell import CellConfig
    from sweeps.factorial import FactorialConfig
    from sweeps.fusion import FusionSweepConfig
    from sweeps.grid import SweepConfig
    from sweeps.substrate_map import SubstrateSweepConfig

__all__ = ["Run", "load", "sweep", "factorial", "full", "fusion", "report"]


@dataclass
class Run:
    """A run folder and its tables.

    Attributes:
        folder: the run folder (for `full`, the parent of the ``seed-N`` folders).
        tables: table name -> DataFrame: the folder's ``NAME.csv`` files by ``NAME`` (``results``,
            ``summary``, ``tuning``, ``cells``, ``attribution``, ``curves``, ...); for `full`,
            ``seed-N/NAME`` per seed; for `report`, also the summary tables it prints, by title.
        manifest: the folder's manifest.json (command, config, versions, seeds, times); {} if none.
    """

    folder: Path
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    manifest: dict = field(default_factory=dict)

    def __getattr__(self, name: str) -> pd.DataFrame:
        # run.summary == run.tables["summary"]; only table names reach here (fields resolve first).
        tables = self.__dict__.get("tables", {})
        if name in tables:
            return tables[name]
        raise AttributeError(f"{name!r}: no such table in {self.__dict__.get('folder')} (has: {', '.join(tables)})")

    def __getitem__(self, name: str) -> pd.DataFrame:
        return self.tables[name]

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k} {v.shape[0]}x{v.shape[1]}" for k, v in self.tables.items())
        return f"Run({str(self.folder)!r}: {shapes})"


def load(folder: str | Path) -> Run:
    """The tables of an existing run folder (any command's), as `Run`; nothing is computed.

    Top-level ``*.csv`` files load by their stem; a `full` parent folder (no table of its own)
    loads each ``seed-N`` folder's tables as ``seed-N/NAME``.
    """
    root = Path(folder)
    if not root.is_dir():
        from sandbox.errors import BadInput

        raise BadInput("folder", str(folder), "an existing run folder")
    tables = {f.stem: pd.read_csv(f) for f in sorted(root.glob("*.csv"))}
    if not tables:
        for seed_dir in sorted(root.glob("seed-*"), key=lambda d: (len(d.name), d.name)):
            tables.update({f"{seed_dir.name}/{f.stem}": pd.read_csv(f) for f in sorted(seed_dir.glob("*.csv"))})
    manifest = root / "manifest.json"
    return Run(root, tables, json.loads(manifest.read_text()) if manifest.is_file() else {})


def _argv(command: str) -> list[str]:
    """What the manifest records as the command line of an API call."""
    return ["sandbox.app.api", command]


def sweep(cfg: "SweepConfig | SubstrateSweepConfig", out: str | Path | None = None, *, storage: str | None = None,
          study: str | None = None, figures: bool = False, device: str | None = None,
          chunk_rows: int | None = None, overwrite: bool = False) -> Run:
    """`sandbox sweep`: the regime map, analytic (`SweepConfig`) or on the transformer
    (`SubstrateSweepConfig`, as ``--system substrate``). Resumes from the ledger in `out`.

    Args:
        out: run folder (default the command's ``runs/sweep-<config hash>``).
        storage, study: the Optuna storage URL and study name (default a journal file in `out`).
        figures: draw the regime figures into ``out/figures`` too.
        device: analytic only: cpu or cuda for the solver's tensors (default cpu; the substrate map
            runs where its cell config says, ``cfg.arms.cell.device``).
        chunk_rows: analytic only: rows per stacked solve (default the CLI's; 0 = point by point).
        overwrite: replace `out` whole when it holds another configuration (``--overwrite``); without
            it such a folder is refused (`sandbox.errors.BadInput`), the same configuration resumes.
    Returns: `Run` with ``results``, ``summary`` (and ``tuning`` when tuning is on).
    """
    from sandbox.results import default_out
    from sweeps.grid import SweepConfig

    run_dir = Path(out) if out else default_out("sweep", cfg.folder_key())
    if isinstance(cfg, SweepConfig):
        from sandbox.analytic import CHUNK_ROWS
        from sweeps.grid import run_sweep

        run_sweep(cfg, run_dir, storage=storage, study=study, figures=figures, argv=_argv("sweep"),
                  chunk_rows=CHUNK_ROWS if chunk_rows is None else chunk_rows, device=device, overwrite=overwrite)
    else:
        from sweeps.substrate_map import run_substrate_sweep

        run_substrate_sweep(cfg, run_dir, storage=storage, study=study, figures=figures, argv=_argv("sweep"),
                            overwrite=overwrite)
    return load(run_dir)


def factorial(cfg: "FactorialConfig", out: str | Path | None = None, *, cache: str | Path = "runs/cache",
              storage: str | None = None, figures: bool = False, overwrite: bool = False) -> Run:
    """`sandbox factorial`: cells x seeds on the transformer and the attribution of the effect.

    Args:
        out: run folder (default the command's ``runs/factorial-<hash>``).
        cache: corpora, pretrained bases and specialists (``--cache``).
        storage: Optuna storage URL of the ledger (default ``out/ledger.journal``).
        overwrite: replace `out` whole when it holds another configuration (``--overwrite``).
    Returns: `Run` with ``cells``, ``attribution`` (and the pooled per-cell tables).
    """
    from sandbox.results import config_hash
    from sweeps.factorial import run_factorial

    root = Path(out) if out else Path("runs") / f"factorial-{config_hash(cfg.settings())[:8]}"
    run_factorial(cfg, root, cache, storage=storage, figures=figures, argv=_argv("factorial"), overwrite=overwrite)
    return load(root)


def full(cfg: "CellConfig", out: str | Path | None = None, *, seeds: tuple[int, ...] | None = None,
         cache: str | Path = "runs/cache", figures: bool = False, overwrite: bool = False) -> Run:
    """`sandbox full`: one cell on the transformer, one ``seed-N`` folder per seed under `out`.

    Args:
        cfg: the cell (`CellConfig.of(cell="R", preset="tiny", ...)`); its seed is the first seed.
        out: the seeds' parent folder (default the command's ``runs/full-<cell>-<hash>``).
        seeds: the seeds (default ``(cfg.seed,)``).
        cache: corpora, pretrained bases and specialists (``--cache``).
        overwrite: replace `out` (every seed folder in it) whole (``--overwrite``); without it a
            ``seed-N`` folder holding another configuration is refused before any seed runs.
    Returns: `Run` with ``seed-N/<table>`` for every seed (``seed-N/metrics`` is absent: metrics are
    JSON, in ``seed-N/metrics.json``).
    """
    from sandbox.app.commands.full import open_full
    from sandbox.results import config_hash, release_run_dir
    from substrate.cell import run_cell

    seeds = tuple(seeds) if seeds is not None else (cfg.seed,)
    template = replace(cfg, seed=seeds[0])
    root = Path(out) if out else (Path("runs") / f"full-{cfg.cell.replace('+', '')}-"
                                  f"{config_hash(template.identity())[:8]}")
    open_full(root, template, seeds, overwrite)
    draw = None
    if figures:
        from figures.report import build_report as draw
    for seed in seeds:
        run_cell(replace(template, seed=seed), root / f"seed-{seed}", cache, argv=_argv("full"), draw_figures=draw)
    release_run_dir(root)
    return load(root)


def fusion(cfg: "FusionSweepConfig", out: str | Path | None = None, *, storage: str | None = None,
           study: str | None = None, figures: bool = False, overwrite: bool = False) -> Run:
    """`sandbox fusion`: the divergence-gain map of specialist fusion (`overwrite`: ``--overwrite``).

    Returns: `Run` with ``fusion`` (point x seed x method) and ``fit`` (the line fits).
    """
    from sandbox.results import default_out
    from sweeps.fusion import run_fusion_map

    run_dir = Path(out) if out else default_out("fusion", cfg.folder_key())
    draw = None
    if figures:
        from figures.fusion import draw
    run_fusion_map(cfg, run_dir, storage=storage, study=study, draw=draw, argv=_argv("fusion"), overwrite=overwrite)
    return load(run_dir)


def report(folder: str | Path, *, recompute: bool = False, study: bool = False) -> Run:
    """`sandbox report DIR`: rebuild the figures and summary tables of a run folder from its CSVs.

    Returns: `Run` with the folder's tables plus the summary tables the command prints, keyed by
    their titles (for a `full` parent folder, each seed's folder is reported).
    """
    from figures.report import build_report
    from sandbox.app.commands.report import run_folders

    run = load(folder)
    for sub in run_folders(folder):
        rep = build_report(sub, recompute=recompute, study=study)
        prefix = "" if Path(sub) == Path(folder) else f"{Path(sub).name}/"
        run.tables.update({f"{prefix}{title}": df for title, df in rep.tables.items()})
    if recompute:   # the rebuilt summary / attribution tables replace the ones read before
        fresh = load(folder)
        run.tables.update(fresh.tables)
    return run
