"""The define step of the worker queue, shared by `sandbox sweep` (both systems) and `sandbox
factorial`: plan a run's trials in a study on PostgreSQL for `sandbox worker` (``--enqueue-only``),
and, before a single-process run collects that study, refuse while planned trials are pending."""

from __future__ import annotations

from typing import Optional


def define(console, jobs, storage: str, study: str, direction: str, what: str, argv=None, metric: str | None = None) -> None:
    """The define step: enqueue `jobs` in `study` on PostgreSQL `storage`, name the study's value
    `metric` (`sweeps.ledger.label_study`, for optuna-dashboard) and print what to start."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from sweeps.systems import code_identity
    from sweeps.worker import database, enqueue

    store = database(storage, "--storage")
    with Progress(TextColumn("[bold]enqueue"), BarColumn(), MofNCompleteColumn(), console=console,
                  transient=True) as bar:
        tid = bar.add_task("", total=None)
        counts = enqueue(store, study, jobs, direction=direction,
                         progress=lambda i, n: bar.update(tid, completed=i, total=n), argv=argv,
                         code=code_identity())
    if metric is not None:
        import optuna

        from sweeps.ledger import label_study

        label_study(optuna.load_study(study_name=study, storage=store), metric)
    console.print(f"{what}: {counts.planned} trials planned in study '{study}': {counts.enqueued} queued now "
                  f"({counts.requeued} of them failed before), {counts.pending} already waiting or running, "
                  f"{counts.finished} already finished", highlight=False)
    from sweeps.ledger import safe_url

    console.print(f"start workers (any number, any machine): sandbox worker --storage {safe_url(storage)} --study {study}; "
                  "then rerun this command without --enqueue-only to collect", highlight=False)


def check_collect(storage: Optional[str], study: str, jobs) -> None:
    """Before a single-process run on a PostgreSQL study: refuse while planned trials are pending."""
    from sweeps.ledger import check_settled
    from sweeps.worker import database, is_database

    if not is_database(storage):
        return
    import optuna

    store = database(storage, "--storage")
    try:
        st = optuna.load_study(study_name=study, storage=store)
    except KeyError:
        return
    check_settled(st, [j.key for j in jobs], storage, study)
