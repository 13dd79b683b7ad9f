"""Timing one adaptation step of a substrate preset (section 3 of `sandbox bench`).

The step is the real one, `substrate.cell.train_step`, on a timing-only substrate (random base,
random specialists, random token windows: speed does not depend on the values). For cell ``R``
(the study's router rewrite):

1. a batch of windows, and the learning rate of the warm-up/cosine schedule;
2. routing features: causal prefix means of the base's post-stack hidden states (no adapters,
   no grad), ``(B, T, D)``; gates from the sigmoid router, ``(B, T, K)``;
3. forward through the frozen base with every adapter bank gated, mean token cross-entropy;
4. backward (input grads through the frozen base, weight grads of adapters and router), global
   gradient-norm clip, one Adam step on the adapter factors and router parameters.

FLOPs per token of that step (2 FLOPs per multiply-add, matmuls only), `step_flops_per_token`:
``flops_per_token(cfg)`` of the model (frozen base forward + input backward, adapters 6 per
weight, attention ``12 T D`` per layer) plus the feature pass (``2 n_mm`` of the blocks'
projections and ``4 T D`` of attention per layer, no head) plus the router (``2 D K`` forward and
``2 D K`` for the weight gradient; its input is detached), minus the input gradients autograd
never computes: the embeddings are frozen, so below the first adapted projection of block 0
nothing needs a gradient (`skipped_input_grad_flops`). The matmul part of this count equals
`torch.utils.flop_counter.FlopCounterMode` on the real step exactly (tested; that counter does not
see CPU attention, which is added analytically). The achieved rate is divided by a dense fp32
square matmul measured in the same interleaved run, with n = max(1024, D) (on CUDA: by the bf16
peak = MFU).
"""

from __future__ import annotations

import math

import torch

from sandbox.timing import BenchConfig, interleaved, matmul_case
from substrate.model import ModelConfig, build_model, flops_per_token, param_breakdown, preset

# (batch, context) per preset for the CPU benchmark as (full, quick); None = not in quick mode.
STEP_SHAPES = {"tiny": ((16, 64), (4, 64)), "small": ((8, 128), (2, 128)), "widened-1536": ((1, 256), None)}
# On CUDA: the study's context for widened-1536 and batches that fill the device.
CUDA_STEP_SHAPES = {"tiny": (64, 64), "small": (64, 128), "widened-1536": (8, 512)}
# Above this many base parameters a preset is only timed on CUDA, or on CPU outside quick mode.
CPU_QUICK_MAX_PARAMS = 20_000_000


def skipped_input_grad_flops(cfg: ModelConfig, seq_len: int) -> float:
    """Per-token backward FLOPs that `flops_per_token` counts but autograd skips (frozen embeddings).

    Nothing below block 0's first adapted projection needs a gradient, so its input gradient is
    never formed: base ``2 d_in d_out`` plus the bank's ``2 K r d_in``. With adapters on the MLP
    only, block 0's whole attention backward goes too (``qkv`` and ``out`` input grads ``8 D^2``
    and the attention's ``8 T D``).
    """
    D, Kr = cfg.d_model, cfg.slots * cfg.rank
    if cfg.targets in ("attn+mlp", "attn"):
        return 2 * 3 * D * D + 2 * Kr * D
    return 2 * 4 * D * D + 8 * seq_len * D + 2 * D * cfg.d_ff + 2 * Kr * D


def step_flops_per_token(cfg: ModelConfig, seq_len: int, features: str = "hidden") -> float:
    """FLOPs per token of one adaptation step (module docstring); ``features="embed"`` (the B3
    router's token-embedding means) needs no feature pass."""
    b = param_breakdown(cfg)
    n_mm_blocks = cfg.n_layer * (b["block"] - 2 * cfg.d_model)
    features = (2 * n_mm_blocks + 4 * cfg.n_layer * seq_len * cfg.d_model) if features == "hidden" else 0
    router = 4 * cfg.d_model * cfg.slots
    model = flops_per_token(cfg, adapters=True, seq_len=seq_len) - skipped_input_grad_flops(cfg, seq_len)
    return model + features + router


