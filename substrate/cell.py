"""One factorial cell on the transformer substrate: the run, its metrics and tables.

A cell is a set of factors (`sandbox.factors`): R, E, L. Every cell runs the same loop on the same
frozen, pretrained base with the same starting bank for a seed (common random numbers, so cells
pair by seed); the letters only switch what the loop does:

- **R (router)**: off = ``softmax`` router on causal prefix means of the token embeddings
  (``routing_features(kind="embed")``); on = ``sigmoid`` router (learnable floor, bounded
  temperature anneal) on causal prefix means of the base's post-stack hidden states
  (``kind="hidden"``). Gates ``(B, T, K)`` are shared by every adapted projection.
- **E (scope)**: adapter fitness ``fit_k = agg_m (L_m^{-k} - L_m)`` with ``agg`` = equal-weight mean
  over domains (off, ``global``) or ``per_domain_agg`` (default max) over domains (on,
  ``per-domain``). Fitness is measured and logged every ``interval`` steps in EVERY cell
  (``fitness.csv``); without L it changes nothing else, so E alone (or R+E) trains exactly like R
  and differs only in what is logged. That is the study's design: scope only matters through
  the lifecycle's choice of who dies.
- **L (lifecycle)**: every ``interval`` steps `sandbox.lifecycle.lifecycle_step` kills the least
  fit slots (age >= ``min_age``), blends them into their nearest neighbour (alpha
  ``inherit_alpha``), clones and SVD-mutates a fit parent into the freed slot and reallocates its
  router column toward the worst domain; Adam's moments of the replaced slots are zeroed.

The pieces live in one module per concern, every name re-exported here: `substrate.config`
(`CellConfig`, the per-preset settings, the identity, the data check), `substrate.adapt` (the
substrate, the run state and its checkpoints, the optimiser and the gradient step) and
`substrate.fitness` (folded passes, leave-one-out fitness, evaluation, gate usage).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from sandbox.errors import BadInput
from sandbox.results import RunDir, atomic_save_torch, claim_run_dir, load_torch, read_json, to_jsonable
from substrate.adapt import (FINAL, RunState, Substrate, _BATCH, adaptation, _FIT, _INIT, _LIFE, _PERTURB,  # noqa: F401
                             acar_held_in_score, build_state, checkpoint, final_state, gates_for, perturb_,
                             prepare_substrate, restore, step_generator, train_batch, train_step)
from substrate.config import (CELL_LIFECYCLE, CELL_ROUTER, DEVICES, NESTED,  # noqa: F401
                              ROUTER_KINDS, SUBSTRATE, TRAIN_DATA, CellConfig, data_check, revisit_warning)
from substrate.fitness import (FOLD_ROWS, acar_usage, evaluate_state, finetune_loss, fitness_event,  # noqa: F401
                               fold_rows, folded_nll, gate_record, held_out_gates, loo_losses)
from substrate.train import lr_at


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellResult:
    """What a finished (or stopped) run reports; ``metrics`` is metrics.json (None if stopped early)."""

    out: Path
    done: bool
    step: int
    metrics: dict | None


def run_cell(cfg: CellConfig, out: str | Path, cache_dir: str | Path = "runs/cache", *, substrate: Substrate | None = None,
             stop_after: int | None = None, draw_figures: Callable[[Path], object] | None = None,
             argv: list[str] | None = None,
             progress: Callable[[int, int, dict], None] | None = None,
             log: Callable[[str], None] | None = None,
             stage: Callable[[str, int, int], None] | None = None) -> CellResult:
    """Run (or resume, or just report) one cell into the run folder `out`.

    Writes ``manifest.json``, ``checkpoint.pt`` (every ``checkpoint_every`` steps, atomic),
    ``curves.csv``, ``gates.csv``, ``fitness.csv``, ``lifecycle.csv``, ``train_loss.csv``,
    ``metrics.json`` and, with `draw_figures` (e.g. `figures.report.build_report`, passed in by
    the caller: this layer never imports the figures), the figures it draws from the folder.
    A folder with a finished run of the same config returns its metrics without training; one with
    a checkpoint resumes from it. `stop_after` caps the steps of THIS invocation (it checkpoints
    and returns ``done=False``), which is how a run is interrupted on purpose.
    `progress(step, steps, info)` is called after every step; `stage` goes to `prepare_substrate`.
    """
    out = Path(out)
    claim_run_dir(out, "full")   # one run per folder, never another command's folder
    ck_path = out / "checkpoint.pt"
    if (out / "metrics.json").exists():
        m = read_json(out / "metrics.json", "--out", "metrics.json",
                      "delete it and rerun to resume from the checkpoint, or delete the folder to start over")
        if m.get("config", {}) != to_jsonable(cfg.identity()):
            raise BadInput("--out", str(out), "an empty folder or one holding a run of the same config (this one "
                           "holds a finished run with a different config)")
        run = RunDir(out)
        if not run.manifest_path.exists():
            run = RunDir.create(out, "full", cfg, seeds=[cfg.seed], argv=argv)
        if run.read_manifest().get("ended") is None or ck_path.exists():
            _complete(run, m, draw_figures)   # killed between metrics.json and the end: finish the folder now
        else:
            run.release()
        return CellResult(out, True, m["steps"], m)
    ck = None
    if ck_path.exists():
        ck = load_torch(ck_path, "--out", "checkpoint", "delete it and rerun to restart this seed from step 0",
                        map_location="cpu", weights_only=False)
    if ck is not None and ck["config"] != cfg.identity():
        raise BadInput("--out", str(out), "an empty folder or one holding a run of the same config (its "
                       "checkpoint has a different config)")
    sub = substrate or prepare_substrate(cfg, cache_dir, log, stage)
    corpus = sub.corpus
    data = data_check(cfg, corpus)
    run = RunDir.create(out, "full", cfg, seeds=[cfg.seed], argv=argv,
                        extra={"substrate": cfg.substrate(), "corpus": corpus.config, "base_seed": cfg.base_seed,
                               "data": data})
    if revisit_warning(data) and log is not None:
        log(revisit_warning(data))
    st = build_state(cfg, sub)
    if ck is not None:
        restore(st, ck)
        if "reads" not in ck["tables"]:   # a checkpoint written before reads were counted: their expectation
            st.reads = [round(replace(cfg, steps=st.step).expected_reads())] * corpus.domains
    else:
        st.curves.extend(evaluate_state(cfg, st, corpus).rows(step=0, seed=cfg.seed, cell=cfg.cell))
        gate_record(cfg, st, corpus, "before")
    tcfg = adaptation(cfg)
    lcfg = cfg.lifecycle_config()
    t0, ran = time.perf_counter(), 0
    while st.step < cfg.steps and st.diverged_step is None:
        loss = train_step(cfg, st, corpus, tcfg)
        if not math.isfinite(loss):
            st.diverged_step = st.step
            break
        st.step += 1
        ran += 1
        if st.step % 10 == 0 or st.step == cfg.steps:
            st.train_loss.append({"step": st.step, "loss": loss, "lr": lr_at(st.step - 1, tcfg)})
        if lcfg.due(st.step):
            fitness_event(cfg, st, corpus)
        if st.step % cfg.eval_every == 0 or st.step == cfg.steps:
            st.curves.extend(evaluate_state(cfg, st, corpus).rows(step=st.step, seed=cfg.seed, cell=cfg.cell))
        if progress is not None:
            progress(st.step, cfg.steps, {"loss": loss})
        stopping = stop_after is not None and ran >= stop_after and st.step < cfg.steps
        if stopping or (cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < cfg.steps):
            st.wall_s += time.perf_counter() - t0
            t0 = time.perf_counter()
            atomic_save_torch(ck_path, checkpoint(cfg, st))
        if stopping:
            _write_tables(run, st)
            run.release()
            return CellResult(out, False, st.step, None)
    st.wall_s += time.perf_counter() - t0
    metrics = finish(cfg, st, sub, run)
    _complete(run, metrics, draw_figures)
    return CellResult(out, True, st.step, metrics)


def _complete(run: RunDir, metrics: dict, draw_figures: Callable[[Path], object] | None) -> None:
    """Everything after ``metrics.json``: the figures, the checkpoint removed, then the manifest's
    end time (the last write, so a folder is finished exactly when ``ended`` is set and no
    checkpoint is left). Idempotent: a rerun of a folder killed in between calls it again."""
    if draw_figures is not None:
        draw_figures(run.path)
    ck_path = run.path / "checkpoint.pt"
    if ck_path.exists():
        ck_path.unlink()
    run.finish(metrics=metrics)


def _write_tables(run: RunDir, st: RunState) -> None:
    import pandas as pd

    for name in ("curves", "gates", "fitness", "train_loss"):
        run.write_csv(f"{name}.csv", pd.DataFrame(getattr(st, name)))
    cols = ["step", "event", "slot", "slot_id", "parent_id", "neighbour_id", "fitness", "mutation_size", "inherit_alpha",
            "domain", "seed"]
    # Events restored from a checkpoint written before the column was named inherit_alpha carry "alpha".
    events = [{("inherit_alpha" if k == "alpha" else k): v for k, v in e.items()} for e in st.events]
    cols += [c for c in ("parent2_id", "crossover_t", "finetune_loss_before", "finetune_loss_after")
             if any(c in e for e in events)]   # EvoMerge options, only when used
    run.write_csv("lifecycle.csv", pd.DataFrame(events, columns=cols))


def finish(cfg: CellConfig, st: RunState, sub: Substrate, run: RunDir) -> dict:
    """Final gates and metrics; writes every table and metrics.json."""
    corpus = sub.corpus
    diverged = st.diverged_step is not None
    if not diverged:
        gate_record(cfg, st, corpus, "after")
        final = evaluate_state(cfg, st, corpus)
        nll = final.nll.tolist()
        if not all(math.isfinite(v) for v in nll):
            st.diverged_step, diverged = st.step, True
    if diverged:
        nll = [math.nan] * corpus.domains
    _write_tables(run, st)
    floors = corpus.floors.tolist()
    balanced = sum(nll) / len(nll)
    tokens = st.step * cfg.batch * corpus.seq_len
    first = [r for r in st.curves if r["step"] == 0 and r["domain"] == "balanced"]
    initial = first[0]["log_ppl"] if first else math.nan
    base = sum(sub.base_nll) / len(sub.base_nll)   # the plain frozen base, no adapters
    data = data_check(cfg, corpus, st.reads)
    metrics = {
        "config": to_jsonable(cfg.identity()), "cell": cfg.cell, "seed": cfg.seed, "preset": cfg.preset,
        "balanced_log_ppl": balanced,
        "log_ppl": dict(zip(corpus.names, nll)),
        "floor": dict(zip(corpus.names, floors)),
        "gap_to_floor": {n: v - f for n, v, f in zip(corpus.names, nll, floors)},
        "balanced_gap_to_floor": balanced - sum(floors) / len(floors),
        "initial_balanced_log_ppl": initial,
        "base_balanced_log_ppl": base,
        "initial_gap_to_base": initial - base,
        "steps": st.step, "tokens": tokens, "wall_s": st.wall_s,
        "tokens_per_s": tokens / st.wall_s if st.wall_s > 0 else math.nan,
        "diverged": diverged, "diverged_step": st.diverged_step,
        "lifecycle_events": sum(e["event"] == "death" for e in st.events),
        "router": "acar" if cfg.router_kind == "acar" else st.router.cfg.kind, "features": cfg.features, "scope": cfg.lifecycle_config().scope,
        "assignment": st.assignment.tolist(), "device": cfg.device,
        "router_lr": cfg.router_lr_value,
        "base_seed": cfg.base_seed,
        "data": data, "train_epochs": data["epochs"],
        "gates": {p: st.gate_stats[p] for p in ("before", "after") if p in st.gate_stats},
    }
    if cfg.router_kind == "acar" and not diverged:
        metrics["router_kind"] = "acar"
        metrics["acar"] = acar_usage(cfg, st, corpus, run)
    atomic_save_torch(run.path / FINAL, final_state(cfg, st))   # before metrics.json: a finished folder has it
    run.write_json("metrics.json", metrics)
    return metrics
