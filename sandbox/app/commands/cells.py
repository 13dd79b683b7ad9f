"""`sandbox cells`: the factorial design, the default partial set and the named contrasts."""

from __future__ import annotations

import typer


def cells(
    spec: str = typer.Option("all", "--cells", help="Cells to show: a comma list (B3,R,R+E), 'partial' or 'all'."),
) -> None:
    """List factorial cells, what each factor switches, and the named contrasts among them."""
    from rich.console import Console
    from rich.table import Table

    from sandbox.factors import DEFAULT_CELLS, FACTORS, contrasts_for, interactions_for, parse_cells

    chosen = parse_cells(spec)
    console = Console()
    t = Table(title="cells")
    t.add_column("cell")
    for f in FACTORS:
        t.add_column(f)
    t.add_column("in default set")
    for c in chosen:
        t.add_row(c.name, *("x" if f in c.factors else "" for f in FACTORS), "yes" if c in DEFAULT_CELLS else "")
    console.print(t)
    k = Table(title="factors")
    k.add_column("letter")
    k.add_column("switches on")
    for f, d in FACTORS.items():
        k.add_row(f, d)
    console.print(k)
    n = Table(title="named contrasts (delta = improvement of treated over reference)")
    for col in ("name", "reference", "treated", "description"):
        n.add_column(col)
    for c in contrasts_for(chosen):
        n.add_row(c.name, c.reference.name, c.treated.name, c.description)
    console.print(n)
    inter = interactions_for(chosen)
    if inter:
        i = Table(title="interactions (all eight cells; > 0 = the factors help more together than apart)")
        for col in ("name", "factors", "description"):
            i.add_column(col)
        for x in inter:
            i.add_row(x.name, " x ".join(x.factors), x.description)
        console.print(i)


def register(app: typer.Typer) -> None:
    app.command("cells")(cells)
