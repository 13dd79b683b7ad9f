"""Run folders: one run at a time (`claim_run_dir`'s ``flock``), one configuration per folder
(`open_run_dir`, `config_difference`), ``--overwrite`` (`replace_run_dir`) and the default folder
of a command (`default_out`)."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import os
import shutil
from pathlib import Path
from typing import Any

from sandbox.errors import BadInput
from sandbox.results.atomic import FILE_MODE
from sandbox.results.jsonable import config_hash, to_jsonable

try:  # POSIX; elsewhere run folders are not locked (concurrent runs stay unsupported)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


LOCK_NAME = ".sandbox.lock"
#: Run folders this process holds: real path -> file descriptor of the flocked lock file.
_HELD: dict[str, int] = {}


class FolderBusy(BadInput):
    """The run folder is held (``flock``) by another live process: a `BadInput`, and for a worker a
    reason to give the trial back and wait rather than to fail it (`sweeps.worker`)."""


def claim_run_dir(path: str | os.PathLike, command: str, flag: str = "--out") -> Path:
    """Make `path` this process's run folder for `command`, for the rest of the run.

    Creates the folder and takes an exclusive, non-blocking ``flock`` on ``path/.sandbox.lock``
    (the holder's pid is written into it). The kernel releases it when the process exits or is
    killed, so no stale lock survives a crash; `release_run_dir` (called by `RunDir.finish`)
    releases it earlier. Calling it again in the same process is a no-op, so library layers can
    each claim the folder they write.

    Raises `BadInput` naming `flag` (one line, exit 2) when the path is an existing regular file,
    cannot be created or written (read-only filesystem, permissions), is held by another live
    process (concurrent runs on one folder are not supported), holds a run of another command
    (its ``manifest.json`` names another command, or it holds ``full``'s ``seed-N`` folders) or
    has a damaged ``manifest.json``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(flag, str(path), "a folder (this path is an existing file)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(path)
        if key in _HELD:
            _check_owner(path, command, flag)
            return path
        fd = os.open(path / LOCK_NAME, os.O_RDWR | os.O_CREAT, FILE_MODE)
    except OSError as e:
        raise BadInput(flag, str(path), f"a folder this user can create and write to ({e.strerror or e})") from None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise FolderBusy(flag, str(path), f"a folder no other run is using (process {holder} is running in it; "
                     "concurrent runs on one folder are not supported)") from None
        except OSError:  # a filesystem without flock: run unlocked rather than not at all
            pass
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    _HELD[key] = fd
    try:
        _check_owner(path, command, flag)
    except BaseException:
        release_run_dir(path)
        raise
    return path


def check_folder(path: str | os.PathLike, flag: str) -> Path:
    """Check that `path` is, or can be created as, a writable folder (a cache, say), without creating
    it: a regular file on the way or a place this user cannot write is a `BadInput` naming `flag`."""
    path = Path(path)
    first = path
    while not first.exists() and first != first.parent:
        first = first.parent
    if not first.is_dir():
        raise BadInput(flag, str(path), f"a folder ({first} is an existing file)")
    if not os.access(first, os.W_OK | os.X_OK):
        raise BadInput(flag, str(path), f"a folder this user can create and write to ({first} is not writable)")
    return path


def release_run_dir(path: str | os.PathLike) -> None:
    """Release this process's claim on run folder `path` (no-op if it holds none)."""
    _OVERWRITTEN.pop(os.path.realpath(path), None)
    fd = _HELD.pop(os.path.realpath(path), None)
    if fd is not None:
        os.close(fd)   # closing the descriptor drops the flock


def _check_owner(path: Path, command: str, flag: str) -> None:
    """Refuse a folder that holds a run of another command (its manifest, or `full`'s seed folders)."""
    m = path / "manifest.json"
    if m.exists():
        other = read_manifest_file(m, flag).get("command")
        if other is not None and other != command:
            raise BadInput(flag, str(path), f"a new folder or one holding a {command} run (this one holds a "
                           f"{other} run)")
    elif command != "full" and any(path.glob("seed-*/manifest.json")):
        raise BadInput(flag, str(path), f"a new folder or one holding a {command} run (this one holds full runs, "
                       "one seed-N folder per seed)")


#: Leaf names of config fields that may differ between a run and its resume (see `config_difference`).
RESUME_FIELDS = frozenset({"device", "cache"})
#: The commands whose run folders `open_run_dir` may replace (a manifest naming one of them is ours).
COMMANDS = frozenset({"sweep", "factorial", "full", "fusion", "report"})
#: Run folders this process replaced (`--overwrite`): real path -> what was done, for the new manifest.
_OVERWRITTEN: dict[str, dict] = {}
_ABSENT = "<absent>"


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested JSON object as ``{dotted.path: leaf}`` (lists are leaves)."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def config_difference(old: Any, new: Any, ignore: frozenset[str] = RESUME_FIELDS,
                      defaults: Any = None) -> tuple[str, Any, Any] | None:
    """The first field (sorted dotted path) whose value differs between a recorded resolved config
    `old` and a new one, as ``(path, old value, new value)``; None when they agree.

    What is NOT a difference, because it legitimately changes between a run and its resume:

    - every setting outside the resolved config: ``--out`` (the folder itself), ``--threads``,
      ``--chunk-rows``, ``--figures/--no-figures``, ``--storage`` and ``--study`` (where the
      ledger lives; trials are keyed by a hash of their configuration either way), ``--yes``,
      ``--stop-after``, ``--overwrite``, ``--enqueue-only``, the progress display, and the
      manifest's own records (command line, package versions, git revision, host, start/end and
      wall times, resumes, the analytic sweep's ``device`` entry);
    - inside the config, fields whose leaf name is in `ignore` (`RESUME_FIELDS`): ``device`` (a
      cell's or fusion's cpu/cuda; no ledger key or checkpoint identity contains it) and ``cache``
      (the folder of the cached corpus, base and specialists, which a worker may override);
    - a seed list (leaf ``seeds``, and a factorial's ``cells``) that keeps every recorded entry and
      adds more: the folder's finished trials stay in its tables and the new ones join them (a run
      grows, nothing is replaced); dropping one is a difference;
    - a field this version no longer has (renamed or removed since the folder was written), and
      a field the folder's manifest lacks whose new value is its default in `defaults` (a config
      of the same class at its defaults: a setting added since, whose default reproduces the
      earlier runs).
    """
    a, b = flatten(to_jsonable(old)), flatten(to_jsonable(new))
    base = flatten(to_jsonable(defaults)) if defaults is not None else {}
    for k in sorted(b):
        if k.rsplit(".", 1)[-1] in ignore:
            continue
        if k not in a:
            if k in base and base[k] == b[k]:
                continue
            return k, _ABSENT, b[k]
        if a[k] != b[k]:
            if _grows(k, a[k], b[k]):
                continue
            return k, a[k], b[k]
    return None


def _grows(key: str, old: Any, new: Any) -> bool:
    """True when `new` is the seed (or a factorial's cell) list `old` with entries added (see
    `config_difference`)."""
    return (key.rsplit(".", 1)[-1] in ("seeds", "cells") and isinstance(old, list) and isinstance(new, list)
            and set(old) <= set(new))


def _defaults_of(config: Any) -> Any:
    """`config`'s class at its defaults (None if it cannot be built without arguments)."""
    if not (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        return None
    try:
        return type(config)()
    except Exception:   # a config with required fields: fields added since count as differences
        return None


def check_config(path: str | os.PathLike, config: Any, flag: str = "--out") -> None:
    """Refuse (one-line `BadInput` naming `flag`, exit 2) when run folder `path` records a resolved
    config that differs from `config` (see `config_difference`); a folder without a manifest, or
    with one that records no config, passes (a new folder, or one killed before its manifest)."""
    path = Path(path)
    m = path / "manifest.json"
    if config is None or not m.exists():
        return
    old = read_manifest_file(m, flag)
    if "config" not in old:
        return
    diff = config_difference(old["config"], config, defaults=_defaults_of(config))
    if diff is None:
        return
    field, was, now = diff
    journal = next((path / n for n in ("trials.journal", "ledger.journal") if (path / n).exists()), None)
    reuse = f" (with --storage {journal}, a new --out reuses its finished trials)" if journal else ""
    raise BadInput(flag, str(path), f"a new folder or one holding this run's configuration (it holds a "
                   f"{old.get('command', '?')} run whose {field} is {_show(was)}; this run's is {_show(now)}; "
                   f"one folder holds one configuration: choose another --out{reuse}, or add --overwrite to "
                   "replace the folder)")


def _show(v: Any) -> str:
    return v if v == _ABSENT else json.dumps(v)


def is_run_folder(path: str | os.PathLike) -> bool:
    """True when `path` is a run folder of this tool: its ``manifest.json`` (readable JSON) names
    one of `COMMANDS` and records a command line, or it is `sandbox full`'s parent of ``seed-N``
    folders that are."""
    path = Path(path)

    def ours(m: Path) -> bool:
        try:
            d = json.loads(m.read_text())
        except (OSError, ValueError, UnicodeDecodeError):
            return False
        return isinstance(d, dict) and d.get("command") in COMMANDS and isinstance(d.get("argv"), list)

    if (path / "manifest.json").exists():
        return ours(path / "manifest.json")
    seeds = list(path.glob("seed-*/manifest.json"))
    return bool(seeds) and all(ours(m) for m in seeds)


def replace_run_dir(path: str | os.PathLike, flag: str = "--out") -> dict:
    """Empty run folder `path` (held by this process, `claim_run_dir`) for ``--overwrite``: every
    table, figure, journal, checkpoint and trial folder in it is removed (the lock file stays, so
    the claim holds). Only a run folder of this tool (`is_run_folder`) or one holding nothing but
    the lock is emptied; any other folder is refused with one line naming `flag`. Returns (and
    keeps for the next manifest, see `RunDir.create`) ``{at, removed, previous}``: when, how many
    files were removed and when the replaced run had started. Done once per process and folder."""
    path = Path(path)
    key = os.path.realpath(path)
    if key in _OVERWRITTEN:
        return _OVERWRITTEN[key]
    entries = [e for e in path.iterdir() if e.name != LOCK_NAME] if path.is_dir() else []
    if entries and not is_run_folder(path):
        raise BadInput(flag, str(path), "a run folder of this tool to replace with --overwrite (this folder has "
                       "no manifest.json of a sandbox run, so nothing in it is removed; choose another --out)")
    previous = None
    if (path / "manifest.json").exists():
        previous = read_manifest_file(path / "manifest.json", flag).get("started")
    removed = 0
    for e in entries:
        if e.is_dir() and not e.is_symlink():
            removed += sum(1 for f in e.rglob("*") if not f.is_dir())
            shutil.rmtree(e)
        else:
            removed += 1
            e.unlink()
    _OVERWRITTEN[key] = info = {"at": now_iso(), "removed": removed, "previous": previous}
    return info


def replaced_note(path: str | os.PathLike) -> str | None:
    """The line a command prints after `--overwrite` emptied `path` in this process, else None."""
    info = _OVERWRITTEN.get(os.path.realpath(path))
    if info is None:
        return None
    return f"--overwrite: {path} replaced ({info['removed']} files of the run started {info['previous']} removed)" \
        if info["previous"] else f"--overwrite: {path} replaced ({info['removed']} files removed)"


def open_run_dir(path: str | os.PathLike, command: str, config: Any, overwrite: bool = False,
                 flag: str = "--out") -> Path:
    """Claim run folder `path` for `command` (`claim_run_dir`), then either refuse it when it holds
    another configuration (`check_config`) or, with `overwrite`, empty it (`replace_run_dir`).
    What every command that writes a run folder calls before computing anything; calling it again
    in the same process is harmless (the claim is re-entrant, the folder is emptied once)."""
    path = Path(path)
    held = os.path.realpath(path) in _HELD
    claim_run_dir(path, command, flag)
    try:
        if overwrite:
            replace_run_dir(path, flag)
        else:
            check_config(path, config, flag)
    except BaseException:
        if not held:
            release_run_dir(path)
        raise
    return path


def read_manifest_file(path: str | os.PathLike, flag: str = "--out") -> dict:
    """A manifest's JSON; a damaged one is a `BadInput` naming the file and how to recover."""
    path = Path(path)
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise ValueError("not a JSON object")
        return m
    except (ValueError, UnicodeDecodeError) as e:
        raise BadInput(flag, str(path.parent), f"a run folder with a readable manifest.json ({path} is damaged: "
                       f"{str(e).splitlines()[0][:60]}; move it away and rerun to resume with a fresh "
                       "manifest)") from None


def default_out(command: str, config: Any) -> Path:
    """Default run folder ``runs/<command>-<config hash>``: deterministic, so re-running the same
    command finds its own folder and resumes instead of starting over."""
    return Path("runs") / f"{command}-{config_hash(config)}"
