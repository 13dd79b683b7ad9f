"""Figures are checked for what they encode, built from small synthetic tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats
import pytest
from matplotlib.colors import to_rgba

from figures import attribution, curves, gates, lineage, regime
from figures.style import REGIMES, symmetric_limits
from sandbox.results import save_figure

EPS = 0.01


def _classify(lo: float, hi: float, eps: float = EPS) -> str:
    if lo > 0:
        return "beats"
    if hi < 0:
        return "degrades"
    if -eps < lo and hi < eps:
        return "ties"
    return "inconclusive"


def sweep_summary(xs=np.linspace(0, 1, 6), ys=np.linspace(0, 1, 4), field=None, half=0.006, seed=0):
    """summary.csv rows on a grid; mean delta from `field(a, c)` (default: a - 0.5 tilted by c)."""
    rng = np.random.default_rng(seed)
    field = field or (lambda a, c: 0.06 * (a - 0.5) - 0.02 * c)
    rows = []
    for c in ys:
        for a in xs:
            m = float(field(a, c))
            h = half * (0.5 + rng.random())
            rows.append(dict(point=len(rows), alignment=a, context_noise=c, n=5, n_diverged=0, mean_delta=m,
                             se=h / 2.78, ci_low=m - h, ci_high=m + h, p_holm=0.01, eps=EPS,
                             regime=_classify(m - h, m + h)))
    return pd.DataFrame(rows)


def offsets(collection) -> set[tuple[float, float]]:
    return {(round(float(x), 9), round(float(y), 9)) for x, y in np.asarray(collection.get_offsets())}


def rows_xy(df, x, y) -> set[tuple[float, float]]:
    return {(round(float(a), 9), round(float(b), 9)) for a, b in zip(df[x], df[y])}


# ---------------------------------------------------------------------------------------------
# Regime heatmap


def test_heatmap_encodes_zero_contour_symmetric_limits_and_regime_markers():
    s = sweep_summary()
    assert set(s["regime"]) >= {"beats", "degrades", "inconclusive", "ties"}  # the test data covers all classes
    fig = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise"))
    enc = fig.encoding
    assert list(enc["zero_contour"].levels) == [0.0]
    assert enc["sign_change"] and enc["zero_contour"].get_visible()
    assert list(enc["eps_contour"].levels) == [-EPS, EPS]
    assert all(dashes for _, dashes in enc["eps_contour"].get_linestyle())      # +-eps dashed
    assert all(dashes is None for _, dashes in enc["zero_contour"].get_linestyle())  # delta = 0 solid
    vmin, vmax = enc["mesh"].get_clim()
    assert vmin == -vmax
    assert vmax == pytest.approx(np.abs(s["mean_delta"]).max())
    assert enc["mesh"].get_cmap().name == "RdBu"
    for r in REGIMES:  # each regime's markers sit exactly on that regime's rows
        assert offsets(enc["markers"][r]) == rows_xy(s[s["regime"] == r], "alignment", "context_noise")
    assert len(enc["markers"]["inconclusive"].get_facecolor()) == 0  # hollow
    for r in ("beats", "ties", "degrades"):  # filled, each in its own colour
        assert to_rgba(enc["markers"][r].get_facecolor()[0])[3] == 1.0
    assert len({tuple(enc["markers"][r].get_facecolor()[0]) for r in ("beats", "ties", "degrades")}) == 3
    base = ("beats", "ties", "degrades", "inconclusive")
    assert len({enc["markers"][r].get_paths()[0].vertices.tobytes() for r in base}) == 4  # four shapes
    assert "evolution better" in enc["colorbar"].ax.get_ylabel()
    ax = fig.axes[0]
    assert "alignment" in ax.get_xlabel() and "context noise" in ax.get_ylabel()


def test_heatmap_colours_each_cell_with_its_points_delta():
    s = sweep_summary()
    fig = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise"))
    z = np.asarray(fig.encoding["mesh"].get_array()).reshape(4, 6)  # (ny, nx), rows = context noise
    xs, ys = np.sort(s["alignment"].unique()), np.sort(s["context_noise"].unique())
    for _, r in s.iterrows():
        j, i = int(np.searchsorted(ys, r["context_noise"])), int(np.searchsorted(xs, r["alignment"]))
        assert z[j, i] == pytest.approx(r["mean_delta"])


def test_zero_contour_lies_where_the_delta_changes_sign():
    # delta = 0.05 (a - 0.45) does not depend on the second axis: the 0 contour is the line a = 0.45.
    s = sweep_summary(xs=np.linspace(0, 1, 5), ys=np.linspace(0, 1, 3), field=lambda a, c: 0.05 * (a - 0.45))
    fig = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise"))
    verts = np.concatenate([p.vertices for p in fig.encoding["zero_contour"].get_paths() if len(p.vertices)])
    assert len(verts) >= 2
    np.testing.assert_allclose(verts[:, 0], 0.45, atol=1e-9)
    eps_verts = np.concatenate([p.vertices for p in fig.encoding["eps_contour"].get_paths() if len(p.vertices)])
    np.testing.assert_allclose(np.sort(np.unique(eps_verts[:, 0].round(9))), [0.45 - 0.2, 0.45 + 0.2], atol=1e-9)


def test_heatmap_survives_missing_points_and_a_map_without_a_sign_change():
    s = sweep_summary(field=lambda a, c: 0.02 + 0.01 * a).drop(index=[3, 7])
    fig = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise"))
    assert list(fig.encoding["zero_contour"].levels) == [0.0]
    assert not fig.encoding["sign_change"] and not fig.encoding["zero_contour"].get_visible()
    z = np.ma.getmaskarray(fig.encoding["mesh"].get_array())
    assert z.sum() == 2  # two masked (missing) cells


def test_collect_heatmap_rejects_a_third_varying_axis():
    s = pd.concat([sweep_summary().assign(rank=1), sweep_summary().assign(rank=2)])
    with pytest.raises(ValueError, match="several rows"):
        regime.collect_heatmap(s, "alignment", "context_noise")


def test_grid_matches_a_loop_and_infer_axes_puts_alignment_first():
    s = sweep_summary().sample(frac=1.0, random_state=1)
    xs, ys, z = regime.grid(s, "alignment", "context_noise")
    for j, c in enumerate(ys):
        for i, a in enumerate(xs):
            row = s[(s["alignment"] == a) & (s["context_noise"] == c)]
            assert z[j, i] == row["mean_delta"].iloc[0]
    assert regime.infer_axes(s[["context_noise", "alignment", "mean_delta", "regime"]]) == ["alignment", "context_noise"]
    assert regime.infer_axes(s, {"axes": ["alignment", "context_noise"]}) == ["alignment", "context_noise"]
    assert regime.infer_axes(s[s["context_noise"] == 0]) == ["alignment"]  # a single-valued axis spans nothing


def test_symmetric_limits():
    assert symmetric_limits([-0.2, 0.05, np.nan]) == (-0.2, 0.2)
    assert symmetric_limits([0.0, np.nan]) == (-1.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Regime curve


def results_table(xs=(0.0, 0.5, 1.0), seeds=(1, 2, 3), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p, a in enumerate(xs):
        for s in seeds:
            g = 1.0 + rng.random()
            for arm, v in (("grad", g), ("evo", g - 0.1 * (a - 0.5) + 0.01 * rng.normal())):
                rows.append(dict(point=p, seed=s, arm=arm, alignment=a, log_loss=v, diverged=False))
    return pd.DataFrame(rows)


def test_curve_draws_mean_ci_eps_band_and_regime_strip():
    s = sweep_summary(ys=[0.0]).sample(frac=1.0, random_state=2)
    df = regime.collect_curve(s, "alignment")
    fig = regime.plot_curve(df)
    enc = fig.encoding
    order = s.sort_values("alignment")
    np.testing.assert_allclose(enc["line"].get_xdata(), order["alignment"])
    np.testing.assert_allclose(enc["line"].get_ydata(), order["mean_delta"])
    band = enc["ci_band"].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(order["ci_low"].min())
    assert band[:, 1].max() == pytest.approx(order["ci_high"].max())
    b = enc["eps_band"]  # a Rectangle spanning the axes' width, from -eps to +eps in data units
    ylo, yhi = b.get_y(), b.get_y() + b.get_height()
    assert (ylo, yhi) == pytest.approx((-EPS, EPS))
    for r in REGIMES:
        want = sorted(order.loc[order["regime"] == r, "alignment"].round(9))
        got = sorted(np.asarray(enc["markers"][r].get_offsets())[:, 0].round(9))
        assert got == want


def test_seed_deltas_match_a_loop_and_drop_diverged_pairs():
    res = results_table()
    res.loc[(res["point"] == 1) & (res["seed"] == 2) & (res["arm"] == "evo"), "diverged"] = True
    got = regime.collect_seed_deltas(res, "alignment")
    want = []
    for (p, s), g in res.groupby(["point", "seed"]):
        if g["diverged"].any():
            continue
        gv = g.set_index("arm")["log_loss"]
        want.append((p, s, gv["grad"] - gv["evo"]))
    assert len(got) == len(want) == 8
    for p, s, d in want:
        assert got[(got["point"] == p) & (got["seed"] == s)]["delta"].iloc[0] == pytest.approx(d)


# ---------------------------------------------------------------------------------------------
# Attribution


def attribution_table(with_gap=True):
    rows = []
    for c, ref, tr, m, h, p in (("router", "B3", "R", 0.04, 0.01, 0.006), ("scope", "R", "R+E", 0.001, 0.02, 0.8),
                                ("lifecycle", "R+E", "R+E+L", -0.03, 0.02, 0.047),
                                ("lifecycle_global", "R", "R+L", -0.02, 0.03, 0.2),
                                ("system", "B3", "R+E+L", 0.011, 0.02, 0.19)):
        rows.append(dict(contrast=c, kind="named", reference=ref, treated=tr, n=3, mean_delta=m, se=h / 4.3,
                         ci_low=m - h, ci_high=m + h, t=1.0, df=2, p=p, d_z=0.5))
    rows.append(dict(contrast="chain_sum", kind="chain_sum", reference="B3", treated="R+E+L", n=3, mean_delta=0.0112,
                     se=0.005, ci_low=-0.01, ci_high=0.032, t=1.0, df=2, p=0.21, d_z=0.5))
    if with_gap:
        rows.append(dict(contrast="chain_sum - system", kind="chain_gap", reference="B3", treated="R+E+L", n=3,
                         mean_delta=0.0002, se=np.nan, ci_low=np.nan, ci_high=np.nan, t=np.nan, df=np.nan,
                         p=np.nan, d_z=np.nan))
    return pd.DataFrame(rows)


def test_forest_rows_are_the_tables_contrasts_with_chain_sum_beside_system():
    t = attribution_table()
    fig = attribution.plot(attribution.collect(t))
    enc = fig.encoding
    assert enc["rows"] == ["router", "scope", "lifecycle", "lifecycle_global", "system", "chain_sum"]
    y = dict(zip(enc["rows"], enc["y"]))
    assert abs(y["system"] - y["chain_sum"]) == 1.0
    assert enc["gap"] == pytest.approx(0.0002)  # the chain_gap row's value, not a row itself
    named = enc["points"]["contrast: mean, 95% CI"]
    xs = named.lines[0].get_xdata()
    np.testing.assert_allclose(xs, t.loc[t["kind"] == "named", "mean_delta"].reindex([0, 1, 2, 3, 4]))
    seg = named.lines[2][0].get_segments()  # whiskers: [(lo, y), (hi, y)] per row
    np.testing.assert_allclose([s[0][0] for s in seg], t["ci_low"][:5])
    np.testing.assert_allclose([s[1][0] for s in seg], t["ci_high"][:5])
    text = " ".join(tx.get_text() for tx in fig.axes[1].texts)
    assert "p = 0.006" in text and "p = 0.047" in text and "n = 3" in text
    ax = fig.axes[0]
    assert any(np.allclose(line.get_xdata(), 0.0) for line in ax.lines)  # vertical line at 0
    assert enc["study_points"] is None


def test_forest_study_markers_only_when_asked_and_gap_without_a_gap_row():
    t = attribution_table(with_gap=False)
    df = attribution.collect(t, study=True)
    assert df.attrs["gap"] == pytest.approx(0.0112 - 0.011)
    fig = attribution.plot(df)
    pts = np.asarray(fig.encoding["study_points"].get_offsets())[:, 0]
    np.testing.assert_allclose(sorted(pts), sorted([0.0426, 0.0, -0.028, 0.015]))


# ---------------------------------------------------------------------------------------------
# Gates


def gates_table(M=3, K=6, seeds=(0, 1), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in seeds:
        for phase in ("before", "after"):
            for m in range(M):
                w = rng.random(K) + (np.eye(K)[1] * 5 if phase == "after" else 0)
                for k, g in enumerate(w / w.sum()):
                    rows.append(dict(phase=phase, domain=f"d{m}", slot=k, mean_gate=g, seed=s))
    return pd.DataFrame(rows)


def _monopoly_loop(table: pd.DataFrame, phase: str, top: int = 2) -> float:
    sub = table[table["phase"] == phase]
    mass: dict[int, float] = {}
    for (d, k), g in sub.groupby(["domain", "slot"]):
        mass[k] = mass.get(k, 0.0) + g["mean_gate"].mean()  # mean over seeds, summed over domains
    vals = sorted(mass.values(), reverse=True)
    return sum(vals[:top]) / sum(vals)


def test_gate_panels_show_the_independently_computed_monopoly_index():
    t = gates_table()
    fig = gates.plot(gates.collect(t, seed="mean"))
    enc = fig.encoding
    assert enc["panels"] == ["before", "after"]
    for ax, phase in zip(enc["axes"], ("before", "after")):
        want = _monopoly_loop(t, phase)
        assert enc["monopoly"][phase] == pytest.approx(want)
        assert f"{want:.3f}" in ax.get_title() and phase in ax.get_title()
        img = ax.images[0]
        mean = t[t["phase"] == phase].groupby(["domain", "slot"])["mean_gate"].mean().unstack()
        np.testing.assert_allclose(img.get_array(), mean.to_numpy())
        assert img.get_clim() == enc["axes"][0].images[0].get_clim()  # one colour scale
    assert enc["monopoly"]["after"] > enc["monopoly"]["before"]


def test_gate_figure_shows_one_seed_and_says_which():
    from sandbox.gatestats import matrix_stats

    t = gates_table(seeds=(7, 3))
    df = gates.collect(t.assign(cell="R"))
    assert df.attrs["seed"] == 7 and df.attrs["n_seeds"] == 2 and df.attrs["cell"] == "R"   # the first seed
    fig = gates.plot(df)
    assert "cell R, seed 7 (1 of 2 seeds)" in fig._suptitle.get_text()
    mine = t[(t["seed"] == 7) & (t["phase"] == "after")].pivot(index="domain", columns="slot", values="mean_gate")
    np.testing.assert_allclose(fig.encoding["axes"][1].images[0].get_array(), mine.to_numpy())
    want = matrix_stats(mine.to_numpy())
    assert fig.encoding["diagnostics"]["after"] == want
    title = fig.encoding["axes"][1].get_title()
    assert f"top-4 = {want['top4']:.3f}" in title and f"MI(domain; slot) = {want['mi']:.3f}" in title
    assert gates.collect(t, seed=3).attrs["seed"] == 3
    assert "mean of 2 seeds" in gates.plot(gates.collect(t, seed="mean"))._suptitle.get_text()
    with pytest.raises(ValueError, match="seed"):
        gates.collect(t, seed=99)


def test_monopoly_index_extremes():
    assert gates.monopoly_index(np.full((4, 8), 1 / 8)) == pytest.approx(2 / 8)
    collapsed = np.zeros((4, 8))
    collapsed[:, 5] = 1.0
    assert gates.monopoly_index(collapsed) == 1.0


def test_gates_with_several_cells_need_a_cell():
    t = pd.concat([gates_table().assign(cell="B3"), gates_table(seed=1).assign(cell="R")])
    with pytest.raises(ValueError, match="cell"):
        gates.collect(t)
    assert len(gates.collect(t, cell="R")) == 2 * 3 * 6


# ---------------------------------------------------------------------------------------------
# Lifecycle timeline


def lifecycle_table():
    """K = 4 founders (ids 0..3 in slots 0..3), rows as `sandbox.lifecycle` writes them.
    Step 10: id 1 (slot 1) dies and is blended into id 2 (slot 2); id 4 is born in slot 1 from
    parent 3. Step 20: id 3 (slot 3) dies into id 0; id 5 is born in slot 3 from parent 4, which now
    sits in slot 1 (not slot 4): the timeline must trace it."""
    rows = [
        dict(step=10, event="death", slot=1, slot_id=1, parent_id=-1, neighbour_id=2),
        dict(step=10, event="inherit", slot=2, slot_id=2, parent_id=1, neighbour_id=2),
        dict(step=10, event="birth", slot=1, slot_id=4, parent_id=3, neighbour_id=-1),
        dict(step=20, event="birth", slot=3, slot_id=5, parent_id=4, neighbour_id=-1),  # unordered on purpose
        dict(step=20, event="death", slot=3, slot_id=3, parent_id=-1, neighbour_id=0),
        dict(step=20, event="inherit", slot=0, slot_id=0, parent_id=3, neighbour_id=0),
    ]
    return pd.DataFrame(rows)


def test_timeline_counts_and_traced_links():
    t = lifecycle_table()
    df = lineage.collect(t)
    births = df[df["event"] == "birth"].set_index("slot_id")
    assert (births.loc[4, "link_from"], births.loc[4, "link_to"]) == (3, 1)
    assert (births.loc[5, "link_from"], births.loc[5, "link_to"]) == (1, 3)
    inh = df[df["event"] == "inherit"].set_index("slot_id")
    assert (inh.loc[2, "link_from"], inh.loc[2, "link_to"]) == (1, 2)  # dying slot -> receiver
    assert (inh.loc[0, "link_from"], inh.loc[0, "link_to"]) == (3, 0)
    fig = lineage.plot(df, n_slots=4)
    enc = fig.encoding
    for ev in ("death", "birth", "inherit"):
        assert len(enc["markers"][ev].get_offsets()) == (t["event"] == ev).sum() == enc["counts"][ev]
    assert len(enc["birth_links"]) == 2 and len(enc["inherit_links"]) == 2
    assert sorted((a.xyann[1], a.xy[1]) for a in enc["birth_links"]) == [(1.0, 3.0), (3.0, 1.0)]
    assert sorted((a.xyann[1], a.xy[1]) for a in enc["inherit_links"]) == [(1.0, 2.0), (3.0, 0.0)]


def test_timeline_reads_the_neighbour_form_of_inheritance_and_stored_slots():
    rows = [dict(step=5, event="death", slot=2, slot_id=2, parent_id=-1, neighbour_id=-1),
            dict(step=5, event="inherit", slot=2, slot_id=2, parent_id=-1, neighbour_id=0),
            dict(step=5, event="birth", slot=2, slot_id=4, parent_id=1, neighbour_id=-1, parent_slot=3)]
    df = lineage.collect(pd.DataFrame(rows))
    inh = df[df["event"] == "inherit"].iloc[0]
    assert (inh["link_from"], inh["link_to"]) == (2, 0)
    birth = df[df["event"] == "birth"].iloc[0]
    assert birth["link_from"] == 3  # the stored parent_slot wins over the founder guess (slot 1)


def test_timeline_follows_real_lifecycle_events():
    """Events from `sandbox.lifecycle.lifecycle_step`: every birth arrow starts at the slot that
    held the parent id in the population just before the event."""
    import torch

    from sandbox.lifecycle import LifecycleConfig, Population, event_rows, lifecycle_step

    gen = torch.Generator().manual_seed(0)
    K, r, d = 5, 2, 6
    pop = Population.founders((1,), K)
    A, B = torch.randn(1, K, r, d, generator=gen), torch.randn(1, K, d, r, generator=gen)
    cfg = LifecycleConfig(interval=1, n_die=2, min_age=0)
    rows, held_before = [], []
    for step in range(1, 5):
        held_before.append((step, pop.ids[0].tolist()))
        fit = torch.randn(1, K, generator=gen)
        pop, (A, B), _, events = lifecycle_step(pop, (A, B), None, fit, cfg, gen, step=step)
        rows += event_rows(events, [0])
    t = pd.DataFrame(rows)
    df = lineage.collect(t)
    births = df[df["event"] == "birth"]
    assert len(births) >= 4
    slot_of = {step: {i: k for k, i in enumerate(ids)} for step, ids in held_before}
    for b in births.itertuples():
        assert b.link_from == slot_of[b.step][b.parent_id]
    fig = lineage.plot(df, n_slots=K)
    assert fig.encoding["counts"] == {ev: int((t["event"] == ev).sum()) for ev in ("death", "inherit", "birth")}


def test_timeline_picks_one_seed():
    t = pd.concat([lifecycle_table().assign(seed=7), lifecycle_table().iloc[:3].assign(seed=9)])
    df = lineage.collect(t, seed=9)
    assert len(df) == 3 and df.attrs["seed"] == 9
    assert len(lineage.collect(t)) == 6  # default: the first seed


# ---------------------------------------------------------------------------------------------
# Learning curves and cells


def curves_table(seeds=(0, 1)):
    rows = []
    for s in seeds:
        for step in (0, 100, 200):
            vals = []
            for m, floor in enumerate((1.5, 2.0)):
                v = floor + 1.0 / (1 + step / 100) + 0.01 * s
                vals.append(v)
                rows.append(dict(step=step, domain=f"dom{m}", nll=v, log_ppl=v, floor=floor, seed=s))
            rows.append(dict(step=step, domain="balanced", nll=np.mean(vals), log_ppl=np.mean(vals), floor=1.75, seed=s))
    return pd.DataFrame(rows)


def test_curves_plot_the_change_since_step_0_and_the_gap_to_each_floor():
    t = curves_table()
    fig = curves.plot(curves.collect(t))
    enc = fig.encoding
    assert set(enc["lines"]) == {"dom0", "dom1", "balanced"}
    for d, line in enc["lines"].items():
        want = t[t["domain"] == d].groupby("step")["log_ppl"].mean()
        np.testing.assert_allclose(line.get_ydata(), want.to_numpy() - want.to_numpy()[0])   # an axis scaled to the effect
    for d, floor in (("dom0", 1.5), ("dom1", 2.0), ("balanced", 1.75)):
        end = t[t["domain"] == d].groupby("step")["log_ppl"].mean().iloc[-1]
        assert enc["gaps"][d] == pytest.approx(end - floor)
        assert f"{end - floor:.3f} above floor" in enc["lines"][d].get_label()
    assert enc["lines"]["balanced"].get_linewidth() > enc["lines"]["dom0"].get_linewidth()


def test_cells_are_drawn_against_the_reference_cell_paired_by_seed():
    rows = []
    for cell, gain in (("B3", 0.0), ("R", 0.02), ("L+R", -0.01)):
        for seed in (1, 2, 3):
            for step in (0, 50, 100):
                v = 3.0 + 0.1 * seed - gain * step / 100 + 0.001 * seed * (cell == "R")
                rows.append(dict(step=step, domain="balanced", log_ppl=v, cell=cell, seed=seed))
    df = curves.collect_delta(pd.DataFrame(rows))
    assert df.attrs["reference"] == "B3" and set(df["cell"]) == {"R", "L+R"}
    r = df[(df["cell"] == "R") & (df["step"] == 100)].iloc[0]
    d = np.array([0.02 - 0.001 * s for s in (1, 2, 3)])           # B3 - R per seed at step 100
    assert r["mean_delta"] == pytest.approx(d.mean())
    half = scipy_stats.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert r["ci_high"] - r["mean_delta"] == pytest.approx(half)
    fig = curves.plot_delta(df)
    np.testing.assert_allclose(fig.encoding["lines"]["L+R"].get_ydata(), [0.0, -0.005, -0.01])
    assert "B3" in fig.axes[0].get_ylabel()


def test_cells_plot_leaves_diverged_runs_out():
    rows = [dict(cell=c, seed=s, balanced_log_ppl=3.0 - 0.01 * i + 0.001 * s, diverged=False)
            for i, c in enumerate(("R+E+L", "B3", "R")) for s in (1, 2, 3)]
    t = pd.DataFrame(rows)
    t.loc[0, ["balanced_log_ppl", "diverged"]] = [np.nan, True]
    df = curves.collect_cells(t)
    assert list(df["cell"].cat.categories) == ["B3", "R", "R+E+L"]  # design order
    fig = curves.plot_cells(df)
    assert fig.encoding["n_points"] == 8 and fig.encoding["n_diverged"] == 1


def test_saved_png_has_at_least_150_dpi_and_an_svg(tmp_path):
    from PIL import Image

    fig = gates.plot(gates.collect(gates_table()))
    paths = save_figure(fig, tmp_path / "g")
    assert [p.suffix for p in paths] == [".png", ".svg"]
    with Image.open(paths[0]) as im:
        assert im.info["dpi"][0] >= 149.9
    assert paths[1].read_text().lstrip().startswith("<?xml")


def test_scattered_points_are_contoured_on_a_triangulation():
    rng = np.random.default_rng(3)
    a, c = rng.random(30), rng.random(30)  # a boundary search: no two points share a coordinate
    s = pd.DataFrame(dict(alignment=a, context_noise=c, mean_delta=0.05 * (a - 0.45), ci_low=0.05 * (a - 0.45) - 0.003,
                          ci_high=0.05 * (a - 0.45) + 0.003, eps=EPS, n=5))
    s["regime"] = [_classify(lo, hi) for lo, hi in zip(s["ci_low"], s["ci_high"])]
    fig = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise"))
    enc = fig.encoding
    assert list(enc["zero_contour"].levels) == [0.0] and enc["clim"][0] == -enc["clim"][1]
    verts = np.concatenate([p.vertices for p in enc["zero_contour"].get_paths() if len(p.vertices)])
    np.testing.assert_allclose(verts[:, 0], 0.45, atol=1e-9)  # linear field: exact on every triangle
    for r in REGIMES:
        assert offsets(enc["markers"][r]) == rows_xy(s[s["regime"] == r], "alignment", "context_noise")


# ---------------------------------------------------------------------------------------------
# Issue 30 (3): shares not mass, significant-only contours, axes within the grid, ACAR drawn


def test_gate_panels_show_each_domains_share_and_entropy_not_the_mass():
    t = gates_table(M=3, K=6, seeds=(0,))
    t.loc[t["phase"] == "after", "mean_gate"] *= 0.25          # total mass falls, routing unchanged in shape
    fig = gates.plot(gates.collect(t))
    enc = fig.encoding
    for phase in ("before", "after"):
        sh = enc["shares"][phase]
        np.testing.assert_allclose(sh.sum(axis=1), 1.0)          # rows are shares of the domain's mass
        m = gates.matrices(gates.collect(t))[phase].to_numpy(float)
        np.testing.assert_allclose(enc["entropy"][phase], [scipy_stats.entropy(r) for r in m])
    img = enc["axes"][1].images[0].get_array()
    np.testing.assert_allclose(np.asarray(img), enc["shares"]["after"])   # the drawn values are the shares
    labels = [tl.get_text() for tl in enc["axes"][1].get_yticklabels()]
    assert all("H " in lab and "mass 0.25" in lab for lab in labels), labels
    assert "seed 0" in fig._suptitle.get_text()


def test_zero_contour_is_drawn_only_near_significant_points_of_both_signs():
    s = sweep_summary(xs=np.linspace(0, 1, 9), ys=np.linspace(0, 1, 3), field=lambda a, c: 0.05 * (a - 0.45))
    fig = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise"))
    assert fig.encoding["sign_change"] and fig.encoding["zero_contour"].get_visible()
    # The same map with every point inconclusive (noise): the field still crosses 0, no contour drawn.
    noisy = s.assign(regime="inconclusive")
    fig = regime.plot_heatmap(regime.collect_heatmap(noisy, "alignment", "context_noise"))
    assert not fig.encoding["sign_change"] and not fig.encoding["zero_contour"].get_visible()
    # Significant on one side only: a sign change the labels do not establish is not drawn either.
    one = s.assign(regime=np.where(s["mean_delta"] > 0, s["regime"], "inconclusive"))
    assert not regime.plot_heatmap(regime.collect_heatmap(one, "alignment", "context_noise")).encoding["sign_change"]


def test_heatmap_axes_stay_within_the_grid():
    s = sweep_summary(xs=np.linspace(0, 1, 3), ys=np.linspace(0, 1, 3))      # a coarse grid
    ax = regime.plot_heatmap(regime.collect_heatmap(s, "alignment", "context_noise")).axes[0]
    assert ax.get_xlim() == (0.0, 1.0) and ax.get_ylim() == (0.0, 1.0)


def test_filled_markers_are_edged_and_every_label_has_its_own_shape():
    from figures.style import REGIME_STYLE

    assert len({st["marker"] for st in REGIME_STYLE.values()}) == len(REGIME_STYLE)
    assert all(st["edgecolor"] != "white" for st in REGIME_STYLE.values())


def test_acar_arm_is_drawn_on_the_curve():
    s = sweep_summary(ys=np.array([0.0]))
    s = s.assign(delta_acar=s["mean_delta"] - 0.01, acar_ci_low=s["mean_delta"] - 0.02,
                 acar_ci_high=s["mean_delta"], acar_regime="inconclusive")
    assert regime.infer_axes(s) == ["alignment"]                        # acar columns are statistics, not axes
    fig = regime.plot_curve(regime.collect_curve(s, "alignment"))
    np.testing.assert_allclose(fig.encoding["acar"].get_ydata(), s.sort_values("alignment")["delta_acar"])
    view = regime.acar_view(s)
    np.testing.assert_allclose(view["mean_delta"], s["delta_acar"])
    assert list(view["regime"]) == list(s["acar_regime"])


def test_report_draws_one_comparison_figure_for_several_cells_not_a_copy_per_cell(tmp_path):
    from figures.report import build_report

    rows = [dict(step=st, domain=d, nll=3.0, log_ppl=3.0 - 0.01 * st * (c != "B3") + 0.001 * s, floor=1.5, cell=c, seed=s)
            for c in ("B3", "R", "L") for s in (1, 2) for st in (0, 10) for d in ("a", "balanced")]
    pd.DataFrame(rows).to_csv(tmp_path / "curves.csv", index=False)
    names = sorted(p.name for p in build_report(tmp_path))
    assert names == ["curves_vs_B3.png", "curves_vs_B3.svg"]