def bench_substrate(cfg: ModelConfig, seq_len: int, domains: int = 4, windows: int = 8, seed: int = 0):
    """A `substrate.cell.Substrate` for timing only: random base weights, random specialists, random
    token windows (speed does not depend on what the weights or tokens are), no pretraining."""
    from substrate.adapt import Substrate
    from substrate.corpus import Corpus

    g = torch.Generator().manual_seed(seed)
    base = build_model(cfg, seed)
    specialists = {name: (torch.randn(domains, cfg.rank, b.A.shape[-1], generator=g) / math.sqrt(b.A.shape[-1]),
                          torch.randn(domains, b.B.shape[-2], cfg.rank, generator=g) / math.sqrt(cfg.rank))
                   for name, b in base.banks().items()}                              # (M, r, d_in), (M, d_out, r)
    split = lambda: [torch.randint(cfg.vocab, (windows, seq_len + 1), generator=g, dtype=torch.int32)
                     for _ in range(domains)]                                        # M x (N_m, T+1)
    corpus = Corpus(tuple(f"domain{m}" for m in range(domains)), split(), split(),
                    torch.full((domains,), float("nan"), dtype=torch.float64), cfg.vocab, seq_len, key="bench")
    return Substrate(corpus, base.base_state_dict(), specialists, [float("nan")] * domains)


def make_step(name: str, batch: int, seq_len: int, device: str = "cpu", seed: int = 0, cell: str = "R", **overrides):
    """One adaptation step of a cell exactly as `substrate.cell.run_cell` takes it (`train_step`).

    Builds a timing-only substrate (`bench_substrate`), the cell's starting state
    (`substrate.cell.build_state`: frozen base, bank by alignment 0.5, router of the cell's kind, Adam)
    and returns ``(step, state)``; ``step()`` runs `train_step` at the state's current step (batch
    of ``(seed, step)``, warm-up/cosine learning rate, features, gates, forward, backward, global-norm
    clip, Adam), advances the step and returns the loss. `overrides` are further `CellConfig` fields.
    """
    ccfg, sub, st = _cell_state(name, batch, seq_len, device, seed, cell, **overrides)
    return _step_fn(ccfg, sub, st), st


def _cell_state(name: str, batch: int, seq_len: int, device: str = "cpu", seed: int = 0, cell: str = "R", **overrides):
    """``(CellConfig, timing-only Substrate, RunState)`` of a cell as `make_step` builds them."""
    from substrate.adapt import build_state
    from substrate.config import CellConfig

    # The timing corpus is random windows without a generator: the step reads fixed windows (fresh ones,
    # `substrate.corpus.fresh_batch`, add about 1 ms a batch of 8 on tiny and 2 ms on small, measured).
    ccfg = CellConfig.of(cell=cell, preset=name, batch=batch, context=seq_len, seed=seed, device=device, steps=1_000_000,
                         **{"train_data": "windows", **overrides})
    sub = bench_substrate(ccfg.model_config(), seq_len, seed=seed)
    return ccfg, sub, build_state(ccfg, sub)


def _step_fn(ccfg, sub, st):
    from substrate.adapt import adaptation, train_step

    device = ccfg.device
    tcfg = adaptation(ccfg)

    def step() -> float:
        loss = train_step(ccfg, st, sub.corpus, tcfg)
        st.step += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


def bench_adaptation(name: str, cfg: BenchConfig, device: str = "cpu") -> dict:
    """Tokens/s, FLOPs/token and achieved FLOP/s of one adaptation step of preset `name`.

    On CPU the achieved FLOP/s is divided by a dense fp32 ``n x n`` matmul (n = max(1024, D))
    timed interleaved with the step; on CUDA by the device's dense bf16 peak (MFU), with a measured
    bf16 8192^2 matmul alongside (`CUDA_STEP_SHAPES`: widened-1536 at 8 x 512). Returns a
    ``skipped`` reason when the preset is too big for this run (quick mode on CPU).
    """
    mcfg = preset(name)
    full, quick = STEP_SHAPES.get(name, ((8, mcfg.seq_len), (2, mcfg.seq_len)))
    params = param_breakdown(mcfg)["base"]
    cuda = torch.device(device).type == "cuda"
    if cfg.quick and not cuda and (quick is None or params > CPU_QUICK_MAX_PARAMS):
        return {"preset": name, "base_params": params,
                "skipped": f"{params / 1e6:.0f}M base parameters: timed only without --quick (one step takes seconds on CPU)"}
    batch, seq_len = quick if (cfg.quick and quick is not None) else full
    if cuda:
        batch, seq_len = CUDA_STEP_SHAPES.get(name, full)
    seq_len = min(seq_len, mcfg.seq_len)
    step, _ = make_step(name, batch, seq_len, device, cfg.seed)
    fpt = step_flops_per_token(mcfg, seq_len)
    tokens = batch * seq_len
    out = {"preset": name, "cell": "R", "device": device, "base_params": params, "batch": batch, "seq_len": seq_len,
           "tokens_per_step": tokens, "flops_per_token": fpt}
    if cuda:
        from substrate.model import gpu_peak_flops

        n = 8192
        t = interleaved({"step": step, "matmul": matmul_case(n, torch.bfloat16, cfg.seed, device)}, cfg.repeats,
                        cfg.min_sample_s)
        peak = gpu_peak_flops(device)
        out.update(step_s=t["step"].median, tokens_per_s=tokens / t["step"].median,
                   achieved_flops=fpt * tokens / t["step"].median, peak_flops=peak, matmul_n=n,
                   matmul_bf16_flops=2 * n ** 3 / t["matmul"].median)
        out["mfu"] = out["achieved_flops"] / peak
        return out
    n = max(1024, mcfg.d_model)
    t = interleaved({"step": step, "matmul": matmul_case(n, seed=cfg.seed)}, cfg.repeats, cfg.min_sample_s)
    mm = 2 * n ** 3 / t["matmul"].median
    step_s = t["step"].median
    out.update(step_s=step_s, tokens_per_s=tokens / step_s, achieved_flops=fpt * tokens / step_s,
               matmul_n=n, matmul_flops=mm)
    out["fraction_of_matmul"] = out["achieved_flops"] / mm
    return out


