"""One row per screened setting under runs/mech (each a `sandbox factorial --cells B3,R` folder): B3's and R's gate
diagnostics (mean over seeds, max or min beside), the distinct top slots over domains (from gates.csv) and the router
contrast; writes screen.csv."""
import sys
from pathlib import Path
import pandas as pd

root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/mech")
rows = []
for d in sorted(p for p in root.iterdir() if (p / "cells.csv").is_file()):
    c = pd.read_csv(d / "cells.csv")
    a = pd.read_csv(d / "attribution.csv") if (d / "attribution.csv").is_file() else pd.DataFrame()
    b, r = c[c.cell == "B3"], c[c.cell == "R"]
    row = {"setting": d.name, "seeds": len(b),
           "B3_logppl": b.balanced_log_ppl.mean(), "R_logppl": r.balanced_log_ppl.mean(),
           "B3_top4": b.gate_top4_after.mean(), "B3_top4_max": b.gate_top4_after.max(),
           "B3_entropy": b.gate_entropy_after.mean(), "B3_slots5": b.gate_slots5_after.mean(),
           "B3_slots5_min": b.gate_slots5_after.min(), "B3_mi": b.gate_mi_after.mean(),
           "B3_own": b.gate_own_after.mean(),
           "R_top4": r.gate_top4_after.mean(), "R_slots5": r.gate_slots5_after.mean(), "R_mi": r.gate_mi_after.mean(),
           "R_own": r.gate_own_after.mean(), "R_open": r.gate_open_after.mean(), "epochs": c.train_epochs.max()}
    g = pd.read_csv(d / "gates.csv")
    g = g[g.phase == "after"]
    for cell in ("B3", "R"):   # distinct top slots over domains: M = one slot per domain, 1 = every domain on the same slot
        tops = []
        for _, x in g[g.cell == cell].groupby("seed"):
            m = x.pivot(index="domain", columns="slot", values="mean_gate")
            tops.append(m.idxmax(axis=1).nunique())
        row[f"{cell}_tops"] = sum(tops) / len(tops) if tops else float("nan")
    row["domains"] = g.domain.nunique()
    if len(a):
        x = a[a.contrast == "router"].iloc[0]
        row.update(router_delta=x.mean_delta, ci_low=x.ci_low, ci_high=x.ci_high, p=x.p, regime=x.get("regime", ""),
                   unit=x.get("unit", ""), n=x.n)
    rows.append(row)
df = pd.DataFrame(rows)
df.to_csv(root / "screen.csv", index=False)
pd.set_option("display.width", 250, "display.max_columns", 40)
print(df.round(4).to_string(index=False))
