"""`sandbox report DIR`: rebuild every figure and summary table of a run folder from its CSVs."""

from __future__ import annotations

import math

import typer


def _cell(v) -> str:
    """Terminal formatting: 4 significant digits for floats, blank for missing values."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    try:
        import pandas as pd

        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    return str(v)


def report(
    run_dir: str = typer.Argument(..., metavar="DIR", help="A run folder written by sweep, factorial or full."),
    recompute: bool = typer.Option(False, "--recompute", help="Regenerate summary.csv / attribution.csv from "
                                   "results.csv / cells.csv even when they exist."),
    study: bool = typer.Option(False, "--study", help="Draw the study's reported contrast values "
                               "(arXiv 2605.11153) as hollow markers on the attribution plot."),
) -> None:
    """Rebuild the figures (PNG + SVG under DIR/figures) and print the summary tables."""
    from rich.console import Console
    from rich.table import Table

    import pandas as pd

    from figures.report import build_report

    rep = build_report(run_dir, recompute=recompute, study=study)
    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        console = Console(width=160)
    for title, df in rep.tables.items():
        t = Table(title=title, title_justify="left")
        for col in df.columns:
            t.add_column(str(col), justify="right" if pd.api.types.is_numeric_dtype(df[col]) else "left", overflow="fold")
        for row in df.itertuples(index=False):
            t.add_row(*(_cell(v) for v in row))
        console.print(t)
    for note in rep.notes:
        console.print(f"[dim]note: {note}[/dim]")
    console.print(f"{len(rep)} figure files written under {run_dir}/figures" if rep else "no figure files written")
    for p in rep:
        console.print(f"  {p}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
