"""Replicates that resample the base (issue 26, part 4) and training data that is not re-read (part 3):
base-level statistics against scipy's paired t, the seed -> base mapping and its identity, a tiny
factorial on two bases end to end and resumed, fresh windows, the counted epochs and the warning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from sandbox import replicates, stats
from sandbox.app.cli import main
from sandbox.errors import BadInput
from sandbox.results import config_hash
from substrate.cell import CellConfig, data_check, prepare_substrate, revisit_warning, run_cell
from substrate.corpus import fresh_batch, mixed_windows, sample_batch, sample_windows
from substrate.defaults import MAX_EPOCHS

# ---------------------------------------------------------------------------------------------
# Base-level statistics on hand-made tables
# ---------------------------------------------------------------------------------------------

#: (base, seed) -> (B3, R): 3 bases x 2 seeds, the bases' levels far apart and their contrasts too.
HAND = {(0, 0): (4.10, 4.12), (0, 3): (4.14, 4.15), (1, 1): (4.50, 4.49), (1, 4): (4.46, 4.44),
        (2, 2): (3.90, 3.93), (2, 5): (3.96, 3.97)}


def _table(values=HAND, cells=("B3", "R")) -> pd.DataFrame:
    return pd.DataFrame([{"cell": c, "seed": s, "base": b, "balanced_log_ppl": v[i]}
                         for (b, s), v in values.items() for i, c in enumerate(cells)])


def test_base_level_router_contrast_is_scipys_paired_t_on_the_base_means():
    att = replicates.attribution(_table()).set_index("contrast")
    r = att.loc["router"]
    b3 = np.array([np.mean([HAND[k][0] for k in HAND if k[0] == b]) for b in range(3)])
    rr = np.array([np.mean([HAND[k][1] for k in HAND if k[0] == b]) for b in range(3)])
    ref = sps.ttest_rel(b3, rr)
    d = b3 - rr
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / math.sqrt(3)
    assert (r["unit"], r["bases"], r["n"], r["df"]) == ("base", 3, 3, 2)
    assert r["mean_delta"] == pytest.approx(d.mean(), abs=1e-12)
    assert r["t"] == pytest.approx(ref.statistic, rel=1e-10)
    assert r["p"] == pytest.approx(ref.pvalue, rel=1e-10)
    assert (r["ci_low"], r["ci_high"]) == (pytest.approx(d.mean() - half, abs=1e-12), pytest.approx(d.mean() + half, abs=1e-12))
    # across seeds the same table looks far more certain: 6 "independent" pairs
    per_seed = stats.attribution(_table()).set_index("contrast").loc["router"]
    assert per_seed["n"] == 6 and per_seed["ci_high"] - per_seed["ci_low"] < r["ci_high"] - r["ci_low"]


def test_a_diverged_seed_leaves_its_base_for_every_cell_and_a_base_without_seeds_is_a_diverged_pair():
    t = _table()
    t.loc[(t["seed"] == 3) & (t["cell"] == "R"), "balanced_log_ppl"] = math.nan
    means = replicates.base_means(t).set_index(["cell", "base"])
    assert means.loc[("B3", 0), "balanced_log_ppl"] == pytest.approx(4.10)      # seed 3 gone from B3 too
    assert (means.loc[("B3", 0), "seeds"], means.loc[("B3", 0), "seeds_dropped"]) == (1, 1)
    t.loc[(t["seed"] == 0) & (t["cell"] == "B3"), "diverged"] = True
    r = replicates.attribution(t).set_index("contrast").loc["router"]
    assert (r["n"], r["n_diverged"]) == (2, 1)


def test_one_base_is_the_seed_level_statistics_and_says_it_is_conditional():
    one = _table({k: v for k, v in HAND.items() if k[0] == 1})
    att = replicates.attribution(one)
    pd.testing.assert_frame_equal(att.drop(columns=["unit", "bases"]), stats.attribution(one))
    assert set(att["unit"]) == {"seed"}
    rep = replicates.replication(one)
    assert rep["unit"] == "seed" and "conditional on one base (base 1)" in rep["statement"]
    many = replicates.replication(_table(), requested=3)
    assert (many["bases"], many["seeds_per_base"], many["statement"]) == (
        3, {"0": 2, "1": 2, "2": 2}, "CIs across 3 bases (seeds averaged within each base first)")
    no_column = one.drop(columns=["base"])
    assert replicates.replication(no_column)["statement"].startswith("conditional on one base (base 0)")


def test_contrasts_table_carries_each_seeds_base():
    long = replicates.contrasts(_table())
    assert list(long.columns) == ["contrast", "base", "seed", "delta"]
    row = long[(long["contrast"] == "router") & (long["seed"] == 4)].iloc[0]
    assert row["base"] == 1 and row["delta"] == pytest.approx(4.46 - 4.44)


# ---------------------------------------------------------------------------------------------
# Seed -> base, and the identities
# ---------------------------------------------------------------------------------------------


def test_seed_adapts_base_seed_mod_bases_and_base_zero_keeps_the_old_identity():
    one = CellConfig.of(preset="tiny", steps=10, seed=6)
    three = CellConfig.of(preset="tiny", steps=10, seed=6, bases=3)
    other = CellConfig.of(preset="tiny", steps=10, seed=7, bases=3)
    assert (one.base_seed, three.base_seed, other.base_seed) == (0, 0, 1)
    assert one.identity() == three.identity() and "bases" not in three.identity()
    assert other.identity()["base_seed"] == 1
    with pytest.raises(BadInput) as e:
        CellConfig.of(preset="tiny", bases=0)
    assert e.value.flag == "--bases"


def test_factorial_refuses_several_bases_in_a_sequential_run():
    from sweeps.factorial import FactorialConfig

    with pytest.raises(BadInput) as e:
        FactorialConfig(base=CellConfig.of(preset="tiny", bases=2), seeds=(0, 1), seeds_to_resolve=4)
    assert e.value.flag == "--bases"


# ---------------------------------------------------------------------------------------------
# Training data: fresh windows, the auto choice, counted epochs and the warning
# ---------------------------------------------------------------------------------------------

TINY = dict(preset="tiny", steps=6, batch=4, slots=4, rank=4, eval_every=6, checkpoint_every=3, interval=3,
            min_age=0, fit_windows=2, eval_windows=2, pretrain_steps=20, specialist_steps=10, seed=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    torch.set_num_threads(1)
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def sub(cache):
    return prepare_substrate(CellConfig.of(**TINY), cache)


def test_train_data_resolves_to_fresh_only_when_the_fixed_windows_would_be_reread():
    assert CellConfig.of(preset="tiny", steps=100).train_data_value == "fresh"          # 1.6 reads per window
    assert CellConfig.of(preset="tiny", steps=100).expected_epochs() == pytest.approx((100 * 8 / 4 + 2 * 4) / 128)
    assert CellConfig.of(preset="small", steps=200).train_data_value == "windows"       # 0.1
    assert CellConfig.of(preset="small", steps=5000).train_data_value == "fresh"
    assert CellConfig.of(preset="tiny", steps=100, data="x").train_data_value == "windows"
    with pytest.raises(BadInput) as e:
        CellConfig.of(preset="tiny", data="x", train_data="fresh")
    assert e.value.flag == "--train-data"
    with pytest.raises(BadInput) as e:
        CellConfig.of(preset="tiny", train_data="stream")
    assert e.value.flag == "--train-data"


def test_fresh_batches_are_new_windows_from_the_generator_and_replay_by_seed(sub):
    corpus = sub.corpus
    g = lambda: torch.Generator().manual_seed(5)
    x, y, dom = fresh_batch(corpus, 64, g())
    x2, y2, dom2 = fresh_batch(corpus, 64, g())
    assert torch.equal(x, x2) and torch.equal(dom, dom2) and torch.equal(x[:, 1:], y[:, :-1])
    fixed = {tuple(w.tolist()) for split in (corpus.train, corpus.heldout) for d in split for w in d}
    rows = {tuple(torch.cat([x[i], y[i, -1:]]).tolist()) for i in range(64)}
    assert not rows & fixed and len(rows) == 64                     # none of them is a stored window
    _, _, same = sample_batch(corpus, "train", 64, g())
    assert torch.equal(same, dom)                                    # the domains are drawn as sample_batch draws them
    m = torch.full((8,), 2)
    assert torch.equal(fresh_batch(corpus, 8, g(), domains=m)[2], m)
    # all domains at once draw exactly what the corpus's own sampler draws for one domain
    for d in range(corpus.domains):
        one = mixed_windows(corpus.language, torch.full((5,), d), 20, g())
        assert torch.equal(one, sample_windows(corpus.language, d, 5, 20, g()).long())
    # domain 2's fresh windows follow domain 2's language: their true NLL is near its entropy floor
    xs, ys, _ = fresh_batch(corpus, 256, g(), domains=torch.full((256,), 2))
    nll = corpus.language.nll(2, torch.cat([xs, ys[:, -1:]], 1)).mean()
    assert float(nll) == pytest.approx(float(corpus.floors[2]), abs=0.05)


@pytest.mark.parametrize("train_data", ["windows", "fresh"])
def test_reads_are_counted_and_epochs_in_metrics(sub, tmp_path, train_data):
    cfg = CellConfig.of(**TINY, cell="R", train_data=train_data)
    m = run_cell(cfg, tmp_path / train_data, substrate=sub).metrics
    M = sub.corpus.domains
    expect = cfg.steps * cfg.batch + (cfg.steps // 3) * cfg.fit_windows * M     # adaptation + selection batches
    assert m["data"]["windows_read"] == expect and m["data"]["counted"] and m["data"]["train_data"] == train_data
    if train_data == "windows":
        assert 0 < m["train_epochs"] < 1 and m["data"]["train_windows"] == 128
    else:
        assert m["train_epochs"] == 1.0
    manifest = json.loads((tmp_path / train_data / "manifest.json").read_text())
    assert manifest["data"]["counted"] is False and manifest["data"]["revisited"] is False
    assert manifest["base_seed"] == 0


def test_a_run_that_rereads_its_windows_is_flagged_in_the_manifest_and_warned(sub, tmp_path):
    cfg = CellConfig.of(**{**TINY, "steps": 9, "batch": 300, "eval_every": 9, "checkpoint_every": 0, "interval": 9},
                        train_data="windows")
    check = data_check(cfg, sub.corpus)
    assert check["epochs"] == pytest.approx(cfg.expected_reads() / 128) and check["epochs"] > MAX_EPOCHS
    assert check["revisited"] and "5.3 times" in revisit_warning(check)
    said = []
    m = run_cell(cfg, tmp_path / "r", substrate=sub, log=said.append).metrics
    assert m["data"]["revisited"] and m["train_epochs"] > MAX_EPOCHS
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["data"]["revisited"] is True
    assert any(s.startswith("WARNING: the run reads each of its 128 training windows") for s in said)
    fresh = data_check(CellConfig.of(**{**TINY, "steps": 9, "batch": 300}), sub.corpus)   # auto: fresh
    assert (fresh["train_data"], fresh["epochs"], fresh["revisited"]) == ("fresh", 1.0, False)


# ---------------------------------------------------------------------------------------------
# A tiny factorial on two bases, end to end and resumed
# ---------------------------------------------------------------------------------------------

ARGS = ["--preset", "tiny", "--steps", "4", "--slots", "4", "--rank", "4", "--batch", "2", "--eval-windows", "2",
        "--interval", "2", "--min-age", "0", "--fit-windows", "1", "--pretrain-steps", "20", "--eval-every", "4",
        "--specialist-steps", "10", "--cells", "B3,R", "--no-figures"]


def test_factorial_on_two_bases_pairs_each_seed_on_its_base_and_resumes(tmp_path, capsys):
    cache, out = str(tmp_path / "cache"), tmp_path / "f"
    args = ["factorial", "--seeds", "0,1,2,3", "--bases", "2", "--out", str(out), "--cache", cache, *ARGS]
    assert main(args) == 0
    cells = pd.read_csv(out / "cells.csv")
    assert dict(zip(cells["seed"], cells["base"])) == {0: 0, 1: 1, 2: 0, 3: 1}
    assert len(list(Path(cache).glob("base-*.pt"))) == 2 and len(list(Path(cache).glob("specialists-*.pt"))) == 2
    # the two bases are different models: the plain base's loss differs, identical within a base
    plain = cells.groupby("base")["base_balanced_log_ppl"].agg(["min", "max"])
    assert (plain["min"] == plain["max"]).all() and plain["min"].nunique() == 2
    att = pd.read_csv(out / "attribution.csv").set_index("contrast")
    router = att.loc["router"]
    assert (router["unit"], router["bases"], router["n"]) == ("base", 2, 2)
    means = replicates.base_means(cells)
    wide = means.pivot(index="base", columns="cell", values="balanced_log_ppl")
    assert router["mean_delta"] == pytest.approx((wide["B3"] - wide["R"]).mean(), abs=1e-12)
    contrasts = pd.read_csv(out / "contrasts.csv")
    assert set(contrasts["base"]) == {0, 1} and len(contrasts[contrasts["contrast"] == "router"]) == 4
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["replication"]["statement"] == "CIs across 2 bases (seeds averaged within each base first)"
    assert manifest["replication"]["bases_requested"] == 2 and manifest["settings"]["bases"] == 2
    assert manifest["data"]["counted"] and manifest["data"]["revisited"] is False
    text = capsys.readouterr()
    assert "CIs across 2 bases" in text.out and "replication: CIs across 2 bases" in text.err
    # a rerun resumes from the ledger: nothing computed, the same tables
    assert main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["computed"], manifest["reused"]) == (0, 8)
    pd.testing.assert_frame_equal(pd.read_csv(out / "attribution.csv").drop(columns=["reason"]),
                                  att.reset_index().drop(columns=["reason"]))
    # one base: seed 0 and 2 of the same template, conditional on base 0 and said so; seed 0's trial is
    # the one the two-base run computed (base 0 keeps the identity of earlier runs)
    one = tmp_path / "one"
    assert main(["factorial", "--seeds", "0,2", "--bases", "1", "--out", str(one), "--cache", cache, *ARGS]) == 0
    c1 = pd.read_csv(one / "cells.csv")
    assert set(c1["base"]) == {0}
    same = cells[cells["seed"].isin([0, 2])].reset_index(drop=True)
    pd.testing.assert_series_equal(c1["balanced_log_ppl"], same["balanced_log_ppl"])
    rep = json.loads((one / "manifest.json").read_text())["replication"]
    assert rep["unit"] == "seed" and rep["statement"].startswith("conditional on one base (base 0)")
    assert "conditional on one base" in capsys.readouterr().out


def test_the_forest_plot_says_its_unit_of_replication():
    from figures import attribution as fig_attribution

    one_base = _table({k: v for k, v in HAND.items() if k[0] == 1})
    for table, title, n in ((_table(), "paired by base; 95% t intervals; CIs across 3 bases", "n = 3 bases"),
                            (one_base, "paired by seed; 95% t intervals; CIs across seeds of one base", "n = 2")):
        fig = fig_attribution.plot(fig_attribution.collect(replicates.attribution(table)))
        assert title in fig.axes[0].get_title(loc="left")
        texts = " | ".join(t.get_text() for t in fig.axes[1].texts)
        assert n in texts and (table is not one_base or "bases" not in texts)


def test_full_spreads_its_seeds_over_the_bases(tmp_path):
    cache, out = str(tmp_path / "cache"), tmp_path / "full"
    assert main(["full", "--cell", "B3", "--seeds", "4,5", "--bases", "2", "--out", str(out), "--cache", cache,
                 *ARGS[:-3]]) == 0
    m4, m5 = (json.loads((out / f"seed-{s}" / "metrics.json").read_text()) for s in (4, 5))
    assert (m4["base_seed"], m5["base_seed"]) == (0, 1) and "base_seed" not in m4["config"]
    assert m5["config"]["base_seed"] == 1 and m4["base_balanced_log_ppl"] != m5["base_balanced_log_ppl"]
    assert json.loads((out / "seed-5" / "manifest.json").read_text())["base_seed"] == 1
