"""The `sandbox` command line: a thin typer app.

Each command lives in `sandbox/app/commands/<name>.py` (no command imports another) as a plain
function with typed options, or, where its options come from config fields, one that receives them
grouped by config (`sandbox.app.declare`); it parses, builds a config, calls library code (imported
lazily, so `sandbox --help` stays fast) and prints a `rich` table. User mistakes raise `BadInput` (or click's usage errors) and come out here as
one line on stderr with exit code 2.
"""

from __future__ import annotations

import os
import sys

import typer

try:  # typer >= 0.20 vendors its own click; older releases use the click package.
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover - depends on the installed typer
    from click import exceptions as _cx

from sandbox import __version__
from sandbox.errors import BadInput

app = typer.Typer(
    name="sandbox",
    help="Mixture-of-LoRA regime explorer: where does evolutionary routing search beat, tie with, "
    "or degrade the gradient solution?",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},   # every command accepts -h
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sandbox {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    config: str = typer.Option(None, "--config", metavar="MANIFEST",
                               help="Replay the run recorded in a run folder's manifest.json (or the folder); options "
                                    "given after it win, e.g. --out NEW or --seeds 20 (before or after the command)."),
) -> None:
    """Mixture-of-LoRA regime explorer."""
    if config is not None:   # `main` expands --config before the app sees it; reaching here means it was bypassed
        raise BadInput("--config", config, "a replay started through the `sandbox` entry point (sandbox.app.cli.main)")


def _register() -> None:
    # One line per command module; each module defines `register(app)`.
    from sandbox.app.commands import cells as _cells
    from sandbox.app.commands import report as _report
    from sandbox.app.commands import bench as _bench
    from sandbox.app.commands import full as _full, factorial as _factorial
    from sandbox.app.commands import sweep as _sweep
    from sandbox.app.commands import worker as _worker
    from sandbox.app.commands import fusion as _fusion
    from sandbox.app.commands import export as _export

    for mod in (_cells, _report, _bench, _full, _factorial, _sweep, _worker, _fusion, _export):
        mod.register(app)


_register()


#: Exit codes of a run stopped by a signal (the shell's convention, 128 + the signal's number).
EXIT_SIGINT, EXIT_SIGTERM = 130, 143


def _stopped(signum: int) -> int:
    """One line for a run stopped by Ctrl-C (SIGINT) or SIGTERM, and its exit code."""
    import signal

    if signum == signal.SIGTERM:
        print("stopped by SIGTERM (kill, a scheduler's time limit); exit 143", file=sys.stderr)
        return EXIT_SIGTERM
    print("interrupted (Ctrl-C); exit 130", file=sys.stderr)
    return EXIT_SIGINT


def _flag_of(path: str, words: list[str]) -> tuple[str | None, str | None]:
    """The flag (and its value) of the command line `words` whose path holds `path`, if any."""
    best = (None, None)
    pairs = [(w.split("=", 1)[0], w.split("=", 1)[1]) if w.startswith("--") and "=" in w else (w, v)
             for w, v in zip(words, words[1:] + [""])]
    for flag, value in pairs:
        if not flag.startswith("--") or not value or value.startswith("--"):
            continue
        for p, v in ((path, value), (os.path.abspath(path), os.path.abspath(value))):
            if (p == v or p.startswith(v.rstrip("/") + "/")) and len(value) > len(best[1] or ""):
                best = (flag, value)
    return best


def _os_error(e: OSError, words: list[str]) -> int:
    """One line for an operating-system error that reached the top (a full disk, a name too long, a
    read-only place), naming the flag whose path it hit: exit 1 for a full disk (nothing wrong with
    the command; free space and rerun: finished trials and checkpoints are kept), 2 otherwise."""
    import errno

    where = str(e.filename) if e.filename is not None else ""
    flag, value = _flag_of(where, words) if where else (None, None)
    reason = e.strerror or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        print(f"error: the disk is full ({reason}) writing {where or 'a file'}"
              f"{f' (under {flag} {value!r})' if flag else ''}; nothing half-written is kept: free space and rerun "
              "(finished trials and checkpoints are reused)", file=sys.stderr)
        return 1
    allowed = {errno.ENAMETOOLONG: "a path whose every name fits the filesystem (at most 255 bytes)",
               errno.EROFS: "a place on a writable filesystem", errno.EACCES: "a place this user can write to",
               errno.EPERM: "a place this user can write to"}.get(e.errno, "a usable path")
    print(BadInput(flag or "path", value if flag else where, f"{allowed} ({reason}: {where})").one_line(),
          file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app and return its exit code (the console script passes it to
    `sys.exit`); user mistakes become one line on stderr and exit code 2; Ctrl-C exits 130 and
    SIGTERM 143, each with one line (SIGTERM is raised as `Terminated`, a ``KeyboardInterrupt``,
    so whatever gives work back on Ctrl-C does so on SIGTERM too)."""
    import signal
    import threading

    from sandbox.app import notes, replay
    from sandbox.errors import Terminated

    got: list[int] = []

    def _term(signum, frame):
        got.append(signum)
        raise Terminated(signum)

    def _int(signum, frame):
        got.append(signum)
        raise KeyboardInterrupt

    def _unraisable(u, hook=sys.unraisablehook):
        # a signal that landed in a callback whose exceptions Python ignores (a weakref callback, a
        # __del__, an import lock's cleanup) would be lost and the command would run on and exit 0:
        # deliver it again, at the main thread's next instruction, and print nothing for it
        if isinstance(u.exc_value, KeyboardInterrupt) and got:
            import _thread

            _thread.interrupt_main(got[-1])
            return
        hook(u)

    old = None
    if threading.current_thread() is threading.main_thread():
        old = signal.signal(signal.SIGTERM, _term), signal.signal(signal.SIGINT, _int), sys.unraisablehook
        sys.unraisablehook = _unraisable
    words: list[str] = []
    try:
        notes.clear()
        words = list(sys.argv[1:] if argv is None else argv)
        words, manifest, overrides = replay.expand(words)
        replay.set_argv(words)
        rv = app(args=words, standalone_mode=False, prog_name="sandbox")
        if rv == EXIT_SIGINT and got:   # typer turns a KeyboardInterrupt into Exit(130) and returns it
            return _stopped(got[-1])
        if isinstance(rv, int) and rv != 0:
            return rv
        notes.say_all()   # the command finished: its notes (a deprecated flag's new name), one line each
        if manifest is not None:
            why = replay.check_replay(words, manifest, overrides)
            if why:
                print(why, file=sys.stderr)
                return 1
    except BadInput as e:
        print(e.one_line(), file=sys.stderr)
        return 2
    except _cx.NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        return 0
    except (_cx.UsageError, _cx.ClickException) as e:
        print(f"error: {e.format_message()}".replace("\n", " "), file=sys.stderr)
        return 2
    except typer.Exit as e:
        return getattr(e, "exit_code", 0)
    except Terminated as e:
        return _stopped(e.signum)
    except (typer.Abort, KeyboardInterrupt):
        return _stopped(signal.SIGINT)
    except BrokenPipeError:
        # `sandbox report DIR | head`: the reader went away; not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:   # a full disk, a name too long, a read-only place: one line, never a traceback
        return _os_error(e, words)
    finally:
        notes.clear()
        if old is not None:
            signal.signal(signal.SIGTERM, old[0])
            signal.signal(signal.SIGINT, old[1])
            sys.unraisablehook = old[2]
    return 0


if __name__ == "__main__":
    sys.exit(main())
