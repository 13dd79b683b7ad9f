"""Timing one adaptation step of a substrate preset (section 3 of `sandbox bench`).

One adaptation step, as a cell runs it on the frozen base:

1. routing features: causal prefix means of the base's post-stack hidden states (no adapters,
   no grad; `substrate.model.routing_features` with ``kind="hidden"``), ``(B, T, D)``;
2. gates from the sigmoid router on those features, ``(B, T, K)``;
3. forward through the frozen base with every adapter bank gated, mean token cross-entropy;
4. backward (input grads through the frozen base, weight grads of adapters and router) and one
   Adam step on the adapter factors and router parameters.

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

import torch

from sandbox.bench import BenchConfig, interleaved, matmul_case
from sandbox.router import Router, RouterConfig
from substrate.model import ModelConfig, autocast, build_model, flops_per_token, freeze_base, param_breakdown, preset, \
    routing_features

# Batch (sequences) and context per preset for the CPU benchmark; quick mode uses the second pair.
STEP_SHAPES = {"tiny": ((16, 64), (4, 64)), "small": ((8, 128), (2, 128)), "widened-1536": ((1, 256), None)}
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


def step_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """FLOPs per token of one adaptation step with hidden-state routing (module docstring)."""
    b = param_breakdown(cfg)
    n_mm_blocks = cfg.n_layer * (b["block"] - 2 * cfg.d_model)
    features = 2 * n_mm_blocks + 4 * cfg.n_layer * seq_len * cfg.d_model
    router = 4 * cfg.d_model * cfg.slots
    model = flops_per_token(cfg, adapters=True, seq_len=seq_len) - skipped_input_grad_flops(cfg, seq_len)
    return model + features + router


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """The attention part of `step_flops_per_token` (scores and weighted sums, full T x T)."""
    D, T, L = cfg.d_model, seq_len, cfg.n_layer
    skipped = 8 * T * D if cfg.targets == "mlp" else 0
    return 12 * L * T * D + 4 * L * T * D - skipped


def make_step(cfg: ModelConfig, batch: int, seq_len: int, device: str = "cpu", seed: int = 0):
    """Build a model, router, optimizer and one random batch.

    Returns ``(step, model, router)``; ``step()`` does one adaptation step and returns the loss.
    """
    model = build_model(cfg, seed, device)
    params = freeze_base(model)
    router = Router(RouterConfig(kind="sigmoid", n_features=cfg.d_model, n_slots=cfg.slots),
                    generator=torch.Generator().manual_seed(seed + 1)).to(device)
    opt = torch.optim.Adam(params + list(router.parameters()), lr=1e-4)
    g = torch.Generator().manual_seed(seed + 2)
    idx = torch.randint(cfg.vocab, (batch, seq_len + 1), generator=g).to(device)   # (B, T+1)
    x, y = idx[:, :-1], idx[:, 1:]                                                  # (B, T) each
    state = {"step": 0}

    def step() -> float:
        with autocast(device):
            feats = routing_features(model, x, "hidden")                           # (B, T, D)
            gates = router(feats, state["step"])                                   # (B, T, K)
            _, loss = model(x, gates, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["step"] += 1
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return loss.item()

    return step, model, router


def bench_adaptation(name: str, cfg: BenchConfig, device: str = "cpu") -> dict:
    """Tokens/s, FLOPs/token and achieved FLOP/s of one adaptation step of preset `name`.

    On CPU the achieved FLOP/s is divided by a dense fp32 ``n x n`` matmul (n = max(1024, D))
    timed interleaved with the step; on CUDA by the device's bf16 peak (MFU). Returns a
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
    seq_len = min(seq_len, mcfg.seq_len)
    step, _, _ = make_step(mcfg, batch, seq_len, device, cfg.seed)
    fpt = step_flops_per_token(mcfg, seq_len)
    tokens = batch * seq_len
    out = {"preset": name, "device": device, "base_params": params, "batch": batch, "seq_len": seq_len,
           "tokens_per_step": tokens, "flops_per_token": fpt}
    if cuda:
        from substrate.model import gpu_peak_flops

        t = interleaved({"step": step}, cfg.repeats, cfg.min_sample_s)
        peak = gpu_peak_flops(device)
        out.update(step_s=t["step"].median, tokens_per_s=tokens / t["step"].median,
                   achieved_flops=fpt * tokens / t["step"].median, peak_flops=peak)
        out["mfu"] = out["achieved_flops"] / peak
        return out
    n = max(1024, mcfg.d_model)
    # A multi-second step needs fewer rounds; its median over 3 rounds is still taken interleaved.
    repeats = cfg.repeats if params <= CPU_QUICK_MAX_PARAMS else min(cfg.repeats, 3)
    t = interleaved({"step": step, "matmul": matmul_case(n, seed=cfg.seed)}, repeats, cfg.min_sample_s)
    mm = 2 * n ** 3 / t["matmul"].median
    step_s = t["step"].median
    out.update(step_s=step_s, tokens_per_s=tokens / step_s, achieved_flops=fpt * tokens / step_s,
               matmul_n=n, matmul_flops=mm)
    out["fraction_of_matmul"] = out["achieved_flops"] / mm
    return out
