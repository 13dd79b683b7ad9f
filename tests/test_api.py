"""The notebook API (`sandbox.app.api`): the same configs as the CLI give the CLI's tables, as
DataFrames, in the CLI's own folder (so the two resume each other)."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest

from sandbox.app import api
from sandbox.app.cli import main
from sandbox.analytic import AnalyticConfig
from sandbox.results import default_out, read_manifest_file, to_jsonable
from sandbox.tasks import TaskSpec
from sandbox.tuning import TuneConfig
from sweeps.grid import SweepConfig

#: A fast analytic sweep: 3 points x 2 seeds, tuning off.
FLAGS = ["--points", "3", "--seeds", "2", "--steps", "20", "--population", "4", "--domains", "2", "--slots", "2",
         "--dim", "8", "--rank", "2", "--true-rank", "1", "--context-dim", "4", "--draws", "2", "--eval-draws", "4",
         "--tune", "off", "--no-figures"]


def _config() -> SweepConfig:
    """FLAGS as the config the notebook user writes."""
    task = replace(TaskSpec(), domains=2, slots=2, dim=8, rank=2, true_rank=1, context_dim=4, alignment=0.0)
    solver = replace(AnalyticConfig(), steps=20, population=4, draws=2, eval_draws=4)
    return SweepConfig(task=task, solver=solver, points=3, seeds=(0, 1), tune=replace(TuneConfig(), mode="off"))


def _timeless(df: pd.DataFrame) -> pd.DataFrame:
    """A table without its timing columns (the only ones two runs of the same config differ in)."""
    return df.drop(columns=[c for c in df.columns if c.startswith("wall") or c in ("tokens_per_s", "flops_per_s", "mfu")])


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "cli"
    assert main(["sweep", *FLAGS, "--out", str(out)]) == 0
    return out


def test_sweep_equals_the_clis_tables(cli_sweep, tmp_path):
    cfg = _config()
    assert to_jsonable(cfg) == read_manifest_file(cli_sweep / "manifest.json")["config"]   # the same config
    run = api.sweep(cfg, tmp_path / "nb")
    assert set(run.tables) == {"results", "summary"} and run.folder == tmp_path / "nb"
    for name in ("results", "summary"):
        cli = pd.read_csv(cli_sweep / f"{name}.csv")
        pd.testing.assert_frame_equal(_timeless(run.tables[name]), _timeless(cli))
    assert run.summary is run.tables["summary"] and len(run.results) == 3 * 2 * run.results["arm"].nunique()
    assert run.manifest["argv"] == ["sandbox.app.api", "sweep"]
    with pytest.raises(AttributeError, match="no such table"):
        run.curves


def test_sweep_resumes_the_clis_folder_and_computes_nothing(cli_sweep):
    before = pd.read_csv(cli_sweep / "summary.csv")
    run = api.sweep(_config(), cli_sweep)
    assert (run.manifest["computed"], run.manifest["reused"]) == (0, 3 * 2)
    pd.testing.assert_frame_equal(run.summary, before)


def test_default_folder_is_the_clis(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["sweep", *FLAGS]) == 0
    folder = default_out("sweep", _config().folder_key())
    assert (tmp_path / folder / "summary.csv").is_file()
    run = api.load(folder)
    assert run.folder == folder and {"results", "summary"} <= set(run.tables)


def test_report_returns_the_printed_tables(cli_sweep, capsys):
    assert main(["report", str(cli_sweep)]) == 0
    printed = capsys.readouterr().out
    run = api.report(cli_sweep)
    titles = [k for k in run.tables if k not in ("results", "summary")]
    assert titles and all(t.split(" (")[0] in printed for t in titles)
    pd.testing.assert_frame_equal(run.summary, pd.read_csv(cli_sweep / "summary.csv"))


def test_load_refuses_a_missing_folder(tmp_path):
    from sandbox.errors import BadInput

    with pytest.raises(BadInput, match="folder"):
        api.load(tmp_path / "nope")


#: tests/test_factorial.py's tiny cell settings.
TINY = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4"]


def test_factorial_and_full_equal_the_clis_tables(tmp_path):
    from substrate.cell import CellConfig
    from sweeps.factorial import FactorialConfig

    cache = str(tmp_path / "cache")
    assert main(["factorial", "--cells", "B3,R", "--seeds", "1", *TINY, "--device", "cpu", "--no-figures",
                 "--cache", cache, "--out", str(tmp_path / "cli")]) == 0
    manifest = read_manifest_file(tmp_path / "cli" / "manifest.json")
    base = CellConfig.of(cell="B3", seed=0, preset="tiny", steps=4, slots=4, rank=4, batch=2, eval_windows=2,
                         interval=2, min_age=0, fit_windows=1, pretrain_steps=20, eval_every=4, checkpoint_every=4,
                         device="cpu", bases=3)   # the CLI's default on tiny (substrate.defaults.PRESET_BASES)
    fcfg = FactorialConfig(base=base, cells=("B3", "R"), seeds=(0,))
    assert to_jsonable(fcfg) == manifest["config"]
    run = api.factorial(fcfg, tmp_path / "nb", cache=cache)
    for name in ("cells", "attribution"):
        pd.testing.assert_frame_equal(_timeless(run.tables[name]), _timeless(pd.read_csv(tmp_path / "cli" / f"{name}.csv")))
    one = api.full(replace(base, cell="R"), tmp_path / "full", cache=cache)
    cli_cell = run.cells[run.cells["cell"] == "R"].reset_index(drop=True)
    assert "seed-0/curves" in one.tables
    assert one.manifest == {} and (tmp_path / "full" / "seed-0" / "metrics.json").is_file()
    import json

    metrics = json.loads((tmp_path / "full" / "seed-0" / "metrics.json").read_text())
    assert metrics["balanced_log_ppl"] == pytest.approx(float(cli_cell["balanced_log_ppl"][0]), rel=0, abs=1e-12)
