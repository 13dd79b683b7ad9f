"""One name, one meaning: `--search-every` (the search's schedule and the controls on it) and
`--lifecycle-every` (lifecycle events), with `--interval` kept as a hidden, noted old name that
means what it meant on each command; old manifests replay and old folders resume."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sandbox import analytic as an
from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.tasks import TaskSpec

SPEC = TaskSpec(domains=3, slots=4, dim=6, rank=2, true_rank=2, alignment=0.3)


def _lifecycle_steps(cfg: an.AnalyticConfig) -> tuple[list[int], int, int]:
    """Steps of the evo arm's lifecycle events, its generations and its loss evaluations."""
    rows = an.stack_rows([(SPEC, cfg, (0, 1))])
    res = an.solve_rows(rows, "evo", diagnostics=False)
    return sorted({e["step"] for e in res.events}), res.generations, res.loss_evals


def test_an_equal_lifecycle_schedule_is_stored_as_the_one_schedule():
    from sweeps.grid import point_key

    one = an.AnalyticConfig(steps=30, interval=5, lifecycle=True)
    same = an.AnalyticConfig(steps=30, interval=5, lifecycle=True, lifecycle_every=5)
    other = an.AnalyticConfig(steps=30, interval=5, lifecycle=True, lifecycle_every=3)
    assert same.lifecycle_every is None and same == one
    assert "lifecycle_every" not in one.identity()                      # keys from before the split hold
    assert point_key(SPEC, same) == point_key(SPEC, one) != point_key(SPEC, other)
    assert other.identity()["lifecycle_every"] == 3
    assert (other.lifecycle_config.interval, other.lifecycle_config.min_age) == (3, 3)   # min age follows it
    assert (one.lifecycle_config.interval, one.lifecycle_config.min_age) == (5, 5)
    with pytest.raises(BadInput, match="--lifecycle-every"):
        an.AnalyticConfig(lifecycle_every=0)


def test_lifecycle_events_follow_their_own_schedule():
    base = dict(steps=30, population=4, lifecycle=True, plasticity=0.1)
    steps, gens, evals = _lifecycle_steps(an.AnalyticConfig(interval=10, **base))
    assert (steps, gens) == ([10, 20], 3)                 # one schedule: after generations 1 and 2 (not at the end)
    steps, gens, evals = _lifecycle_steps(an.AnalyticConfig(interval=10, lifecycle_every=7, **base))
    assert (steps, gens) == ([7, 14, 21, 28], 3)          # the search keeps its 3 generations
    cfg = an.AnalyticConfig(interval=31, lifecycle_every=6, **base)
    steps, gens, evals = _lifecycle_steps(cfg)
    assert (steps, gens) == ([6, 12, 18, 24], 0)          # lifecycle events with no generation at all
    assert evals == an.evo_evaluations(SPEC, cfg) == 30 + 4 * (4 + 1)


def test_the_lifecycle_schedule_moves_only_the_evo_arm():
    base = an.AnalyticConfig(steps=20, interval=5, population=4, lifecycle=True)
    moved = an.AnalyticConfig(steps=20, interval=5, population=4, lifecycle=True, lifecycle_every=3)
    for arm in ("grad", "restart", "oracle"):
        a = an.solve_rows(an.stack_rows([(SPEC, base, (0, 1))]), arm, diagnostics=False)
        b = an.solve_rows(an.stack_rows([(SPEC, moved, (0, 1))]), arm, diagnostics=False)
        assert a.final_loss.tolist() == b.final_loss.tolist() and a.generations == b.generations, arm
    a = an.solve_rows(an.stack_rows([(SPEC, base, (0, 1))]), "evo", diagnostics=False)
    b = an.solve_rows(an.stack_rows([(SPEC, moved, (0, 1))]), "evo", diagnostics=False)
    assert a.generations == b.generations == 4 and a.final_loss.tolist() != b.final_loss.tolist()


SWEEP = ["sweep", "--alignment", "0..1", "--points", "2", "--seeds", "2", "--steps", "20", "--population", "4",
         "--tune", "off", "--lifecycle", "--no-figures"]


def _table(path):
    df = pd.read_csv(path)
    return df.drop(columns=[c for c in df.columns if "wall" in c])


def test_old_interval_on_the_analytic_sweep_sets_both_with_a_note(tmp_path, capsys):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*SWEEP, "--interval", "5", "--out", str(a)]) == 0
    err = capsys.readouterr().err
    assert err.count("note: --interval is the old name of --search-every and --lifecycle-every") == 1
    assert main([*SWEEP, "--search-every", "5", "--out", str(b)]) == 0
    assert "--interval" not in capsys.readouterr().err
    for t in ("results.csv", "summary.csv"):
        pd.testing.assert_frame_equal(_table(a / t), _table(b / t))
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma["config"] == mb["config"] and ma["config"]["solver"]["interval"] == 5
    assert ma["config"]["solver"]["lifecycle_every"] is None
    # a lifecycle schedule of its own changes the lifecycle, not the search
    assert main([*SWEEP, "--search-every", "5", "--lifecycle-every", "3", "--out", str(c)]) == 0
    ra, rc = _table(a / "results.csv"), _table(c / "results.csv")
    evo_a, evo_c = ra[ra["arm"] == "evo"], rc[rc["arm"] == "evo"]
    assert (evo_a["generations"].to_numpy() == evo_c["generations"].to_numpy()).all()
    assert not (evo_a["lifecycle_events"].to_numpy() == evo_c["lifecycle_events"].to_numpy()).all()
    grad_a, grad_c = ra[ra["arm"] == "grad"], rc[rc["arm"] == "grad"]
    assert grad_a["final_loss"].tolist() == grad_c["final_loss"].tolist()


