"""`sandbox export RUN --format peft|safetensors`: a finished `full` run's slots and router in standard formats."""

from __future__ import annotations

from typing import Optional

import typer


def export(
    run: str = typer.Argument(..., metavar="RUN", help="A finished `sandbox full` folder: a seed folder, or the --out "
                              "folder of several seeds (each seed-N is exported into OUT/seed-N)."),
    fmt: str = typer.Option("peft", "--format", help="peft: one PEFT LoRA adapter folder per slot (slot-00/ ...); "
                            "safetensors: the stacked bank in one bank.safetensors. Both add the router."),
    out: Optional[str] = typer.Option(None, "--out", help="Output folder (default RUN/export-FORMAT)."),
    base: bool = typer.Option(True, "--base/--no-base", help="Also write the frozen base the adapters were trained on "
                              "(base.safetensors + model.json), which PEFT loads them onto."),
) -> None:
    """Write every slot of a finished run's final bank, and its router, as safetensors files (docs/export.md)."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from substrate.export import FORMATS, load_final, run_folders, write_export
    from sandbox.errors import BadInput

    if fmt not in FORMATS:
        raise BadInput("--format", fmt, "one of " + ", ".join(FORMATS))
    folders = run_folders(run)
    t = Table(title=f"export ({fmt})")
    for c in ("run", "slots", "modules", "files", "folder"):
        t.add_column(c, no_wrap=True)
    for folder in folders:
        final = load_final(folder)
        dest = Path(out) if out else Path(run) / f"export-{fmt}"
        if folder != Path(run):   # the parent of seed-N folders: one export folder per seed
            dest = dest / folder.name
        files = write_export(final, dest, fmt, base=base)
        K = next(iter(final["banks"].values()))[0].shape[0]
        t.add_row(str(folder), str(K), str(len(final["banks"])), str(len(files)), str(dest))
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(t)


def register(app: typer.Typer) -> None:
    app.command("export")(export)
