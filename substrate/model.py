"""The transformer substrate: a small GPT-style decoder with a shared adapter bank on its projections.

Built bottom-up in one file (nanoGPT style): config and presets, adapted linear layer, attention,
MLP, block, model, then routing features, freezing, parameter and FLOP accounting.

Maths of one adapted projection (weight ``W (d_out, d_in)``, bank of K slots of rank r, scale
``s = alpha / r``, gates ``g (B, T, K)``; the same gates for every adapted layer, and slot k is the
same adapter in every layer):

    y = W x + sum_k g_k s B_k A_k x          (the bank's two-matmul `gated_mixture`)
    y = W x                                   when gates is None (the plain base model)

Adapted projections per block (``targets``): ``attn.qkv`` (fused q/k/v, d_in = D, d_out = 3D: a
rank-r update of the fused matrix, i.e. q, k and v share the down factor A_k) and ``attn.out``
(D -> D) for "attn"; ``mlp.fc`` (D -> d_ff) and ``mlp.proj`` (d_ff -> D) for "mlp".

Blocks are pre-norm (``x + attn(ln(x))``, ``x + mlp(ln(x))``), LayerNorm without bias, linear layers
without bias, GELU MLP, learned absolute positions, causal SDPA (``is_causal=True``), and the output
head tied to the token embedding. CPU runs fp32; on CUDA wrap calls in `autocast(device)` (bf16).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from sandbox.adapters import AdapterBank, BankConfig
from sandbox.errors import check, require
from sandbox.identity import identity, never, rules
from sandbox.streams import Purpose, generator

TARGETS = ("attn+mlp", "attn", "mlp")
FEATURE_KINDS = ("embed", "hidden")
POOLINGS = ("causal", "sequence")


#: The identity rule of the adapters' fields (`sandbox.identity`): a pretrained base does not depend on them.
_ADAPTERS = never("the adapters' shape, not the base's: one pretrained base serves every bank", views="base")


@dataclass(frozen=True)
class ModelConfig:
    """Shape of the substrate. Field names are CLI flags (``d_model`` is ``--d-model``)."""

    vocab: int = 256
    """V: vocabulary size (the output head is tied to the V x D token embedding)."""
    d_model: int = 64
    """D: residual width."""
    n_layer: int = 2
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads (D must be divisible by it)."""
    d_ff: int = 256
    """Hidden width of the MLP."""
    seq_len: int = 64
    """T: maximum context (learned positions)."""
    slots: int = field(default=16, metadata=rules(_ADAPTERS))
    """K: adapter slots per adapted projection."""
    rank: int = field(default=8, metadata=rules(_ADAPTERS))
    """r: rank of each adapter."""
    lora_alpha: float = field(default=16.0, metadata=rules(_ADAPTERS))
    """LoRA alpha; adapter updates are scaled by alpha / r."""
    targets: str = field(default="attn+mlp", metadata=rules(_ADAPTERS))
    """Which projections hold a bank: attn+mlp, attn or mlp."""

    def __post_init__(self) -> None:
        for name, lo, hi in (("vocab", 2, 1 << 20), ("d_model", 1, 1 << 16), ("n_layer", 1, 256),
                             ("n_head", 1, 1024), ("d_ff", 1, 1 << 18), ("seq_len", 1, 1 << 16),
                             ("slots", 1, 1024), ("rank", 1, 4096)):
            v = getattr(self, name)
            require(isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi, name, v, f"an integer in [{lo}, {hi}]")
        check(self.d_model % self.n_head == 0, "n_head", self.n_head, f"a divisor of --d-model ({self.d_model})")
        require(self.rank <= self.d_model, "rank", self.rank, f"an integer <= --d-model ({self.d_model})")
        require(isinstance(self.lora_alpha, (int, float)) and math.isfinite(self.lora_alpha) and self.lora_alpha > 0,
                "lora_alpha", self.lora_alpha, "a number > 0")
        check(self.targets in TARGETS, "targets", self.targets, "one of " + ", ".join(TARGETS))

    @property
    def base_fields(self) -> dict:
        """The fields that shape the base weights (not the adapters): the pretraining cache key (the
        identity's ``base`` view, `sandbox.identity`)."""
        return identity(self, "base")


