"""Transfer of a regime map between systems: the joined table, agreement by direction, the CLI."""

import json

import pandas as pd
import pytest

from figures import transfer


def _summary(labels, deltas, alignments=None):
    a = alignments or [i / (len(labels) - 1) for i in range(len(labels))]
    return pd.DataFrame({"point": range(len(labels)), "alignment": a, "mean_delta": deltas,
                         "ci_low": [d - 0.01 for d in deltas], "ci_high": [d + 0.01 for d in deltas], "regime": labels})


def test_agreement_is_by_direction_and_unknown_when_inconclusive_or_missing():
    first = _summary(["no-room", "beats<eps", "beats", "degrades"], [0.0, 0.004, 0.05, -0.02])
    second = _summary(["ties", "beats", "inconclusive"], [0.001, 0.03, 0.0], alignments=[0.0, 1 / 3, 2 / 3])
    df = transfer.collect(first, second, names=("analytic", "substrate"))
    assert list(df["alignment"]) == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert list(df["agree"]) == [True, True, None, None]
    assert df.loc[3, "label_substrate"] != df.loc[3, "label_substrate"]          # NaN: missing from the map
    fig = transfer.plot(df)
    assert fig.encoding["agree"] == [True, True, None, None]


def test_heatmaps_are_refused():
    heat = pd.concat([_summary(["ties", "ties"], [0, 0]), _summary(["ties", "ties"], [0, 0])])
    with pytest.raises(ValueError, match="one-axis"):
        transfer.collect(heat, _summary(["ties", "ties"], [0, 0]))


def test_report_with_two_folders_writes_transfer(tmp_path, capsys):
    from sandbox.app.cli import main

    for name, system, labels in (("a", "analytic", ["ties", "beats"]), ("b", "substrate", ["ties", "degrades"])):
        d = tmp_path / name
        d.mkdir()
        _summary(labels, [0.0, 0.02]).to_csv(d / "summary.csv", index=False)
        (d / "manifest.json").write_text(json.dumps({"command": "sweep", "system": system}))
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t")]) == 0
    t = pd.read_csv(tmp_path / "t" / "transfer.csv")
    assert list(t["agree"]) == [True, False] and "label_substrate" in t
    assert (tmp_path / "t" / "figures" / "transfer.png").exists()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "nowhere")]) == 2
