"""Notes to the user said when a command has finished (the new name of a deprecated flag it was
given), so a command that stops on a user mistake still says only its one-line error
(`sandbox.app.cli.main` says them on stderr after a command that returned 0 and drops them
otherwise)."""

from __future__ import annotations

import sys

_NOTES: list[str] = []


def later(message: str) -> None:
    """Say `message` (one line) on stderr once the running command has finished, at most once."""
    if message not in _NOTES:
        _NOTES.append(message)


def pending() -> list[str]:
    """The notes not said yet."""
    return list(_NOTES)


def say_all() -> None:
    """Say the pending notes on stderr and forget them."""
    for m in _NOTES:
        print(m, file=sys.stderr)
    _NOTES.clear()


def clear() -> None:
    """Forget the pending notes (a command that failed, or a new command starting)."""
    _NOTES.clear()
