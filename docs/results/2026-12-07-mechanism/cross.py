"""Contrasts across two runs on the same seeds and bases: the default router lr (10 x, runs/mech/ref_lr10) and the
setting's (300 x, runs/mech/confirm); writes cross_contrasts.csv and prints its markdown rows."""
import pandas as pd
from sandbox import replicates

hi = pd.read_csv("runs/mech/confirm/cells.csv")
lo = pd.read_csv("runs/mech/ref_lr10/cells.csv")
assert (hi.sort_values(["cell", "seed"]).base_balanced_log_ppl.values == lo.sort_values(["cell", "seed"]).base_balanced_log_ppl.values).all()
runs = {"B3 300x": hi[hi.cell == "B3"], "R 300x": hi[hi.cell == "R"], "B3 10x": lo[lo.cell == "B3"], "R 10x": lo[lo.cell == "R"]}
rows = []
for ref, test in (("B3 10x", "R 10x"), ("B3 300x", "R 300x"), ("B3 300x", "R 10x"), ("B3 10x", "B3 300x"), ("R 10x", "R 300x")):
    t = pd.concat([runs[ref].assign(cell="B3"), runs[test].assign(cell="R")])
    a = replicates.attribution(t).set_index("contrast").loc["router"]
    rows.append({"reference": ref, "treated": test, "n_bases": int(a.n), "mean_delta": a.mean_delta, "ci_low": a.ci_low,
                 "ci_high": a.ci_high, "p": a.p, "regime": a.regime,
                 "reference_log_ppl": runs[ref].balanced_log_ppl.mean(), "treated_log_ppl": runs[test].balanced_log_ppl.mean()})
df = pd.DataFrame(rows)
df.to_csv("docs/results/2026-12-07-mechanism/cross_contrasts.csv", index=False)
for _, r in df.iterrows():
    print(f"| {r.treated} vs {r.reference} | {r.treated_log_ppl:.4f} vs {r.reference_log_ppl:.4f} | {r.mean_delta:+.4f} [{r.ci_low:+.4f}, {r.ci_high:+.4f}] | {r.p:.3f} | {r.regime} |")
