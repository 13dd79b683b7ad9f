"""Pretraining, specialists, initial banks and evaluation on `tiny` (a few dozen steps each)."""

import dataclasses
import math

import pytest
import torch

import substrate.train as train_mod
from sandbox.adapters import product_inner, product_norm, products
from sandbox.errors import BadInput
from substrate.corpus import CorpusConfig, synthetic_corpus
from substrate.model import build_model, load_banks, preset
from substrate.train import TrainConfig, evaluate, initial_banks, lr_at, pretrain, pretraining, train_specialists

CFG = preset("tiny", seq_len=32, slots=6, rank=4)
CORPUS_CFG = CorpusConfig(domains=3, vocab=CFG.vocab, clusters=8, dim=16, true_rank=2, seq_len=32,
                          train_windows=96, heldout_windows=24, seed=1)




@pytest.fixture(scope="module")
def corpus():
    return synthetic_corpus(CORPUS_CFG)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    log: list = []
    model = pretrain(CFG, corpus, pretraining(40, lr=1e-2, batch=12, seed=0), cache_dir=cache, log=log, log_every=1)
    return model, log, cache


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (44 / 89))))


def test_pretraining_loss_falls(trained):
    _, log, _ = trained
    losses = [r["loss"] for r in log]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    assert losses[0] == pytest.approx(math.log(CFG.vocab), abs=0.1)      # starts near uniform
    assert sum(losses[-5:]) / 5 < losses[0] - 0.3


def test_heldout_loss_stays_above_entropy_floor(trained, corpus):
    model, _, _ = trained
    ev = evaluate(model, corpus, "heldout")
    assert ev.tokens.tolist() == [CORPUS_CFG.heldout_windows * CORPUS_CFG.seq_len] * CORPUS_CFG.domains
    assert (ev.nll > ev.floors).all()
    # The true model's NLL on the same windows sits near the floor and below the trained model.
    oracle = torch.stack([corpus.language.nll(m, w).mean() for m, w in enumerate(corpus.heldout)])
    assert (ev.nll > oracle).all()
    assert ev.balanced == pytest.approx(float(ev.nll.mean()))
    rows = ev.rows(step=40)
    assert rows[-1]["domain"] == "balanced" and rows[-1]["log_ppl"] == pytest.approx(ev.balanced)


def test_evaluate_matches_direct_loss(trained, corpus):
    model, _, _ = trained
    ev = evaluate(model, corpus, "heldout", batch=5, max_windows=7)
    w = corpus.heldout[1][:7].long()
    with torch.no_grad():
        _, loss = model(w[:, :-1], targets=w[:, 1:])
    assert float(ev.nll[1]) == pytest.approx(float(loss), rel=1e-5)
    assert int(ev.tokens[1]) == 7 * CORPUS_CFG.seq_len


def test_same_seed_same_weights_and_cache(trained, corpus, monkeypatch):
    model, log, cache = trained
    a = pretrain(CFG, corpus, pretraining(4, lr=1e-2, batch=4, seed=3))
    b = pretrain(CFG, corpus, pretraining(4, lr=1e-2, batch=4, seed=3))
    c = pretrain(CFG, corpus, pretraining(4, lr=1e-2, batch=4, seed=4))
    for (n, p), q in zip(a.base_state_dict().items(), b.base_state_dict().values()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.wte.weight, c.wte.weight)
    assert len(list(cache.glob("base-*.pt"))) == 1
    monkeypatch.setattr(train_mod, "_fit_base", lambda *a, **k: pytest.fail("should load from the cache"))
    log2: list = []
    again = pretrain(CFG, corpus, pretraining(40, lr=1e-2, batch=12, seed=0), cache_dir=cache, log=log2)
    assert log2 == log
    for p, q in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(p, q)


def test_bad_vocab_is_refused(corpus):
    with pytest.raises(BadInput, match="vocab"):
        pretrain(preset("tiny", vocab=128), corpus, pretraining(1))


@pytest.fixture(scope="module")
def specialists(trained, corpus):
    model, _, cache = trained
    log: list = []
    sp = train_specialists(model, corpus, steps=25, lr=2e-2, batch=12, cache_dir=cache, seed=0, log=log)
    return sp, log


def test_specialists_shapes_cache_and_benefit(trained, corpus, specialists, monkeypatch):
    model, _, cache = trained
    sp, log = specialists
    M = corpus.domains
    assert set(sp) == set(model.banks())
    A, B = sp["blocks.0.attn.qkv"]
    assert A.shape == (M, CFG.rank, CFG.d_model) and B.shape == (M, 3 * CFG.d_model, CFG.rank)
    assert (product_norm(A, B) > 0).all()
    # the frozen base is untouched
    assert torch.equal(model.wte.weight, pretrain(CFG, corpus, pretraining(40, lr=1e-2, batch=12, seed=0), cache_dir=cache).wte.weight)
    # cached
    monkeypatch.setattr(train_mod, "_adamw", lambda *a, **k: pytest.fail("should load from the cache"))
    again = train_specialists(model, corpus, steps=25, lr=2e-2, batch=12, cache_dir=cache, seed=0)
    assert all(torch.equal(sp[n][0], again[n][0]) and torch.equal(sp[n][1], again[n][1]) for n in sp)
    # each specialist, routed to its own domain, beats the base there on held-out data
    K = CFG.slots
    factors, assignment = initial_banks(sp, 1.0, K, torch.Generator().manual_seed(0), scale=CFG.lora_alpha / CFG.rank)
    adapted = build_model(CFG)
    adapted.load_state_dict(model.state_dict())
    load_banks(adapted, factors)
    oracle = lambda x, m: torch.nn.functional.one_hot(assignment[m], K).float().expand(x.shape[0], 1, K)
    base_ev, spec_ev = evaluate(model, corpus), evaluate(adapted, corpus, gates_fn=oracle)
    assert (spec_ev.nll < base_ev.nll).all()