# ---------------------------------------------------------------------------------------------
# The lifecycle's fitness pass and the routing search's population: batched vs sequential
# ---------------------------------------------------------------------------------------------

#: (context, fit windows per domain) of the fitness comparison per preset, as (full, quick).
FITNESS_SHAPES = {"tiny": ((64, 4), (32, 1)), "small": ((128, 4), (64, 1))}


@torch.no_grad()
def sequential_loo_losses(cfg, st, corpus, step: int):
    """The reference for `substrate.cell.loo_losses`: the same selection batch, features and gates,
    but K + 1 separate forwards (all gates, then slot k's gate zeroed, one slot at a time) instead
    of the gate variants folded into the batch. Returns ``loo (K, M)`` and ``full (M,)`` on CPU."""
    from substrate.adapt import _FIT, step_generator
    from substrate.corpus import sample_batch
    from substrate.model import autocast, routing_features

    M, K, w = corpus.domains, cfg.slots, cfg.fit_windows
    dom = torch.arange(M).repeat_interleave(w)
    x, y, _ = sample_batch(corpus, "train", M * w, step_generator(cfg.seed, step, _FIT), domains=dom)
    x, y = x.to(cfg.device), y.to(cfg.device)
    gates = st.router(routing_features(st.model, x, cfg.features, cfg.pooling), step)   # (N, T, K)
    onehot = torch.nn.functional.one_hot(dom, M).double().to(cfg.device)
    per_domain = lambda nll: (nll.double() @ onehot) / w                                 # noqa: E731
    with autocast(cfg.device):
        full = per_domain(st.model.token_nll(x, y, gates).mean(-1))
        loo = []
        for k in range(K):
            g = gates.clone()
            g[..., k] = 0
            loo.append(per_domain(st.model.token_nll(x, y, g).mean(-1)))
    return torch.stack(loo).cpu(), full.cpu()


@torch.no_grad()
def sequential_population_losses(rc, st, vectors, x, y, domains, n_domains: int):
    """The reference for `substrate.routing.population_losses`: one forward per member (P passes)."""
    from sandbox.router import router_gates, vector_to_params
    from substrate.model import autocast, routing_features

    cell = rc.cell
    N, T = x.shape
    feats = routing_features(st.model, x, cell.features, cell.pooling)                 # (N, T, F)
    onehot = torch.nn.functional.one_hot(domains.to(x.device), n_domains).double()     # (N, M)
    out = []
    for p in range(vectors.shape[0]):
        params = vector_to_params(vectors[p].to(feats.dtype), st.router.cfg)
        gates = router_gates(st.router.cfg, params, feats.reshape(N * T, -1), st.step).reshape(N, T, -1)
        with autocast(cell.device):
            nll = st.model.token_nll(x, y, gates).mean(-1).double()                     # (N,)
        out.append(((nll @ onehot) / onehot.sum(0).clamp_min(1)).mean())
    return torch.stack(out).cpu()


