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


def _is_number(text: str) -> bool:
    try:
        float(text.replace("+", "", 1) if text.startswith("+") else text)
    except ValueError:
        return False
    return True


def column_style(texts: list[str], numeric: bool) -> dict:
    """`rich.table.Table.add_column` settings: a column of numbers never breaks a number across lines
    (no wrap, at least as wide as its longest number, right-aligned); text columns fold."""
    if numeric or (texts and all(_is_number(t) for t in texts if t) and any(texts)):
        return {"justify": "right", "no_wrap": True, "overflow": "ignore", "min_width": max([len(t) for t in texts] + [1])}
    return {"justify": "left", "overflow": "fold"}


def run_folders(run_dir) -> list:
    """The folders to report for `run_dir`: itself, or, for the folder given to ``full --out`` (no
    table of its own, one ``seed-N`` run folder per seed), every seed's folder in seed order."""
    from pathlib import Path

    from figures.report import TABLES

    root = Path(run_dir)
    if root.is_dir() and not any((root / t).is_file() for t in TABLES):
        seeds = [d for d in root.glob("seed-*") if d.is_dir() and any((d / t).is_file() for t in TABLES)]
        if seeds:
            return sorted(seeds, key=lambda d: (len(d.name), d.name))
    return [root]


def truncated_tables(folder) -> list[str]:
    """The CSV tables of `folder` whose last line lacks its newline: cut short by a copy or a disk
    problem (this tool writes every file atomically), so their last row is partial or missing."""
    from pathlib import Path

    cut = []
    for f in sorted(Path(folder).glob("*.csv")):
        with open(f, "rb") as fh:
            size = fh.seek(0, 2)
            if size == 0:
                continue
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                cut.append(f.name)
    return cut


def report(
    run_dir: str = typer.Argument(..., metavar="DIR", help="A run folder written by sweep, factorial or full "
                                  "(for full, the --out folder reports every seed-N folder in it)."),
    recompute: bool = typer.Option(False, "--recompute", help="Regenerate summary.csv / attribution.csv from "
                                   "results.csv / cells.csv even when they exist."),
    study: bool = typer.Option(False, "--study", help="Draw the study's reported contrast values "
                               "(arXiv 2605.11153) as hollow markers on the attribution plot."),
    other: str = typer.Argument(None, metavar="[OTHER]", help="A second sweep folder (e.g. the substrate map of "
                                "an analytic one): compare the two maps along alignment (transfer.csv + figure)."),
    out: str = typer.Option(None, "--out", help="With OTHER: folder for transfer.csv and its figure "
                            "(default runs/transfer-<hash of the two folders>)."),
) -> None:
    """Rebuild the figures (PNG + SVG under DIR/figures) and print the summary tables; with OTHER,
    compare two sweep maps along alignment (does the regime boundary transfer?)."""
    from rich.console import Console

    from figures.report import build_report

    console = Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the tables into 80 columns
        console = Console(width=160)
    if other is not None:
        return _transfer(console, run_dir, other, out)
    err = Console(stderr=True, width=console.width)
    folders = run_folders(run_dir)
    for folder in folders:
        if len(folders) > 1:
            console.print(f"[bold]{folder}[/bold]", highlight=False)
        for name in truncated_tables(folder):
            err.print(f"warning: {folder}/{name} ends in the middle of a line (cut short?): its last row is "
                      "partial or missing, so the summary below may be wrong", highlight=False, soft_wrap=True)
        _report_one(console, build_report(folder, recompute=recompute, study=study), folder)


def _transfer(console, first: str, second: str, out: str | None) -> None:
    """transfer.csv and transfer.png/svg of two sweep folders' summary tables."""
    import json
    from pathlib import Path

    import pandas as pd
    from rich.table import Table

    from figures import transfer
    from sandbox.errors import BadInput
    from sandbox.results import RunDir, config_hash, save_figure

    tables, names = [], []
    for flag, d in (("DIR", first), ("OTHER", second)):
        f = Path(d) / "summary.csv"
        if not f.is_file():
            raise BadInput(flag, d, "a sweep folder holding summary.csv")
        tables.append(pd.read_csv(f))
        try:
            system = json.loads((Path(d) / "manifest.json").read_text()).get("system", "analytic")
        except (OSError, ValueError):
            system = "analytic"
        names.append(system if system not in names else f"{system}-2")
    try:
        df = transfer.collect(tables[0], tables[1], names=tuple(names))
    except ValueError as e:
        raise BadInput("DIR", f"{first} {second}", f"two one-axis maps along alignment ({e})") from None
    root = Path(out) if out else Path("runs") / f"transfer-{config_hash([str(Path(first).resolve()), str(Path(second).resolve())])[:8]}"
    run = RunDir.create(root, command="report", config={"first": str(first), "second": str(second)})
    run.write_csv("transfer.csv", df)
    fig = transfer.plot(df, tuple(names))
    paths = save_figure(fig, root / "figures" / "transfer")
    run.finish()
    t = Table(title=f"transfer: {names[0]} vs {names[1]} (delta = log loss/PPL of grad - of evo)", title_justify="left")
    cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
    for j, c in enumerate(df.columns):
        t.add_column(str(c), **column_style([r[j] for r in cells], True))
    for row in cells:
        t.add_row(*row)
    console.print(t)
    console.print(f"transfer.csv and figures in {root}", highlight=False)
    for p in paths or []:
        console.print(f"  {p}", highlight=False)


def _report_one(console, rep, run_dir) -> None:
    import pandas as pd
    from rich.table import Table

    for title, df in rep.tables.items():
        t = Table(title=title, title_justify="left")
        cells = [[_cell(v) for v in row] for row in df.itertuples(index=False)]
        for j, col in enumerate(df.columns):
            t.add_column(str(col), **column_style([r[j] for r in cells], pd.api.types.is_numeric_dtype(df[col])))
        for row in cells:
            t.add_row(*row)
        console.print(t)
    for note in rep.notes:
        console.print(f"[dim]note: {note}[/dim]")
    console.print(f"{len(rep)} figure files written under {run_dir}/figures" if rep else "no figure files written")
    for p in rep:
        console.print(f"  {p}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
