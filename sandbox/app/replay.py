"""`--config manifest.json`: run a recorded command again.

Every run folder's `manifest.json` records the command line (`argv`) and the resolved config
(`config`). `sandbox [COMMAND] --config DIR/manifest.json [OPTIONS]` rebuilds the command line from
the manifest and appends OPTIONS, which win over the recorded ones (the last value of an option is
the one taken), so `--out NEW` replays into a new folder and `--out NEW --seeds 20` with more seeds
(the recorded folder holds its own configuration: more seeds into it are refused,
`sandbox.results.open_run_dir`). A recorded `--overwrite` is dropped, so a replay never empties the
recorded folder unless `--overwrite` is given again.

After the run the replay's resolved config is compared with the recorded one: a replay without
overrides that resolves differently (this version's defaults moved since the run was recorded)
exits 1 with one line naming the first differing field, so "replayed" always means "the same
configuration". Fields given as overrides are expected to differ and are not compared.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sandbox.errors import BadInput

FLAG = "--config"


def _split(argv: list[str]) -> tuple[str | None, list[str]]:
    """The `--config` value and the other words of `argv` (None when there is no `--config`)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        w = argv[i]
        if w == FLAG:
            if i + 1 >= len(argv) or not argv[i + 1] or argv[i + 1].startswith("-"):
                raise BadInput(FLAG, "", "the path of a run folder's manifest.json (or the folder)")
            path, i = argv[i + 1], i + 2
            continue
        if w.startswith(FLAG + "="):
            path, i = w.split("=", 1)[1], i + 1
            continue
        rest.append(w)
        i += 1
    return path, rest


def load_manifest(path: str) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "manifest.json"
    allowed = "a run folder's manifest.json (or the folder) with the recorded command line"
    if not p.is_file():
        raise BadInput(FLAG, path, allowed)
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise BadInput(FLAG, path, allowed + " (this file is not readable JSON)") from None
    argv = m.get("argv") if isinstance(m, dict) else None
    if not (isinstance(argv, list) and len(argv) >= 2 and all(isinstance(a, str) for a in argv)):
        raise BadInput(FLAG, path, allowed + " (no argv recorded)")
    return m


def expand(argv: list[str]) -> tuple[list[str], dict | None, list[str]]:
    """`argv` with `--config` replaced by the recorded command line; also the manifest (None without
    `--config`) and the override words the user added."""
    path, rest = _split(list(argv))
    if path is None:
        return list(argv), None, []
    m = load_manifest(path)
    recorded = [w for w in m["argv"][1:] if w != "--overwrite"]   # drop the program name; a replay never
                                                                  # empties the recorded folder unless asked
    command = recorded[0]
    if rest and not rest[0].startswith("-"):
        if rest[0] != command:
            raise BadInput(FLAG, path, f"a manifest of `sandbox {rest[0]}` (this one records `sandbox {command}`)")
        rest = rest[1:]
    return recorded + rest, m, rest


def _flat(d: Any) -> dict[str, Any]:
    from sandbox.results import flatten

    return flatten(d)


def _out_of(argv: list[str]) -> str | None:
    out = None
    for i, w in enumerate(argv):
        if w == "--out" and i + 1 < len(argv):
            out = argv[i + 1]
        elif w.startswith("--out="):
            out = w.split("=", 1)[1]
    return out


def first_difference(recorded: dict, replayed: dict, overrides: list[str]) -> str | None:
    """The first field (dotted) whose value differs between two resolved configs, leaving out the
    fields an override flag names (`--seeds` covers every field named `seeds`) and a field the
    recorded config lacks (a setting added since, e.g. the analytic ``lifecycle_every`` or the
    lifecycle's ``death``: the recorded command line cannot name it, so it resolves to its default,
    which reproduces the recorded run; given as an override it is skipped anyway)."""
    skip = {w[2:].split("=")[0].replace("-", "_") for w in overrides if w.startswith("--")}
    a, b = _flat(recorded), _flat(replayed)
    for k in sorted(set(a) | set(b)):
        leaf = k.rsplit(".", 1)[-1]
        if leaf in skip or k.replace(".", "_") in skip:
            continue
        if k not in a:
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            return f"{k} ({a.get(k, '<absent>')!r} recorded, {b.get(k, '<absent>')!r} now)"
    return None


def check_replay(argv: list[str], manifest: dict, overrides: list[str]) -> str | None:
    """After a replayed run: None when its resolved config equals the recorded one (outside the
    overridden fields), else the one-line reason."""
    out = _out_of(argv)
    if out is None or "config" not in manifest:
        return None
    p = Path(out) / "manifest.json"
    try:
        now = json.loads(p.read_text()).get("config")
    except (OSError, json.JSONDecodeError):
        return None
    diff = first_difference(manifest["config"], now, overrides)
    if diff is None:
        return None
    return f"error: --config: the replay resolved differently from the recorded run at {diff}"


#: The command line of the running command (set by `sandbox.app.cli.main`, `--config` expanded), so a
#: manifest records what was run also when `main` is called in-process (tests, notebooks), where
#: `sys.argv` is the host program's.
_ARGV: list[str] | None = None


def set_argv(argv: list[str] | None) -> None:
    global _ARGV
    _ARGV = None if argv is None else list(argv)


def recorded_argv() -> list[str]:
    """``["sandbox", COMMAND, ...]``: the running command's line for its manifest, storage
    passwords masked (``user:***@``: a replay reads it from ``PGPASSWORD`` or ``~/.pgpass`` instead)."""
    import sys

    from sweeps.ledger import safe_url

    return ["sandbox", *(safe_url(w) if "://" in w else w for w in (_ARGV if _ARGV is not None else sys.argv[1:]))]
