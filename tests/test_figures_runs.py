"""figures.curves.collect_runs / plot_runs: several runs' balanced curves, one line per (run, cell)."""

import pandas as pd
import pytest


def test_collect_runs_means_over_seeds_and_plot_encodes_each_line():
    from figures.curves import collect_runs, plot_runs

    def table(shift):
        rows = []
        for cell in ("B3", "R", "R+L"):
            for seed in (1, 2):
                for step in (0, 10):
                    rows.append({"domain": "balanced", "cell": cell, "seed": seed, "step": step,
                                 "log_ppl": 5 + shift + seed * 0.1 - step * 0.01})
                    rows.append({"domain": "d0", "cell": cell, "seed": seed, "step": step, "log_ppl": 9.0})
        return pd.DataFrame(rows)

    df = collect_runs({"fair": table(0.0), "zero": table(0.2)})
    assert set(df["run"]) == {"fair", "zero"} and set(df["cell"]) == {"B3", "R"}
    v = df[(df["run"] == "zero") & (df["cell"] == "R") & (df["step"] == 0)]["log_ppl"].item()
    assert v == pytest.approx(5.2 + 0.15)
    fig = plot_runs(df, base=5.0)
    assert set(fig.encoding["lines"]) == {(r, c) for r in ("fair", "zero") for c in ("B3", "R")}
