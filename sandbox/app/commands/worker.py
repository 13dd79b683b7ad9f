"""`sandbox worker`: claim planned trials of a study on a PostgreSQL storage, run them, record them,
exit when none is left (any number at once, on any machines). The define step that plans those
trials (``sandbox sweep|factorial --enqueue-only``) is `sandbox.app.plan`."""

from __future__ import annotations

import math
import time
from typing import Optional

import typer


def worker(
    storage: str = typer.Option(..., "--storage", help="PostgreSQL URL holding the study, e.g. postgresql://user@host/db."),
    study: str = typer.Option(..., "--study", help="Study name (printed by the define step: sweep/factorial --enqueue-only)."),
    retries: int = typer.Option(2, "--retries", help="Times a trial that raised is queued again (it runs at most N+1 times)."),
    heartbeat: float = typer.Option(10.0, "--heartbeat", help="Seconds between heartbeats of the running trial."),
    grace: float = typer.Option(60.0, "--grace", help="Seconds without a heartbeat after which a running trial's worker counts as dead and the trial is re-run."),
    max_trials: Optional[int] = typer.Option(None, "--max-trials", help="Stop after claiming this many trials (default: until none is left)."),
    out: Optional[str] = typer.Option(None, "--out", help="Factorial trials: folder for the per-trial runs (default: the define step's --out)."),
    cache: Optional[str] = typer.Option(None, "--cache", help="Factorial trials: base-model cache folder (default: the define step's)."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (small tensors: 1 is fastest)."),
    db_wait: float = typer.Option(300.0, "--db-wait", help="Seconds every storage step keeps retrying while the database is unreachable (restart, failover) before the worker stops with exit 2; 0 stops at once."),
) -> None:
    """Run planned trials of a study until none is waiting or running (see README: many machines)."""
    from sandbox.errors import BadInput
    from sandbox.options import check_int

    from sweeps.ledger import check_names

    check_names(study, storage=storage, out=out, cache=cache)   # empty, too long: one line
    check_int(retries, "--retries", 0, 100)
    check_int(threads, "--threads", 1, 256)
    if max_trials is not None:
        check_int(max_trials, "--max-trials", 1, 10**9)
    if not (math.isfinite(heartbeat) and 0.1 <= heartbeat <= 3600):
        raise BadInput("--heartbeat", heartbeat, "seconds in [0.1, 3600]")
    if not (math.isfinite(grace) and grace >= 2 * heartbeat and grace <= 86400):
        raise BadInput("--grace", grace, f"seconds in [2 x --heartbeat = {2 * heartbeat:g}, 86400]")
    if not (math.isfinite(db_wait) and 0 <= db_wait <= 86400):
        raise BadInput("--db-wait", db_wait, "seconds in [0, 86400]")
    from sweeps.worker import database

    store = database(storage, "--storage")    # refuses journal/SQLite/unreachable with one line
    from sweeps.worker import _study_id

    _study_id(store, study)                    # an unknown --study: one line, before any display
    import optuna

    from sweeps import systems
    from sweeps.worker import check_code

    code = systems.code_identity()
    check_code(optuna.load_study(study_name=study, storage=store), study, code)   # other code: one line, no claim

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sweeps.worker import WorkerContext, run_worker

    torch.set_num_threads(threads)
    console = Console(stderr=True)

    # SIGTERM (SLURM, kill) arrives as `Terminated` (sandbox.app.cli.main): the running trial is given
    # back at once, the counts are printed, and the exit code is 143 (Ctrl-C: 130)
    t0 = time.perf_counter()
    counts = None
    try:
        with Progress(TextColumn("[bold]worker"), BarColumn(), MofNCompleteColumn(), TextColumn("trials"),
                      TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                      transient=False) as bar:
            task_id = bar.add_task("", total=None)

            def progress(done: int, total: int, mine: int, desc: str) -> None:
                bar.update(task_id, completed=done, total=total, description=f"{mine} claimed here; {desc}")

            counts = run_worker(store, study, systems=systems.SYSTEMS, code=code, retries=retries,
                                heartbeat_s=heartbeat, grace_s=grace, max_trials=max_trials, progress=progress,
                                db_wait_s=db_wait,
                                ctx=WorkerContext(out=out, cache=cache,
                                                  log=lambda m: console.print(m, highlight=False,
                                                                                soft_wrap=True)))
    except BaseException as e:
        counts = getattr(e, "worker_counts", None)
        raise
    finally:
        if counts is not None:
            print(summary(counts, study, time.perf_counter() - t0), flush=True)


def summary(counts, study: str, wall_s: float) -> str:
    """The worker's closing line: everything it counted (also stored in the study)."""
    return (f"worker: {counts.claimed} claimed, {counts.completed} completed, {counts.failed} failed "
            f"({counts.retried} queued again, {counts.gave_up} given up), {counts.given_back} given back "
            f"({counts.interrupted} interrupted, {counts.busy} folder busy), {counts.requeued_lost} lost trials of "
            f"other workers queued again, {counts.dropped} results dropped; database: {counts.reconnects} "
            f"reconnects, {counts.waited_s:.1f} s waited; {wall_s:.1f} s; study {study}")


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
