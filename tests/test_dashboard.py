"""Studies as optuna-dashboard reads them: loaded through Optuna's public API the way the dashboard
opens a storage (a journal file path, a PostgreSQL URL), each study names its value
(``metric_names``) and each trial carries readable attributes (system, point, seed, arm, metric)."""

import math

import optuna
import pytest

from sandbox.app.cli import main
from sweeps import ledger

SMALL = ["--domains", "2", "--slots", "3", "--dim", "6", "--rank", "2", "--true-rank", "1", "--context-dim", "4",
         "--steps", "20", "--interval", "5", "--population", "4", "--plasticity", "0", "--tune", "off"]
TINY = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]


def journal(path) -> optuna.storages.JournalStorage:
    """What optuna-dashboard builds for a file path (Optuna's own journal backend and lock)."""
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def dashboard_rdb(url: str) -> optuna.storages.RDBStorage:
    """What optuna-dashboard builds for a database URL (the driver named, as docs/dashboard.md says)."""
    url = url.replace("postgresql://", "postgresql+psycopg://", 1)
    return optuna.storages.RDBStorage(url, skip_compatibility_check=True, skip_table_creation=True)


def check_sweep_trials(study, system, n):
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n
    for t in trials:
        a = t.user_attrs
        assert a["system"] == system and a["arm"] == "evo vs grad" and isinstance(a["seed"], int)
        assert a["point"] == ledger.point_label(a["axes"]) and a["point"].startswith("alignment=")
        assert a["metric"] == ledger.METRICS[system]
        assert t.value is None or math.isclose(t.value, a["delta"])      # the value the metric names
    return trials


def test_a_run_folders_journal_reads_with_named_value_and_labelled_trials(tmp_path):
    out = tmp_path / "map"
    assert main(["sweep", "--out", str(out), "--points", "2", "--axis", "plasticity=0..0.1", "--axis-points", "2",
                 "--seeds", "2", "--no-figures", *SMALL]) == 0
    store = journal(out / "trials.journal")
    [summary] = optuna.get_all_study_summaries(store)        # the dashboard's study list
    assert summary.study_name == "sweep" and summary.n_trials == 8
    study = optuna.load_study(study_name="sweep", storage=store)
    assert study.metric_names == [ledger.METRICS["analytic"]]
    trials = check_sweep_trials(study, "analytic", 8)
    assert {t.user_attrs["point"] for t in trials} == {"alignment=0, plasticity=0", "alignment=0, plasticity=0.1",
                                                       "alignment=1, plasticity=0", "alignment=1, plasticity=0.1"}
    # the labels are readers' only: the ledger reads the same keys and rows as before
    done = ledger.finished(study)
    assert len(done) == 8 and all(k == f"{v['point_key']}:{v['seed']}" for k, v in done.items())


def test_a_factorial_ledger_names_its_value_and_cells(tmp_path, tmp_path_factory):
    out = tmp_path / "fact"
    assert main(["factorial", "--cells", "B3,R", "--seeds", "1", "--out", str(out), "--no-figures",
                 "--cache", str(tmp_path_factory.mktemp("cache")), *TINY]) == 0
    store = journal(out / "ledger.journal")
    [summary] = optuna.get_all_study_summaries(store)
    study = optuna.load_study(study_name=summary.study_name, storage=store)
    assert study.metric_names == [ledger.METRICS["factorial"]]
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.user_attrs["arm"] for t in trials) == ["B3", "R"]
    for t in trials:
        a = t.user_attrs
        assert a["system"] == "factorial" and a["cell"] == a["arm"] and a["seed"] == 0
        assert t.value == pytest.approx(a["result"]["balanced_log_ppl"])


def test_a_postgresql_study_reads_with_named_value_and_labelled_trials(pg_url, tmp_path):
    study_name = f"dash-{tmp_path.name}"
    assert main(["sweep", "--out", str(tmp_path / "map"), "--points", "2", "--seeds", "2", "--no-figures",
                 "--storage", pg_url, "--study", study_name, *SMALL]) == 0
    store = dashboard_rdb(pg_url)
    assert study_name in {s.study_name for s in optuna.get_all_study_summaries(store)}
    study = optuna.load_study(study_name=study_name, storage=store)
    assert study.metric_names == [ledger.METRICS["analytic"]]
    check_sweep_trials(study, "analytic", 4)
    # the define step names a planned study's value too (its trials come from `sandbox worker`)
    planned = f"plan-{tmp_path.name}"
    assert main(["sweep", "--points", "2", "--seeds", "1", "--storage", pg_url, "--study", planned, "--enqueue-only",
                 *SMALL]) == 0
    plan = optuna.load_study(study_name=planned, storage=store)
    assert plan.metric_names == [ledger.METRICS["analytic"]]
    # the planned trials (run later by `sandbox worker`) carry the same labels while they wait
    waiting = plan.get_trials(deepcopy=False)
    assert len(waiting) == 2 and all(t.state == optuna.trial.TrialState.WAITING for t in waiting)
    for t in waiting:
        a = t.user_attrs
        assert a["system"] == "analytic" and a["arm"] == "evo vs grad" and a["point"] == ledger.point_label(a["axes"])
        assert a["metric"] == ledger.METRICS["analytic"]


def test_a_study_written_before_the_labels_still_resumes(tmp_path):
    """A journal whose trials have no labels and whose study has no metric name (an older release):
    a resume reads every trial (nothing computed again) and names the study's value."""
    from sandbox.analytic import AnalyticConfig
    from sandbox.tasks import TaskSpec
    from sandbox.tuning import TuneConfig
    from sweeps import grid

    cfg = grid.SweepConfig(task=TaskSpec(domains=2, slots=3, dim=6, rank=2, true_rank=1, context_dim=4),
                           solver=AnalyticConfig(steps=20, interval=5, population=4, plasticity=0.0), points=2,
                           seeds=(0, 1), tune=TuneConfig(mode="off"))
    out = tmp_path / "old"
    old = ledger.open_study(ledger.storage_for(out, None), "sweep")
    for plan in grid.plan_points(cfg, cfg.grid_points(), old):
        recs = grid.evaluate_point(plan.spec, plan.solver, list(plan.seeds))
        ledger.record(old, plan.key, plan.values, cfg.bounds(), recs)         # no labels: as before them
    from sandbox.results import release_run_dir

    release_run_dir(out)
    assert old.metric_names in (None, [None]) and "system" not in old.get_trials()[0].user_attrs
    res = grid.run_sweep(cfg, out, figures=False)
    assert res.computed == 0 and res.reused == 4
    study = optuna.load_study(study_name="sweep", storage=journal(out / "trials.journal"))
    assert study.metric_names == [ledger.METRICS["analytic"]]
    assert ledger.label_study(study, ledger.METRICS["analytic"]) is False    # named once, not rewritten
