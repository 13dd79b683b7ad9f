"""`--config manifest.json` replays a recorded run: the same tables, refusals in one line."""

from __future__ import annotations

import json

import pandas as pd

from sandbox.app.cli import main
from sandbox.app.replay import first_difference

def _table(path):
    """A table without its wall-clock columns (the only thing a replay may change)."""
    df = pd.read_csv(path)
    return df.drop(columns=[c for c in df.columns if "wall" in c])


SWEEP = ["sweep", "--alignment", "0..1", "--points", "3", "--seeds", "3", "--steps", "40", "--tune", "off",
         "--no-figures"]


def test_replayed_sweep_gives_the_same_tables(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*SWEEP, "--out", str(a)]) == 0
    recorded = json.loads((a / "manifest.json").read_text())
    assert recorded["argv"] == ["sandbox", *SWEEP, "--out", str(a)]     # in-process, not pytest's argv
    assert main(["--config", str(a / "manifest.json"), "--out", str(b)]) == 0
    for table in ("results.csv", "summary.csv"):
        pd.testing.assert_frame_equal(_table(a / table), _table(b / table))
    replayed = json.loads((b / "manifest.json").read_text())
    assert replayed["config"] == recorded["config"]
    assert replayed["argv"][-2:] == ["--out", str(b)]
    # the folder itself works as the value, and the command name may be given
    c = tmp_path / "c"
    assert main(["sweep", "--config", str(a), "--out", str(c)]) == 0
    pd.testing.assert_frame_equal(_table(a / "summary.csv"), _table(c / "summary.csv"))


def test_replay_with_an_override_changes_only_that(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*SWEEP, "--out", str(a)]) == 0
    assert main(["--config", str(a), "--out", str(b), "--seeds", "4"]) == 0
    ra, rb = pd.read_csv(a / "results.csv"), pd.read_csv(b / "results.csv")
    assert sorted(rb["seed"].unique()) == [0, 1, 2, 3]
    # the seeds the two share give the same rows
    cols = ["point", "seed", "arm", "rel_excess"]
    shared = rb[rb["seed"] < 3][cols].sort_values(cols[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ra[cols].sort_values(cols[:3]).reset_index(drop=True), shared)


def test_bad_config_values_are_one_line(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "nope.json")]) == 2
    assert "--config" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not readable JSON" in err
    (tmp_path / "m.json").write_text(json.dumps({"argv": ["sandbox", "sweep"], "config": {}}))
    assert main(["factorial", "--config", str(tmp_path / "m.json")]) == 2
    assert "records `sandbox sweep`" in capsys.readouterr().err
    assert main(["sweep", "--config"]) == 2


def test_first_difference_names_the_field_and_skips_overrides():
    rec = {"solver": {"lr": 0.05, "steps": 150}, "seeds": [0, 1]}
    assert first_difference(rec, rec, []) is None
    now = {"solver": {"lr": 0.1, "steps": 150}, "seeds": [0, 1, 2]}
    assert first_difference(rec, now, ["--seeds", "3"]).startswith("solver.lr (0.05 recorded, 0.1 now)")
    assert first_difference(rec, now, ["--lr", "0.1", "--seeds", "3"]) is None
    # a field added since the manifest was written (absent there) is its default now: no difference;
    # a recorded field that is gone now still is one
    added = {"solver": {"lr": 0.05, "steps": 150, "death": "least-fit", "lifecycle_every": None}, "seeds": [0, 1]}
    assert first_difference(rec, added, []) is None
    assert first_difference(added, rec, []).startswith("solver.death ('least-fit' recorded, '<absent>' now)")


def test_a_manifest_from_before_a_field_existed_replays(tmp_path, capsys):
    """A manifest written before `death` and `lifecycle_every` existed (both removed from a recorded
    config here) replays without a difference: its command line resolves them to their defaults."""
    a = tmp_path / "a"
    assert main([*SWEEP, "--out", str(a)]) == 0
    m = json.loads((a / "manifest.json").read_text())
    for k in ("death", "lifecycle_every", "reallocation", "inherit_mode"):
        m["config"]["solver"].pop(k, None)
    (tmp_path / "old.json").write_text(json.dumps(m))
    assert main(["--config", str(tmp_path / "old.json"), "--out", str(tmp_path / "b")]) == 0


def test_replay_that_resolves_differently_exits_1(tmp_path, capsys):
    """A manifest whose recorded config no longer matches what its command line resolves to (as when
    a default moved between versions): the replay says where, and exits 1."""
    a = tmp_path / "a"
    assert main([*SWEEP, "--out", str(a)]) == 0
    m = json.loads((a / "manifest.json").read_text())
    m["config"]["solver"]["lr"] = 0.07           # what an older version's default would have recorded
    (tmp_path / "old.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["--config", str(tmp_path / "old.json"), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --config: the replay resolved differently") and "solver.lr (0.07 recorded" in err