def bench_fitness(name: str, cfg: BenchConfig, device: str = "cpu") -> dict:
    """The lifecycle event's fitness pass and one generation's population losses, batched against
    sequential, on preset `name`, timed interleaved with one adaptation step and the reference matmul.

    Fitness (`substrate.cell.loo_losses`): K + 1 gate variants (all slots, then each slot zeroed)
    of ``M x fit_windows`` selection windows, folded into the batch (`substrate.cell.folded_nll`:
    ``fold_rows(device) // N`` variants per forward) against `sequential_loo_losses` (K + 1
    forwards). Population (`substrate.routing.population_losses`): P routers on
    ``M x search_windows`` windows, folded the same way, against `sequential_population_losses`
    (P forwards). Both pairs must give the same
    losses (``*_max_abs_diff``; float32 forwards of different batch sizes round differently).
    The adaptation step (`make_step`, cell R) gives the event's cost in steps and the step's
    share of the measured matmul rate, from the same interleaved run.
    """
    from sandbox import evolution as evo
    from sandbox.router import params_to_vector
    from sandbox.streams import Purpose, generator
    from substrate.fitness import loo_losses
    from substrate.routing import RoutingArms, _search_batch, population_losses

    (seq_len, fit_w), quick = FITNESS_SHAPES.get(name, ((64, 4), (32, 1)))
    if cfg.quick:
        seq_len, fit_w = quick
    mcfg = preset(name)
    seq_len = min(seq_len, mcfg.seq_len)
    batch = (STEP_SHAPES.get(name, ((8, seq_len), None))[1 if cfg.quick else 0] or (2, seq_len))[0]
    if torch.device(device).type == "cuda":
        batch = CUDA_STEP_SHAPES.get(name, (8, seq_len))[0]
    ccfg, sub, st = _cell_state(name, batch, seq_len, device, cfg.seed, fit_windows=fit_w)
    step = _step_fn(ccfg, sub, st)
    corpus = sub.corpus
    rc = RoutingArms(cell=ccfg)
    P = rc.evolution.population
    x, y, dom = _search_batch(rc, sub, Purpose.SEARCH_BATCH, 0)
    vec = params_to_vector({k: v.detach().double().cpu() for k, v in st.router.params().items()})[None]   # (1, D)
    ecfg = rc.evolution
    search = evo.init_search(ecfg, 1, vec.shape[-1], [generator(Purpose.EVO_SEARCH, cfg.seed)])
    unit = evo.logit_units({k: v.detach().double().cpu()[None] for k, v in st.router.params().items()})
    pop = evo.propose(vec, params_to_vector(unit), search, ecfg, [generator(Purpose.EVO_SEARCH, cfg.seed)])[0]

    loo_b, full_b, _ = loo_losses(ccfg, st, corpus, st.step)
    loo_s, full_s = sequential_loo_losses(ccfg, st, corpus, st.step)
    pop_b = population_losses(rc, st, pop, x, y, dom, corpus.domains)
    pop_s = sequential_population_losses(rc, st, pop, x, y, dom, corpus.domains)
    loo_diff = float(max((loo_b - loo_s).abs().max(), (full_b - full_s).abs().max()))
    pop_diff = float((pop_b - pop_s).abs().max())

    cuda = torch.device(device).type == "cuda"
    n = 8192 if cuda else max(1024, mcfg.d_model)          # on CUDA: a bf16 matmul, as `bench_adaptation`
    fns = {"step": step,
           "fitness_batched": lambda: loo_losses(ccfg, st, corpus, st.step),
           "fitness_sequential": lambda: sequential_loo_losses(ccfg, st, corpus, st.step),
           "population_batched": lambda: population_losses(rc, st, pop, x, y, dom, corpus.domains),
           "population_sequential": lambda: sequential_population_losses(rc, st, pop, x, y, dom, corpus.domains),
           "matmul": matmul_case(n, torch.bfloat16, cfg.seed, device) if cuda else matmul_case(n, seed=cfg.seed)}
    t = interleaved(fns, cfg.repeats if cfg.quick else min(cfg.repeats, 3), cfg.min_sample_s)
    m = {k: v.median for k, v in t.items()}
    mm = 2 * n ** 3 / m["matmul"]
    tokens = batch * seq_len
    fpt = step_flops_per_token(mcfg, seq_len)
    return {"preset": name, "device": device, "slots": ccfg.slots, "domains": corpus.domains,
            "fit_windows": fit_w, "seq_len": seq_len, "variants": ccfg.slots + 1,
            "population": P, "search_windows": int(x.shape[0]),
            "fitness_batched_s": m["fitness_batched"], "fitness_sequential_s": m["fitness_sequential"],
            "fitness_speedup": m["fitness_sequential"] / m["fitness_batched"], "fitness_max_abs_diff": loo_diff,
            "population_batched_s": m["population_batched"], "population_sequential_s": m["population_sequential"],
            "population_speedup": m["population_sequential"] / m["population_batched"],
            "population_max_abs_diff": pop_diff,
            "step_s": m["step"], "batch": batch,
            "event_steps_batched": m["fitness_batched"] / m["step"],
            "event_steps_sequential": m["fitness_sequential"] / m["step"],
            "matmul_n": n, "matmul_dtype": "bf16" if cuda else "fp32", "matmul_flops": mm,
            "step_fraction_of_matmul": fpt * tokens / m["step"] / mm}
