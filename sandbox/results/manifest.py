"""A run folder's manifest (`RunDir`: command line, resolved config, package versions, git revision,
host, seeds, start/end times, resumes) and its tables and figures."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import pandas as pd

from sandbox.results.atomic import atomic_write_csv, atomic_write_json, save_figure
from sandbox.results.folders import _OVERWRITTEN, claim_run_dir, now_iso, read_manifest_file, release_run_dir
from sandbox.results.jsonable import to_jsonable

PACKAGES = ("torch", "numpy", "scipy", "pandas", "statsmodels", "optuna", "matplotlib", "seaborn", "typer", "rich")


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
