"""The plain JSON form of configs and results (`to_jsonable`) and its short hash (`config_hash`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

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


def config_hash(config: Any, n: int = 10) -> str:
    """Short stable hash of a config (its JSON form), for cache keys and default folders."""
    import hashlib

    blob = json.dumps(to_jsonable(config), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
