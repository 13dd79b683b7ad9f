"""The error contract for user mistakes.

A user mistake (a bad flag value, a bad file) raises `BadInput`, naming the flag, the bad value and
what is allowed. The CLI turns it into one line on stderr and exit code 2, never a traceback.

Config dataclasses validate in `__post_init__` and name their fields by the CLI flag that sets
them: field `context_noise` is flag `--context-noise` (see `flag_for`).
"""

from __future__ import annotations

from typing import Any


class BadInput(ValueError):
    """A user-supplied value is not allowed.

    Args:
        flag: the flag or file that carried the value, e.g. ``"--alignment"``.
        value: the offending value as the user wrote it (or the parsed value).
        allowed: what would have been accepted, e.g. ``"LO..HI with 0 <= LO <= HI <= 1"``.
    """

    def __init__(self, flag: str, value: Any, allowed: str):
        self.flag, self.value, self.allowed = flag, value, allowed
        super().__init__(f"{flag} {value!r}: expected {allowed}")

    def one_line(self) -> str:
        return f"error: {self}".replace("\n", " ")


def flag_for(field: str) -> str:
    """CLI flag for a config field name: ``context_noise`` -> ``--context-noise``."""
    return "--" + field.replace("_", "-")


def require(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise `BadInput` for config field `field` unless `ok` (for `__post_init__` checks). The field
    must be settable by a command's flag (`tests/test_declare.py` checks that every such flag exists);
    settings no command exposes use `check`."""
    if not ok:
        raise BadInput(flag_for(field), value, allowed)


def check(ok: bool, name: str, value: Any, allowed: str) -> None:
    """Raise `BadInput` naming argument or setting `name` itself (no ``--``) unless `ok`: for values
    that no command takes as a flag (a function's argument, an internal config field), so the
    message never points a user at a flag that does not exist."""
    if not ok:
        raise BadInput(name, value, allowed)


class Terminated(KeyboardInterrupt):
    """A stopping signal (SIGTERM: ``kill``, a SLURM time limit) raised as an exception, so the code
    that gives work back on Ctrl-C runs for it too; the CLI exits ``128 + signum`` (143) with one line."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = int(signum)
