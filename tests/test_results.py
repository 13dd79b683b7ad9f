"""Run folders, manifests and atomic writes."""

import json
import os
from dataclasses import dataclass

import pandas as pd
import pytest

from sandbox.results import RunDir, atomic_open, atomic_write_csv, config_hash, default_out


@dataclass(frozen=True)
class Cfg:
    a: float = 0.5
    name: str = "x"


def test_manifest_contents_and_resume(tmp_path):
    run = RunDir.create(tmp_path / "r", command="sweep", config=Cfg(), seeds=[42, 137], argv=["sandbox", "sweep"])
    m = run.read_manifest()
    assert m["command"] == "sweep" and m["config"] == {"a": 0.5, "name": "x"} and m["seeds"] == [42, 137]
    assert m["argv"] == ["sandbox", "sweep"] and m["ended"] is None and m["resumes"] == []
    assert m["versions"]["torch"] and m["versions"]["python"]
    assert "git_revision" in m
    run.finish(points=3)
    m2 = run.read_manifest()
    assert m2["ended"] and m2["points"] == 3
    again = RunDir.create(tmp_path / "r", command="sweep", config=Cfg(), seeds=[42, 137])
    m3 = again.read_manifest()
    assert m3["started"] == m["started"] and len(m3["resumes"]) == 1


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    p = tmp_path / "t.csv"
    atomic_write_csv(p, [{"x": 1}])
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("partial garbage")
            raise RuntimeError("killed")
    assert pd.read_csv(p).to_dict("records") == [{"x": 1}]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".tmp")] == []


def test_config_hash_is_stable_and_default_out_deterministic():
    assert config_hash(Cfg()) == config_hash(Cfg())
    assert config_hash(Cfg()) != config_hash(Cfg(a=0.6))
    assert default_out("sweep", Cfg()) == default_out("sweep", Cfg())


def test_json_handles_numpy_and_nan(tmp_path):
    import numpy as np

    run = RunDir.create(tmp_path / "r", command="x", config={"v": np.float64(1.5), "n": float("nan")})
    cfg = json.loads((tmp_path / "r" / "manifest.json").read_text())["config"]
    assert cfg == {"v": 1.5, "n": None}