PRESETS: dict[str, ModelConfig] = {
    # ~0.12M base parameters: unit tests.
    "tiny": ModelConfig(vocab=256, d_model=64, n_layer=2, n_head=4, d_ff=256, seq_len=64),
    # ~1.1M base parameters: pretrains in minutes on 2 CPU cores.
    "small": ModelConfig(vocab=2048, d_model=128, n_layer=4, n_head=4, d_ff=512, seq_len=128),
    # The study's substrate: D = 1536, V = 32,000, 4 blocks, ~163M parameters (see param_breakdown).
    "widened-1536": ModelConfig(vocab=32000, d_model=1536, n_layer=4, n_head=12, d_ff=6144, seq_len=512),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A preset by name, with optional field overrides (``preset("tiny", slots=4)``)."""
    require(name in PRESETS, "preset", name, "one of " + ", ".join(PRESETS))
    return replace(PRESETS[name], **overrides)


# ---------------------------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------------------------


class AdaptedLinear(nn.Module):
    """``y = W x + gated_mixture(x, A, B, gates, alpha / r)`` (bias-free); plain ``W x`` without gates."""

    def __init__(self, d_in: int, d_out: int, cfg: ModelConfig, adapted: bool, generator: torch.Generator):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bank = (AdapterBank(BankConfig(cfg.slots, cfg.rank, d_in, d_out, float(cfg.lora_alpha)), init="lora",
                                 generator=generator) if adapted else None)

    def forward(self, x: Tensor, gates: Tensor | None = None) -> Tensor:
        y = Fn.linear(x, self.weight)                                       # (B, T, d_out)
        if gates is None or self.bank is None:
            return y
        B, T, d_in = x.shape
        g = gates.expand(B, T, gates.shape[-1]).reshape(B * T, -1)         # (B*T, K)
        delta = self.bank(x.reshape(B * T, d_in), g.to(x.dtype))            # (B*T, d_out)
        return y + delta.view(B, T, -1).to(y.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator):
        super().__init__()
        on = cfg.targets in ("attn+mlp", "attn")
        self.n_head = cfg.n_head
        self.qkv = AdaptedLinear(cfg.d_model, 3 * cfg.d_model, cfg, on, generator)
        self.out = AdaptedLinear(cfg.d_model, cfg.d_model, cfg, on, generator)

    def forward(self, x: Tensor, gates: Tensor | None) -> Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x, gates).split(D, dim=-1)                       # 3 x (B, T, D)
        q, k, v = (t.view(B, T, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = Fn.scaled_dot_product_attention(q, k, v, is_causal=True)       # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, D)                              # (B, T, D)
        return self.out(y, gates)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator):
        super().__init__()
        on = cfg.targets in ("attn+mlp", "mlp")
        self.fc = AdaptedLinear(cfg.d_model, cfg.d_ff, cfg, on, generator)
        self.proj = AdaptedLinear(cfg.d_ff, cfg.d_model, cfg, on, generator)

    def forward(self, x: Tensor, gates: Tensor | None) -> Tensor:
        return self.proj(Fn.gelu(self.fc(x, gates)), gates)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, generator: torch.Generator):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model, bias=False)
        self.attn = Attention(cfg, generator)
        self.ln2 = nn.LayerNorm(cfg.d_model, bias=False)
        self.mlp = MLP(cfg, generator)

    def forward(self, x: Tensor, gates: Tensor | None) -> Tensor:
        x = x + self.attn(self.ln1(x), gates)
        return x + self.mlp(self.ln2(x), gates)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Decoder-only transformer with tied embeddings and one adapter bank per adapted projection.

    ``forward(idx (B, T), gates (B, T, K) | (B, 1, K) | None, targets (B, T) | None)`` returns
    logits ``(B, T, V)`` and, with targets, also the mean token cross-entropy (nats).

    Initialisation (from `generator`, so the same seed gives the same weights): every matrix and
    embedding ~ N(0, 0.02^2); the residual outputs ``attn.out`` and ``mlp.proj`` ~ N(0, (0.02 /
    sqrt(2 n_layer))^2) (GPT-2); LayerNorm weights 1; adapters standard LoRA (A uniform, B = 0).
    """

    def __init__(self, cfg: ModelConfig, generator: torch.Generator | None = None):
        super().__init__()
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab, cfg.d_model)
        self.wpe = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, g) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model, bias=False)
        resid = 0.02 / math.sqrt(2 * cfg.n_layer)
        for name, p in self.named_parameters():
            if self.is_adapter(name) or name.startswith("ln") or ".ln" in name:
                continue
            std = resid if name.endswith(("attn.out.weight", "mlp.proj.weight")) else 0.02
            nn.init.normal_(p, 0.0, std, generator=g)

    def embed(self, idx: Tensor) -> Tensor:
        """Token plus position embeddings ``(B, T, D)``."""
        T = idx.shape[1]
        check(T <= self.cfg.seq_len, "seq_len", T, f"a context of at most {self.cfg.seq_len} tokens")
        return self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))   # (B, T, D)

    def hidden(self, idx: Tensor, gates: Tensor | None = None) -> Tensor:
        """Post-stack hidden states (after the final LayerNorm): ``(B, T, D)``."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, gates)
        return self.ln_f(x)

    def forward(self, idx: Tensor, gates: Tensor | None = None, targets: Tensor | None = None):
        logits = self.hidden(idx, gates) @ self.wte.weight.T                  # (B, T, V), tied head
        if targets is None:
            return logits
        loss = Fn.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    def token_nll(self, idx: Tensor, targets: Tensor, gates: Tensor | None = None) -> Tensor:
        """Per-token NLL in nats ``(B, T)`` (fp32 log-softmax over contiguous rows of the logits: the
        class dim transposed into the middle, as ``cross_entropy`` of ``(B, V, T)`` wants it, made
        the softmax stride through memory, 3-4x slower on the CPU; BENCHMARKS.md section 6)."""
        logits = self(idx, gates)
        V = logits.shape[-1]
        return Fn.cross_entropy(logits.float().reshape(-1, V), targets.reshape(-1), reduction="none").view(targets.shape)

    @staticmethod
    def is_adapter(name: str) -> bool:
        """Whether a parameter or state-dict entry belongs to an adapter bank: the one place that
        knows how the model names its adapter parts (every other module asks here)."""
        return ".bank." in name

    def banks(self) -> dict[str, AdapterBank]:
        """Every adapter bank by name (``blocks.0.attn.qkv`` ...), in layer order."""
        return {name[: -len(".bank")]: m for name, m in self.named_modules() if name.endswith(".bank")}

    def base_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not self.is_adapter(n)]

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if self.is_adapter(n)]

    def base_state_dict(self) -> dict[str, Tensor]:
        """The base weights only (no adapter factors): what pretraining caches."""
        return {k: v for k, v in self.state_dict().items() if not self.is_adapter(k)}


def build_model(cfg: ModelConfig, seed: int = 0, device: str | torch.device = "cpu") -> GPT:
    """A freshly initialised model from `seed` (weights drawn on CPU, then moved to `device`)."""
    return GPT(cfg, generator(Purpose.MODEL_INIT, int(seed))).to(device)


def freeze_base(model: GPT) -> list[nn.Parameter]:
    """Freeze every base weight (``requires_grad = False``); return the adapter parameters."""
    for p in model.base_parameters():
        p.requires_grad_(False)
    return model.adapter_parameters()


def load_banks(model: GPT, factors: dict[str, tuple[Tensor, Tensor]]) -> None:
    """Copy factors ``{name: (A (K, r, d_in), B (K, d_out, r))}`` into the model's banks in place."""
    banks = model.banks()
    check(set(factors) == set(banks), "banks", sorted(factors)[:3], f"exactly the model's banks {sorted(banks)[:3]}...")
    for name, (A, B) in factors.items():
        banks[name].set_factors(A.to(banks[name].A), B.to(banks[name].B))


