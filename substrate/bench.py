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
    from substrate.cell import Substrate
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
    from substrate.cell import CellConfig, build_state, train_step
    from substrate.train import TrainConfig

    ccfg = CellConfig.of(cell=cell, preset=name, batch=batch, context=seq_len, seed=seed, device=device, steps=1_000_000,
                      **overrides)
    sub = bench_substrate(ccfg.model_config(), seq_len, seed=seed)
    st = build_state(ccfg, sub)
    tcfg = TrainConfig(steps=ccfg.steps, lr=ccfg.lr, batch=batch, warmup=10, min_lr_ratio=0.1)

    def step() -> float:
        loss = train_step(ccfg, st, sub.corpus, tcfg)
        st.step += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, st


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
