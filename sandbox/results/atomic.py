"""Atomic writes (a temporary sibling, fsynced, renamed over the target, given the user's umask)
and reads that turn a damaged file into one line naming the flag and how to recover."""

from __future__ import annotations

import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

from sandbox.errors import BadInput
from sandbox.results.jsonable import to_jsonable

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
