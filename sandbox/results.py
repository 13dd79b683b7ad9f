"""Run folders, manifests, tidy tables and atomic writes (the output contract).

Every command writes into one run folder: ``manifest.json`` (command line, resolved config,
package versions, git revision, seeds, start/end times), tidy CSV tables and figures. Every file is
written atomically: to a temporary file in the same folder, flushed, fsynced, then renamed over the
target, so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

PACKAGES = ("torch", "numpy", "scipy", "pandas", "statsmodels", "optuna", "matplotlib", "seaborn", "typer", "rich")


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[io.IOBase]:
    """Open a temporary sibling of `path` for writing; rename it over `path` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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


class RunDir:
    """A run folder and its manifest.

    >>> run = RunDir.create("runs/sweep-demo", command="sweep", config=cfg, seeds=[42, 137])
    >>> run.write_csv("results.csv", rows); run.finish()

    Re-opening an existing folder (a resumed run) keeps its first start time and records each
    resume in ``manifest["resumes"]``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def create(cls, path: str | os.PathLike, command: str, config: Any, seeds: list[int] | None = None,
               argv: list[str] | None = None, extra: dict | None = None) -> "RunDir":
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
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
        if extra:
            manifest.update(to_jsonable(extra))
        atomic_write_json(run.manifest_path, manifest)
        return run

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    def read_manifest(self) -> dict:
        return json.loads(self.manifest_path.read_text())

    def update_manifest(self, **fields: Any) -> None:
        m = self.read_manifest()
        m.update(to_jsonable(fields))
        atomic_write_json(self.manifest_path, m)

    def finish(self, **fields: Any) -> None:
        self.update_manifest(ended=now_iso(), **fields)

    def file(self, name: str) -> Path:
        return self.path / name

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
