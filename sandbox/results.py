"""Run folders, manifests, tidy tables and atomic writes (the output contract).

Every command writes into one run folder: ``manifest.json`` (command line, resolved config,
package versions, git revision, seeds, start/end times), tidy CSV tables and figures. Every file is
written atomically: to a temporary file in the same folder, flushed, fsynced, then renamed over the
target, so a killed process leaves either the old file or the new one, never half of one. Files get
the permissions of the user's umask (like any ``open``), not the private 0600 of a temporary file.

One run folder holds one run at a time: `claim_run_dir` takes an exclusive ``flock`` on
``DIR/.sandbox.lock`` for the run's duration (the kernel drops it when the process dies, so a kill
never leaves a stale lock), and refuses, as a one-line `BadInput` naming ``--out``, a folder that
another live process holds, a folder of another command, a regular file, an unwritable path, or a
folder whose ``manifest.json`` is damaged.

One run folder holds one configuration: `open_run_dir` (what every command that writes a run
folder calls before it computes anything) compares the command's resolved config with the one the
folder's manifest records and refuses a different one with one line naming ``--out``, the folder
and the first differing field; the same config resumes. ``--overwrite`` replaces the folder whole
(only a run folder of this tool; recorded in the new manifest as ``overwritten``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from sandbox.errors import BadInput

try:  # POSIX; elsewhere run folders are not locked (concurrent runs stay unsupported)
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PACKAGES = ("torch", "numpy", "scipy", "pandas", "statsmodels", "optuna", "matplotlib", "seaborn", "typer", "rich")


def _umask() -> int:
    """The process umask (read by setting it and putting it back)."""
    old = os.umask(0o022)
    os.umask(old)
    return old


#: Mode of every file written here: what ``open(path, "w")`` would give under the user's umask.
FILE_MODE = 0o666 & ~_umask()


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success.

    The temporary file is created 0600 by `tempfile.mkstemp`; it is given `FILE_MODE` (the user's
    umask) before the rename, so finished files are as readable as any other file the user writes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path, "w") as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | os.PathLike, table: pd.DataFrame | list[dict]) -> Path:
    """Write a tidy table (DataFrame or list of row dicts) as CSV, atomically, without an index."""
    df = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
    return atomic_write_text(path, df.to_csv(index=False))


def atomic_save_torch(path: str | os.PathLike, obj: Any) -> Path:
    """`torch.save` through a temporary file (checkpoints)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def damaged(path: str | os.PathLike, flag: str, what: str, error: BaseException, recover: str) -> BadInput:
    """The one-line error for a damaged file: which file, what it should be, and how to recover."""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:60]
    return BadInput(flag, str(path), f"an intact {what} (this file is damaged: {reason}; {recover})")


def load_torch(path: str | os.PathLike, flag: str, what: str, recover: str, **kw: Any) -> Any:
    """`torch.load` of a checkpoint or cache file; a truncated or corrupt file is a `BadInput`
    naming `flag`, the file and how to recover (see `damaged`)."""
    import pickle
    import zipfile

    import torch

    try:
        return torch.load(path, **kw)
    except (RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
        raise damaged(path, flag, what, e, recover) from None


def read_json(path: str | os.PathLike, flag: str, what: str, recover: str) -> Any:
    """A JSON file; a truncated or corrupt one is a `BadInput` (see `damaged`)."""
    try:
        return json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, flag, what, e, recover) from None


def read_csv(path: str | os.PathLike) -> pd.DataFrame:
    return pd.read_csv(path)


def save_figure(fig, stem: str | os.PathLike, dpi: int = 160) -> list[Path]:
    """Save a matplotlib figure as ``stem.png`` (>= 150 dpi) and ``stem.svg``, atomically."""
    out = []
    for ext in ("png", "svg"):
        buf = io.BytesIO()
        fig.savefig(buf, format=ext, dpi=dpi, bbox_inches="tight")
        out.append(atomic_write_bytes(Path(f"{stem}.{ext}"), buf.getvalue()))
    return out


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, paths, numpy/torch scalars and tuples into plain JSON values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in (sorted(obj) if isinstance(obj, (set, frozenset)) else obj)]
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = None
    try:
        out["molora-regimes"] = metadata.version("molora-regimes")
    except metadata.PackageNotFoundError:
        out["molora-regimes"] = None
    return out


def git_revision(cwd: str | os.PathLike | None = None) -> str | None:
    """The current commit (with ``-dirty`` if the tree has changes), or None outside git."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


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


class RunDir:
    """A run folder and its manifest.

    >>> run = RunDir.create("runs/sweep-demo", command="sweep", config=cfg, seeds=[42, 137])
    >>> run.write_csv("results.csv", rows); run.finish()

    Re-opening an existing folder (a resumed run) keeps its first start time and records each
    resume in ``manifest["resumes"]``. `create` claims the folder (`claim_run_dir`: one run per
    folder, no folder of another command); `finish` releases it. A folder this process replaced
    (`replace_run_dir`, ``--overwrite``) gets ``manifest["overwritten"] = {at, removed, previous}``,
    kept through later resumes. The check that the folder holds this configuration is
    `open_run_dir`'s, made by the caller before anything is computed.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, command: str, config: Any, seeds: list[int] | None = None,
               argv: list[str] | None = None, extra: dict | None = None) -> "RunDir":
        run = cls(path)
        claim_run_dir(run.path, command)
        old = run.read_manifest() if run.manifest_path.exists() else None
        manifest = {
            "command": command,
            "argv": list(argv if argv is not None else sys.argv),
            "config": to_jsonable(config),
            "seeds": list(seeds) if seeds is not None else None,
            "versions": package_versions(),
            "git_revision": git_revision(),
            "host": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count()},
            "started": old["started"] if old else now_iso(),
            "ended": None,
            "resumes": (old.get("resumes", []) + [now_iso()]) if old else [],
        }
        over = _OVERWRITTEN.get(os.path.realpath(run.path)) or _OVERWRITTEN.get(os.path.realpath(run.path.parent))
        over = over or (old or {}).get("overwritten")
        if over:
            manifest["overwritten"] = over
        if extra:
            manifest.update(to_jsonable(extra))
        atomic_write_json(run.manifest_path, manifest)
        return run

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict:
        return read_manifest_file(self.manifest_path)

    def update_manifest(self, **fields: Any) -> None:
        m = self.read_manifest()
        m.update(to_jsonable(fields))
        atomic_write_json(self.manifest_path, m)

    def finish(self, **fields: Any) -> None:
        """Record the end time (and `fields`) and release the folder for the next run."""
        self.update_manifest(ended=now_iso(), **fields)
        self.release()

    def release(self) -> None:
        """Release this process's claim on the folder (see `claim_run_dir`)."""
        release_run_dir(self.path)

    def write_csv(self, name: str, table: pd.DataFrame | list[dict]) -> Path:
        return atomic_write_csv(self.path / name, table)

    def write_json(self, name: str, obj: Any) -> Path:
        return atomic_write_json(self.path / name, obj)

    def save_figure(self, fig, stem: str) -> list[Path]:
        return save_figure(fig, self.path / stem)


def config_hash(config: Any, n: int = 10) -> str:
    """Short stable hash of a config (its JSON form), for cache keys and default folders."""
    import hashlib

    blob = json.dumps(to_jsonable(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def default_out(command: str, config: Any) -> Path:
    """Default run folder ``runs/<command>-<config hash>``: deterministic, so re-running the same
    command finds its own folder and resumes instead of starting over."""
    return Path("runs") / f"{command}-{config_hash(config)}"