def autocast(device: str | torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (CPU stays fp32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------
# Routing features
# ---------------------------------------------------------------------------------------------


def pool(h: Tensor, pooling: str = "causal") -> Tensor:
    """Pool ``h (B, T, F)`` over positions, keeping ``(B, T, F)``.

    ``causal``: prefix means ``p_t = (1/(t+1)) sum_{s<=t} h_s``, so position t only sees tokens <= t.
    ``sequence``: the whole-sequence mean at every position. This LEAKS future tokens into earlier
    positions' routing (and so into their predictions); use it only to measure that leak.
    """
    require(pooling in POOLINGS, "pooling", pooling, "one of " + ", ".join(POOLINGS))
    if pooling == "sequence":
        return h.mean(1, keepdim=True).expand_as(h)
    n = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)
    return h.cumsum(1) / n[None, :, None]                                    # (B, T, F)


@torch.no_grad()
def routing_features(model: GPT, idx: Tensor, kind: str = "embed", pooling: str = "causal") -> Tensor:
    """Router input ``(B, T, D)`` for tokens ``idx (B, T)``, detached from the graph.

    ``embed``: pooled token embeddings ``wte(idx)`` (no positions): the softmax baseline B3's input.
    ``hidden``: pooled post-stack hidden states of the base WITHOUT adapters (gates None): the
    sigmoid rewrite's input. Both are causal under the default pooling (see `pool`).
    """
    check(kind in FEATURE_KINDS, "features", kind, "one of " + ", ".join(FEATURE_KINDS))
    h = model.wte(idx) if kind == "embed" else model.hidden(idx, None)
    return pool(h.float(), pooling)


# ---------------------------------------------------------------------------------------------
# Parameter and FLOP accounting
# ---------------------------------------------------------------------------------------------


def param_breakdown(cfg: ModelConfig) -> dict[str, int]:
    """Exact parameter counts by group, from the config alone.

    Keys: ``embedding`` (V x D, shared with the head), ``positions`` (T x D), ``block`` (one block:
    4 D^2 attention + 2 D d_ff MLP + 2 D LayerNorm), ``blocks`` (all), ``final_norm`` (D), ``base``
    (the sum), ``adapters_per_block``, ``adapters`` (K r (d_in + d_out) per adapted projection).
    """
    D, K, r = cfg.d_model, cfg.slots, cfg.rank
    attn = 3 * D * D + D * D
    mlp = 2 * D * cfg.d_ff
    block = attn + mlp + 2 * D
    on_attn = cfg.targets in ("attn+mlp", "attn")
    on_mlp = cfg.targets in ("attn+mlp", "mlp")
    ad = K * r * ((D + 3 * D) + (D + D)) * on_attn + K * r * 2 * (D + cfg.d_ff) * on_mlp
    out = {"embedding": cfg.vocab * D, "positions": cfg.seq_len * D, "block": block,
           "blocks": cfg.n_layer * block, "final_norm": D}
    out["base"] = out["embedding"] + out["positions"] + out["blocks"] + out["final_norm"]
    out["adapters_per_block"] = ad
    out["adapters"] = cfg.n_layer * ad
    return out


def flops_per_token(cfg: ModelConfig, adapters: bool = True, frozen_base: bool | None = None,
                    seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), 6N-style plus attention.

    Counted: every matmul, as 2 FLOPs per multiply-add. Forward = 2 N_mm, where N_mm is the matmul
    weight count (blocks' projections plus the tied V x D head; embeddings lookups, norms, GELU and
    softmax are not counted). Backward = 4 N_mm when the base trains (input and weight gradients)
    and 2 N_mm when it is frozen (input gradients only). Attention scores and the weighted sum:
    forward 4 T D per layer (full T x T, as in nanoGPT; causal masking is not subtracted), backward
    twice that. Adapters (when ``adapters``): all K slots are computed densely by the two-matmul
    mixture, so each bank adds ``K r (d_in + d_out)`` weights, always trained: 6 FLOPs each.
    ``frozen_base`` defaults to ``adapters`` (adaptation freezes the base; pretraining does not).
    """
    T = seq_len or cfg.seq_len
    b = param_breakdown(cfg)
    n_mm = cfg.n_layer * (b["block"] - 2 * cfg.d_model) + b["embedding"]
    frozen = adapters if frozen_base is None else frozen_base
    base = (2 + (2 if frozen else 4)) * n_mm
    attn = 3 * 4 * cfg.n_layer * T * cfg.d_model
    return float(base + attn + (6 * b["adapters"] if adapters else 0))


# Dense bf16 tensor-core peaks (FLOP/s) by GPU name fragment.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def gpu_peak_flops(device: int | str | torch.device = 0) -> float:
    """The dense bf16 peak of a CUDA device, looked up by its name (`GPU_PEAK_BF16`)."""
    name = torch.cuda.get_device_name(device)
    for key, peak in GPU_PEAK_BF16.items():
        if key in name:
            return peak
    raise ValueError(f"unknown GPU {name!r}: add its dense bf16 peak to GPU_PEAK_BF16")