def test_specialists_are_independent_per_domain(trained, corpus):
    """Joint training equals separate runs: specialist 0 does not depend on the other domains' data
    (one-hot gates route no gradient across slots, and Adam is elementwise)."""
    model, _, _ = trained
    other = dataclasses.replace(corpus, train=[corpus.train[0]] + [w.flip(0).roll(1, 1) for w in corpus.train[1:]],
                                key="changed")
    a = train_specialists(model, corpus, steps=4, lr=2e-2, batch=6, seed=2)
    b = train_specialists(model, other, steps=4, lr=2e-2, batch=6, seed=2)
    for name in a:
        for fa, fb in zip(a[name], b[name]):
            torch.testing.assert_close(fa[0], fb[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(a["blocks.0.attn.qkv"][1][1], b["blocks.0.attn.qkv"][1][1])


def bank_alignment(factors, specialists, assignment):
    """Oracle: cosine between each assigned slot's update and its domain's specialist, pooled over
    banks, ``(M,)``: ``sum_banks <P_k, S_m> / sqrt(sum_banks ||P_k||^2 * sum_banks ||S_m||^2)``."""
    inner = norm_p = norm_s = 0.0
    for name, (SA, SB) in specialists.items():
        A, B = factors[name]
        A, B = A[assignment].double(), B[assignment].double()
        SA, SB = SA.double(), SB.double()
        inner = inner + product_inner(A, B, SA, SB)
        norm_p = norm_p + product_inner(A, B, A, B)
        norm_s = norm_s + product_inner(SA, SB, SA, SB)
    return inner / (norm_p * norm_s).sqrt()


def test_initial_banks_end_points_and_monotone(specialists):
    sp, _ = specialists
    K, scale = CFG.slots, CFG.lora_alpha / CFG.rank
    cos, banks = [], {}
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        f, asg = initial_banks(sp, a, K, torch.Generator().manual_seed(9), scale=scale)
        banks[a] = f
        cos.append(bank_alignment(f, sp, asg))
    assert len(set(asg.tolist())) == asg.numel() == 3
    torch.testing.assert_close(cos[-1], torch.ones(3, dtype=torch.float64))
    assert cos[0].abs().max() < 0.15
    for lo, hi in zip(cos, cos[1:]):
        assert (hi > lo).all()
    for name, (SA, SB) in sp.items():
        A1, B1 = banks[1.0][name]
        torch.testing.assert_close(products(A1[asg], B1[asg]), products(SA, SB), atol=1e-5, rtol=1e-4)
        # the K - M other slots are the same random adapters whatever a (common random numbers)
        others = torch.tensor([k for k in range(K) if k not in asg.tolist()])
        A0, B0 = banks[0.0][name]
        assert torch.equal(A0[others], A1[others]) and torch.equal(B0[others], B1[others])
        # random slots have the specialists' mean update norm
        mean_norm = float((product_norm(SA, SB) * scale).mean())
        torch.testing.assert_close(product_norm(A0, B0) * scale, torch.full((K,), mean_norm), rtol=1e-4, atol=0)


def test_initial_banks_bad_input(specialists):
    sp, _ = specialists
    g = torch.Generator()
    with pytest.raises(BadInput, match="--alignment"):
        initial_banks(sp, 1.5, CFG.slots, g)
    with pytest.raises(BadInput, match="--slots"):
        initial_banks(sp, 0.5, 2, g)
    with pytest.raises(BadInput, match="assignment"):
        initial_banks(sp, 0.5, CFG.slots, g, assignment=torch.tensor([0, 0, 1]))


def test_one_warmup_rule_gives_each_phase_its_recorded_schedule():
    """`warmup_steps` is the only warm-up rule: a tenth of the run for training (pretraining,
    specialists, fusion), a twentieth for adapting a cell, at least one step; the cell's schedule
    (`adaptation`) is the `TrainConfig` every cell run built by hand before the rule existed."""
    from substrate.adapt import adaptation
    from substrate.cell import CellConfig
    from substrate.train import TrainConfig, lr_schedule, pretraining, warmup_steps

    for steps in (1, 5, 9, 10, 19, 20, 21, 199, 200, 25_000):
        assert warmup_steps(steps, "train") == max(1, steps // 10)
        assert warmup_steps(steps, "adapt") == max(1, steps // 20)
        assert pretraining(steps, batch=4) == TrainConfig(steps=steps, batch=4, warmup=max(1, steps // 10))
        assert lr_schedule(steps, "adapt", lr=0.5).warmup == max(1, steps // 20)
    cfg = CellConfig(steps=300)
    assert adaptation(cfg) == TrainConfig(steps=300, lr=cfg.lr, batch=cfg.batch, warmup=15, min_lr_ratio=0.1)
    with pytest.raises(KeyError):
        warmup_steps(100, "finetune")
