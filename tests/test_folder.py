"""One run folder holds one configuration (`sandbox.results.open_run_dir`): for every command that
writes a run folder, a changed setting is refused with one line naming --out, the folder and the
first differing field; the same settings resume; --overwrite replaces the folder whole."""

import json

import pandas as pd
import pytest

from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.results import config_difference, is_run_folder, replace_run_dir

SMALL = ["--domains", "2", "--slots", "3", "--dim", "6", "--rank", "2", "--true-rank", "1", "--context-dim", "4",
         "--steps", "20", "--interval", "5", "--population", "4", "--plasticity", "0", "--tune", "off"]
#: tests/test_factorial.py's tiny cell settings.
TINY = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


def refused(capsys, out, field, old, new) -> str:
    """The one-line refusal: names --out, the folder, the field and both values."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: --out '{out}'"), err
    assert f"whose {field} is {old}; this run's is {new}" in err, err
    assert "--overwrite" in err
    return err


def snapshot(folder) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".sandbox.lock"}


def test_config_difference_names_the_first_field_and_ignores_resume_settings():
    old = {"task": {"dim": 6, "slots": 3}, "solver": {"lr": 0.05, "device": "cpu"}, "cache": "a", "seeds": [0, 1]}
    assert config_difference(old, old) is None
    assert config_difference(old, {**old, "cache": "b", "solver": {"lr": 0.05, "device": "cuda"}}) is None
    # more seeds grow the run (the recorded seeds' results stay); a dropped seed is a difference
    assert config_difference(old, {**old, "seeds": [0, 1, 2]}) is None
    assert config_difference(old, {**old, "seeds": [1, 2]}) == ("seeds", [0, 1], [1, 2])
    cells = {"cells": ["B3", "R"], "base": {"lr": 0.003}}
    assert config_difference(cells, {**cells, "cells": ["B3", "R", "R+L"]}) is None    # a factorial's cells grow too
    assert config_difference(cells, {**cells, "cells": ["B3"]}) == ("cells", ["B3", "R"], ["B3"])
    assert config_difference(old, {**old, "seeds": [0, 1, 2], "task": {"dim": 7, "slots": 3}}) == ("task.dim", 6, 7)
    assert config_difference(old, {**old, "task": {"dim": 7, "slots": 4}}) == ("task.dim", 6, 7)
    # a field added since the folder was written: no difference at its default, one otherwise
    new = {**old, "solver": {"lr": 0.05, "device": "cpu", "acar": False}}
    assert config_difference(old, new, defaults={"solver": {"acar": False}}) is None
    assert config_difference(old, {**new, "solver": {**new["solver"], "acar": True}},
                             defaults={"solver": {"acar": False}}) == ("solver.acar", "<absent>", True)
    # a field this version no longer has is not a difference
    assert config_difference({**old, "gone": 1}, old) is None


def test_analytic_sweep_refuses_a_changed_setting_resumes_the_same_and_overwrites(tmp_path, capsys):
    out = tmp_path / "map"
    args = ["sweep", "--out", str(out), "--points", "2", "--seeds", "2", *SMALL]
    assert main(args) == 0
    assert (out / "figures" / "regime_curve.png").exists()
    before = snapshot(out)
    capsys.readouterr()
    # another setting (and --no-figures, which alone would not count): refused, nothing touched
    assert main([*args, "--lr", "0.02", "--no-figures"]) == 2
    refused(capsys, out, "solver.lr", "0.05", "0.02")
    assert snapshot(out) == before
    # the same configuration with other run-time settings resumes
    assert main([*args, "--no-figures", "--threads", "2", "--chunk-rows", "0", "--device", "cpu"]) == 0
    assert "0 seed-points computed, 4 reused" in capsys.readouterr().out
    assert len(json.loads((out / "manifest.json").read_text())["resumes"]) == 1
    # --overwrite replaces the folder whole: the stale figure and the old journal are gone
    assert main([*args, "--lr", "0.02", "--no-figures", "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "4 seed-points computed, 0 reused" in text
    assert f"--overwrite: {out} replaced ({len(before)} files of the run started" in text.replace("\n", "")
    assert not (out / "figures").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["solver"]["lr"] == 0.02 and m["resumes"] == [] and "--overwrite" in m["argv"]
    assert m["overwritten"]["removed"] == len(before) and m["overwritten"]["previous"] is not None
    assert len(pd.read_csv(out / "results.csv")) == 2 * 2 * 5
    # resuming the replaced folder keeps the record of the overwrite
    assert main([*args, "--lr", "0.02", "--no-figures"]) == 0
    assert json.loads((out / "manifest.json").read_text())["overwritten"] == m["overwritten"]


def test_overwrite_never_empties_a_folder_that_is_not_a_run_folder(tmp_path, capsys):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.csv").write_text("a,b\n")
    assert main(["sweep", "--out", str(mine), "--points", "1", "--seeds", "1", *SMALL, "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --out '{mine}'") and "nothing in it is removed" in err
    assert (mine / "thesis.tex").read_text() == "precious" and (mine / "sub" / "data.csv").exists()
    assert not is_run_folder(mine)
    # a damaged manifest is not ours either
    (mine / "manifest.json").write_text("{not json")
    with pytest.raises(BadInput, match="nothing in it is removed"):
        replace_run_dir(mine)
    assert (mine / "thesis.tex").exists()
    # an empty (new) folder is fine
    assert main(["sweep", "--out", str(tmp_path / "new"), "--points", "1", "--seeds", "1", *SMALL, "--no-figures",
                 "--overwrite"]) == 0
    assert json.loads((tmp_path / "new" / "manifest.json").read_text())["overwritten"]["removed"] == 0


def test_substrate_sweep_refuses_resumes_and_overwrites(tmp_path, cache, capsys):
    out = tmp_path / "sub"
    args = ["sweep", "--system", "substrate", "--out", str(out), "--points", "1", "--seeds", "1", "--steps", "4",
            "--batch", "2", "--preset", "tiny", "--population", "4", "--device", "cpu", "--cache", cache]
    assert main([*args, "--no-figures"]) == 0
    (out / "figures").mkdir()
    (out / "figures" / "stale.png").write_bytes(b"old")
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "--population", "6", "--no-figures"]) == 2
    refused(capsys, out, "arms.evolution.population", "4", "6")
    assert snapshot(out) == before
    assert main([*args, "--no-figures", "--cache", cache + "/."]) == 0       # another --cache spelling: a resume
    assert "0 seed-points computed, 1 reused" in capsys.readouterr().out
    assert main([*args, "--population", "6", "--no-figures", "--overwrite"]) == 0
    assert "1 seed-points computed, 0 reused" in capsys.readouterr().out
    assert not (out / "figures").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["arms"]["evolution"]["population"] == 6 and m["overwritten"]["removed"] >= 4


def test_factorial_refuses_resumes_and_overwrites(tmp_path, cache, capsys):
    out = tmp_path / "fact"
    args = ["factorial", "--cells", "B3", "--seeds", "1", "--out", str(out), "--cache", cache, "--no-figures", *TINY]
    assert main(args) == 0
    assert (out / "trials" / "B3_s0" / "metrics.json").exists()
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "--lr", "0.02"]) == 2
    refused(capsys, out, "base.lr", "0.003", "0.02")
    assert snapshot(out) == before
    assert main([*args, "--threads", "1"]) == 0
    assert "0 computed, 1 reused" in capsys.readouterr().err
    assert main([*args, "--seeds", "2"]) == 0        # a seed added grows the run in place
    assert "1 computed, 1 reused" in capsys.readouterr().err
    assert main([*args, "--seeds", "1,"]) == 2       # a recorded seed dropped is another configuration
    refused(capsys, out, "base.seed", "0", "1")   # the template carries the first seed
    (out / "trials" / "B3_s0" / "checkpoint.pt").write_bytes(b"stale")
    assert main([*args, "--lr", "0.02", "--overwrite"]) == 0
    text = capsys.readouterr().err
    assert "1 computed, 0 reused" in text and "--overwrite: " in text and " replaced (" in text
    assert not (out / "trials" / "B3_s0" / "checkpoint.pt").exists()
    m = json.loads((out / "manifest.json").read_text())
    assert m["config"]["base"]["lr"] == 0.02 and m["overwritten"]["removed"] >= len(before)


def test_full_refuses_a_seed_folder_of_another_config_before_any_seed_runs(tmp_path, cache, capsys):
    out = tmp_path / "full"
    args = ["full", "--cell", "B3", "--seeds", "0,", "--out", str(out), "--cache", cache, *TINY]
    assert main(args) == 0
    assert (out / "seed-0" / "figures").is_dir()
    before = snapshot(out)
    capsys.readouterr()
    # seed 1 is new, but seed 0's folder holds another lr: refused before seed 0 or 1 runs
    assert main([*args[:4], "0,1", *args[5:], "--lr", "0.02"]) == 2
    refused(capsys, out / "seed-0", "lr", "0.003", "0.02")
    assert snapshot(out) == before and not (out / "seed-1").exists()
    assert main([*args[:4], "0,1", *args[5:]]) == 0    # the same config: seed 0 is reused, seed 1 runs
    assert (out / "seed-1" / "metrics.json").exists()
    assert main([*args, "--lr", "0.02", "--overwrite"]) == 0
    assert not (out / "seed-1").exists()              # the parent was replaced whole
    m = json.loads((out / "seed-0" / "manifest.json").read_text())
    assert m["config"]["lr"] == 0.02 and m["overwritten"]["removed"] > 0


def test_fusion_refuses_resumes_and_overwrites(tmp_path, cache, capsys):
    out = tmp_path / "fusion"
    args = ["fusion", "--specialist-steps", "1", "--seeds", "1", "--router-steps", "2", "--preset", "tiny",
            "--device", "cpu", "--cache", cache, "--out", str(out)]
    assert main([*args, "--no-figures"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert main([*args, "--router-steps", "3", "--no-figures"]) == 2
    refused(capsys, out, "base.router_steps", "2", "3")
    assert snapshot(out) == before
    assert main([*args, "--no-figures"]) == 0
    assert "0 point-seeds computed, 1 reused" in capsys.readouterr().out
    assert main([*args, "--router-steps", "3", "--no-figures", "--overwrite"]) == 0
    assert "1 point-seeds computed, 0 reused" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["config"]["base"]["router_steps"] == 3
    # `sandbox report` reads a fusion folder: the gain-vs-divergence figure and the fit table
    capsys.readouterr()
    assert main(["report", str(out)]) == 0
    assert (out / "figures" / "fusion.png").is_file() and "fusion fit" in capsys.readouterr().out


def test_notebook_api_refuses_and_overwrites_like_the_command(tmp_path):
    from dataclasses import replace

    from sandbox.analytic import AnalyticConfig
    from sandbox.app import api
    from sandbox.tasks import TaskSpec
    from sweeps.grid import SweepConfig
    from sandbox.tuning import TuneConfig

    cfg = SweepConfig(task=TaskSpec(domains=2, slots=3, dim=6, rank=2, true_rank=1, context_dim=4),
                      solver=AnalyticConfig(steps=20, interval=5, population=4, plasticity=0.0), points=1, seeds=(0,),
                      tune=TuneConfig(mode="off"))
    api.sweep(cfg, tmp_path / "nb")
    other = replace(cfg, eps=0.02)
    with pytest.raises(BadInput, match=r"whose eps is 0\.01; this run's is 0\.02"):
        api.sweep(other, tmp_path / "nb")
    run = api.sweep(other, tmp_path / "nb", overwrite=True)
    assert run.manifest["config"]["eps"] == 0.02 and run.manifest["overwritten"]["removed"] > 0


def test_a_replay_does_not_carry_overwrite_over(tmp_path):
    from sandbox.app import replay

    m = tmp_path / "manifest.json"
    m.write_text(json.dumps({"argv": ["sandbox", "sweep", "--out", "x", "--overwrite"], "config": {}}))
    words, _, _ = replay.expand(["--config", str(m)])
    assert words == ["sweep", "--out", "x"]
    words, _, _ = replay.expand(["--config", str(m), "--overwrite"])
    assert words == ["sweep", "--out", "x", "--overwrite"]