def test_an_old_manifest_with_interval_replays_and_its_folder_resumes(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main([*SWEEP, "--interval", "5", "--out", str(a)]) == 0
    m = json.loads((a / "manifest.json").read_text())
    del m["config"]["solver"]["lifecycle_every"]       # as manifests written before the split record it
    (a / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["--config", str(a / "manifest.json"), "--out", str(b)]) == 0
    pd.testing.assert_frame_equal(_table(a / "summary.csv"), _table(b / "summary.csv"))
    assert main([*SWEEP, "--search-every", "5", "--out", str(a)]) == 0     # the new name resumes the old folder
    assert "0 seed-points computed" in capsys.readouterr().out
    # a replay may override one schedule: the new name wins over the recorded --interval
    assert main(["--config", str(a / "manifest.json"), "--lifecycle-every", "4", "--out", str(tmp_path / "c")]) == 0
    solver = json.loads((tmp_path / "c" / "manifest.json").read_text())["config"]["solver"]
    assert (solver["interval"], solver["lifecycle_every"]) == (5, 4)


@pytest.mark.parametrize("args, flag", [
    (["sweep", "--search-every", "0"], "--search-every"),
    (["sweep", "--lifecycle", "--lifecycle-every", "0"], "--lifecycle-every"),
    (["sweep", "--lifecycle-every", "5"], "--lifecycle-every"),          # no lifecycle: nothing reads it
    (["sweep", "--interval", "0"], "--interval"),
    (["sweep", "--system", "substrate", "--lifecycle-every", "5"], "--lifecycle-every"),
    (["full", "--cell", "L", "--lifecycle-every", "0"], "--lifecycle-every"),
])
def test_bad_schedules_are_one_line(args, flag, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and flag in err[-1] and not any("Traceback" in x for x in err)


def test_substrate_sweep_reads_interval_as_its_search_schedule():
    from sandbox.app import notes
    from sandbox.app.commands.sweep import _schedules

    notes.clear()
    assert _schedules(None, None, 7, "substrate") == (7, None)
    assert notes.pending() == ["note: --interval is the old name of --search-every on sweep --system substrate; "
                               "use the new name"]
    notes.clear()
    assert _schedules(None, None, 7, "analytic") == (7, 7)
    assert _schedules(3, None, 7, "analytic") == (3, 7)        # a new name given beside it wins for its schedule
    assert _schedules(None, None, None, "analytic") == (None, None)


def test_full_reads_lifecycle_every_and_its_old_name():
    from sandbox.app import notes
    from sandbox.app.cellopts import cell_options, cell_template
    from sandbox.app.declare import Received

    def build(**given):
        notes.clear()
        said = notes.pending()
        opts = cell_options()
        kw = {o.name: o.default for o in opts}
        kw.update({"device": "cpu", "preset": "tiny", "steps": 40, **given})
        cfg = cell_template("L", 1, Received(opts, kw), said.append)
        return cfg, said + notes.pending()

    new, said_new = build(lifecycle_every=4)
    old, said_old = build(interval=4)
    assert new == old and (new.lifecycle.interval, new.lifecycle.min_age) == (4, 8)
    assert said_new == [] and said_old == ["note: --interval is the old name of --lifecycle-every on full and "
                                           "factorial; use --lifecycle-every"]
    assert build(interval=4, lifecycle_every=6)[0].lifecycle.interval == 6   # the new name wins
    assert build()[0].lifecycle.interval == 8                                 # steps/5
    assert build(steps=10)[0].lifecycle.interval == 5                         # the default's lower bound, as --help says
    notes.clear()


def test_the_note_comes_after_the_run_and_never_beside_an_error(tmp_path, capsys):
    out = tmp_path / "s"
    assert main([*SWEEP, "--interval", "5", "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("note: --interval is the old name")          # said last, once
    (out / "trials.journal").write_text("{not json\n")
    assert main([*SWEEP, "--interval", "5", "--out", str(out)]) == 2       # a damaged ledger: refused
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error:")                # only the one-line error
    assert main(["full", "--cell", "L", "--interval", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--interval" in err


def test_help_says_the_bounds_the_default_applies(capsys):
    from sandbox.app.cellopts import AUTO
    from substrate.defaults import schedule

    assert "at least 5 and at most 250" in AUTO["lifecycle_every"]
    assert schedule(10, None, None, None, None)["interval"] == 5
    assert schedule(100_000, None, None, None, None)["interval"] == 250
