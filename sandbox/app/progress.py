"""Progress bars for the long steps the library reports through callbacks (the library never draws).

`stage_callback(bar)` turns a `rich.progress.Progress` into the ``stage(name, done, total)``
callback of `substrate.cell.prepare_substrate` / `run_cell`: one bar per stage name (pretraining
the base, specialists), created on its first report. A cached step reports nothing, so no bar.
"""

from __future__ import annotations

from typing import Callable


def progress_bar(console, **fields):
    """The house bar: description, bar, done/total, elapsed, remaining (and any `fields` columns)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    extra = [TextColumn(f"{k} {{task.fields[{k}]}}") for k in fields]
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), *extra,
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)


def stage_callback(bar, **fields) -> Callable[[str, int, int], None]:
    """``stage(name, done, total)`` drawing one task of `bar` per stage name; `fields` fill the bar's
    extra columns of those tasks (e.g. ``loss="-"``)."""
    tasks: dict[str, int] = {}

    def stage(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = bar.add_task(name, total=total, **fields)
        bar.update(tasks[name], completed=done)

    return stage
