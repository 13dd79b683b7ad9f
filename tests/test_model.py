"""The substrate model on `tiny`: shapes, the mixture against a loop, causality of routing,
freezing, seeds, parameter and FLOP accounting (widened-1536 on the meta device)."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sandbox.adapters import AdapterBank, init_factors
from sandbox.errors import BadInput
from sandbox.router import Router, RouterConfig
from substrate.model import (PRESETS, GPT, build_model, flops_per_token, freeze_base, load_banks, param_breakdown, pool,
                             preset, routing_features, ModelConfig)

CFG = preset("tiny", slots=6, rank=4)


def meta_model(cfg: ModelConfig) -> GPT:
    """The model on the meta device: shapes and parameter counts without allocating weights."""
    with torch.device("meta"):
        return GPT(cfg, torch.Generator())


def count_params(model: torch.nn.Module) -> dict[str, int]:
    """Counted from a built model (the oracle for `param_breakdown`): ``base`` (every non-adapter
    weight, tied head counted once) and ``adapters``."""
    base = sum(p.numel() for n, p in model.named_parameters() if not GPT.is_adapter(n))
    ad = sum(p.numel() for n, p in model.named_parameters() if GPT.is_adapter(n))
    return {"base": base, "adapters": ad}


def _randomise_banks(model: GPT, seed: int = 5) -> None:
    """Give every bank non-zero random factors (LoRA init has B = 0, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    for bank in model.banks().values():
        c = bank.cfg
        A, B = init_factors((), c.n_slots, c.rank, c.d_in, c.d_out, "random", g, scale=c.scale, init_norm=0.5)
        bank.set_factors(A, B)


@pytest.fixture(scope="module")
def model():
    m = build_model(CFG, seed=3)
    _randomise_banks(m)
    return m.eval()


def test_shapes(model):
    idx = torch.randint(CFG.vocab, (3, 20))
    gates = torch.rand(3, 20, CFG.slots)
    assert model(idx).shape == (3, 20, CFG.vocab)
    assert model(idx, gates).shape == (3, 20, CFG.vocab)
    assert model(idx, gates[:, :1]).shape == (3, 20, CFG.vocab)           # per-sequence gates
    logits, loss = model(idx, gates, targets=idx)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.hidden(idx).shape == (3, 20, CFG.d_model)
    assert model.token_nll(idx, idx, gates).shape == (3, 20)
    for kind in ("embed", "hidden"):
        for pooling in ("causal", "sequence"):
            assert routing_features(model, idx, kind, pooling).shape == (3, 20, CFG.d_model)
    banks = model.banks()
    assert len(banks) == 4 * CFG.n_layer
    assert set(banks) == {f"blocks.{i}.{p}" for i in range(CFG.n_layer) for p in ("attn.qkv", "attn.out", "mlp.fc", "mlp.proj")}
    assert banks["blocks.0.attn.qkv"].A.shape == (CFG.slots, CFG.rank, CFG.d_model)
    assert banks["blocks.0.attn.qkv"].B.shape == (CFG.slots, 3 * CFG.d_model, CFG.rank)
    assert banks["blocks.1.mlp.proj"].A.shape == (CFG.slots, CFG.rank, CFG.d_ff)


def test_targets_select_banks():
    assert set(n.split(".", 2)[2] for n in build_model(preset("tiny", targets="attn")).banks()) == {"attn.qkv", "attn.out"}
    assert set(n.split(".", 2)[2] for n in build_model(preset("tiny", targets="mlp")).banks()) == {"mlp.fc", "mlp.proj"}


def _loop_forward(self, x, gates):
    """Oracle: ``sum_k g_k s B_k A_k x`` one slot at a time."""
    out = torch.zeros(*x.shape[:-1], self.B.shape[-2])
    for k in range(self.A.shape[0]):
        out = out + gates[..., k:k + 1] * self.scale * ((x @ self.A[k].T) @ self.B[k].T)
    return out


def test_mixture_equals_loop_over_adapters(model, monkeypatch):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(CFG.vocab, (2, 24), generator=g)
    gates = torch.rand(2, 24, CFG.slots, generator=g)
    fast = model(idx, gates)
    assert (fast - model(idx)).abs().max() > 1e-3                          # the adapters matter
    monkeypatch.setattr(AdapterBank, "forward", _loop_forward)
    slow = model(idx, gates)
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_per_sequence_gates_equal_merged_weights(model):
    """Fixed gates per sequence: the adapted model equals a plain model with W + sum_k g_k s B_k A_k."""
    idx = torch.randint(CFG.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    gates = torch.rand(1, 1, CFG.slots, generator=torch.Generator().manual_seed(2))
    merged = build_model(CFG, seed=3)
    merged.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, mod in merged.named_modules():
            if hasattr(mod, "bank") and mod.bank is not None:
                delta = (gates[0, 0][:, None, None] * mod.bank.products()).sum(0)   # (d_out, d_in)
                mod.weight += delta
    torch.testing.assert_close(model(idx, gates), merged(idx), atol=1e-5, rtol=1e-5)


def test_no_gates_and_zero_gates_give_the_base(model):
    idx = torch.randint(CFG.vocab, (2, 10))
    torch.testing.assert_close(model(idx, torch.zeros(2, 10, CFG.slots)), model(idx), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind,router", [("embed", "softmax"), ("hidden", "sigmoid")])
def test_causal_routing_never_leaks_the_future(model, kind, router):
    """With the default causal pooling, changing tokens after position t never changes log-probs at <= t."""
    g = torch.Generator().manual_seed(7)
    r = Router(RouterConfig(kind=router, n_features=CFG.d_model, n_slots=CFG.slots, init_std=3.0), generator=g)
    idx = torch.randint(CFG.vocab, (4, 32), generator=g)

    def logp(tokens, pooling="causal"):
        with torch.no_grad():
            gates = r(routing_features(model, tokens, kind, pooling), step=0)
            return torch.log_softmax(model(tokens, gates), -1)

    base = logp(idx)
    for t in (0, 9, 30):
        other = idx.clone()
        other[:, t + 1:] = torch.randint(CFG.vocab, other[:, t + 1:].shape, generator=g)
        assert torch.equal(logp(other)[:, :t + 1], base[:, :t + 1])
    # Whole-sequence pooling leaks: the same change moves earlier positions (the documented caveat).
    other = idx.clone()
    other[:, 20:] = (other[:, 20:] + 1) % CFG.vocab
    leak = (logp(other, "sequence")[:, :20] - logp(idx, "sequence")[:, :20]).abs().max()
    assert leak > 1e-4


def test_pool_is_prefix_mean():
    h = torch.randn(2, 7, 3)
    loop = torch.stack([h[:, : t + 1].mean(1) for t in range(7)], 1)
    torch.testing.assert_close(pool(h, "causal"), loop)
    torch.testing.assert_close(pool(h, "sequence"), h.mean(1, keepdim=True).expand_as(h))


def test_hidden_features_ignore_adapters(model):
    idx = torch.randint(CFG.vocab, (2, 12))
    torch.testing.assert_close(routing_features(model, idx, "hidden"), pool(model.hidden(idx, None).detach()))
    torch.testing.assert_close(routing_features(model, idx, "embed"), pool(model.wte(idx).detach()))


def test_freeze_base_trains_only_adapters():
    m = build_model(CFG, seed=0)
    params = freeze_base(m)
    assert {id(p) for p in params} == {id(p) for p in m.adapter_parameters()}
    idx = torch.randint(CFG.vocab, (2, 8))
    _, loss = m(idx, torch.rand(2, 8, CFG.slots), targets=idx)
    loss.backward()
    assert all(p.grad is None for p in m.base_parameters())
    assert all(p.grad is not None for p in m.adapter_parameters())


def test_same_seed_same_weights():
    a, b, c = build_model(CFG, seed=11), build_model(CFG, seed=11), build_model(CFG, seed=12)
    for (n, p), q, r in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.state_dict().values(), c.state_dict().values()))


def test_load_banks_roundtrip(model):
    m = build_model(CFG, seed=0)
    load_banks(m, {n: (b.A.detach(), b.B.detach()) for n, b in model.banks().items()})
    for n, b in m.banks().items():
        assert torch.equal(b.A, model.banks()[n].A) and torch.equal(b.B, model.banks()[n].B)
    with pytest.raises(BadInput):
        load_banks(m, {})


def test_widened_1536_parameter_count_on_meta():
    cfg = PRESETS["widened-1536"]
    m = meta_model(cfg)
    assert next(m.parameters()).device.type == "meta"
    counted, b = count_params(m), param_breakdown(cfg)
    assert counted == {"base": b["base"], "adapters": b["adapters"]}
    assert 140e6 <= counted["base"] <= 165e6
    assert b["embedding"] == 32000 * 1536 == 49_152_000
    assert b["block"] == 12 * 1536 ** 2 + 2 * 1536                        # ~28.3M


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_breakdown_matches_built_model(name):
    cfg = PRESETS[name]
    counted, b = count_params(meta_model(cfg)), param_breakdown(cfg)
    assert counted == {"base": b["base"], "adapters": b["adapters"]}
    assert (b["base"] + b["adapters"] < 1e6) == (name == "tiny")


def test_flops_per_token_matches_flop_counter():
    """Pretraining: exact against torch's FLOP counter (math SDPA so attention matmuls are counted)."""
    cfg = preset("tiny")
    m = build_model(cfg)
    idx = torch.randint(cfg.vocab, (2, cfg.seq_len + 1))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = m(idx[:, :-1], targets=idx[:, 1:])
        loss.backward()
    assert fc.get_total_flops() / idx[:, 1:].numel() == flops_per_token(cfg, adapters=False)
    # Adaptation (frozen base): the formula counts input gradients into the first adapted layer,
    # which autograd skips, so it is an upper bound within a few percent.
    freeze_base(m)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        _, loss = m(idx[:, :-1], torch.rand(2, cfg.seq_len, cfg.slots), idx[:, 1:])
        loss.backward()
    measured = fc.get_total_flops() / idx[:, 1:].numel()
    assert measured <= flops_per_token(cfg, adapters=True) <= 1.05 * measured


@pytest.mark.parametrize("field,value,flag", [("n_head", 3, "n_head"), ("targets", "ffn", "targets"),
                                              ("slots", 0, "--slots"), ("lora_alpha", -1.0, "--lora-alpha")])
def test_config_errors_name_the_flag(field, value, flag):
    with pytest.raises(BadInput, match=flag):
        ModelConfig(**{field: value})
    with pytest.raises(BadInput, match="--preset"):
        preset("huge")


def test_context_longer_than_seq_len_is_refused(model):
    with pytest.raises(BadInput, match="seq_len"):
        model(torch.zeros(1, CFG.seq_len + 1, dtype=torch.long))
