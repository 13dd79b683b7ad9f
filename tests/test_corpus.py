"""Synthetic domain languages (exact entropy floors checked against an independent computation and
Monte Carlo), reproducibility, caching, batches, and real text folders with a local BPE."""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

from sandbox.errors import BadInput
from substrate.corpus import (CorpusConfig, build_language, load_text_domains, sample_batch, sample_windows,
                              stationary_law, synthetic_corpus)

SMALL = CorpusConfig(domains=3, vocab=48, clusters=6, dim=8, true_rank=2, seq_len=16, train_windows=40,
                     heldout_windows=8, seed=5)




def test_same_seed_same_corpus_and_cache(tmp_path):
    a = synthetic_corpus(SMALL)
    b = synthetic_corpus(SMALL, cache_dir=tmp_path)
    c = synthetic_corpus(SMALL, cache_dir=tmp_path)                   # loaded from disk
    assert (tmp_path / f"corpus-{a.key}" / "train.npy").exists()
    for split in ("train", "heldout"):
        for x, y, z in zip(a.split(split), b.split(split), c.split(split)):
            assert x.shape == (SMALL.train_windows if split == "train" else SMALL.heldout_windows, SMALL.seq_len + 1)
            assert x.dtype == torch.int32 and torch.equal(x, y) and torch.equal(x, z)
    assert torch.equal(a.floors, c.floors) and a.key == c.key
    d = synthetic_corpus(CorpusConfig(**{**SMALL.__dict__, "seed": 6}))
    assert d.key != a.key and not torch.equal(d.train[0], a.train[0])


def test_language_tables_are_distributions():
    lang = build_language(SMALL)
    M, C, V = SMALL.domains, SMALL.clusters, SMALL.vocab
    assert lang.logp.shape == (M, C, V) and lang.stationary.shape == (M, C)
    torch.testing.assert_close(lang.logp.exp().sum(-1), torch.ones(M, C, dtype=torch.float64))
    torch.testing.assert_close(lang.stationary.sum(-1), torch.ones(M, dtype=torch.float64))
    assert torch.bincount(lang.cluster_of, minlength=C).tolist() == [V // C] * C   # balanced clusters
    assert (lang.entropy_rate > 0).all() and (lang.entropy_rate < np.log(V)).all()


def test_entropy_rate_equals_token_chain_computation():
    """Independent check: the full V x V token chain, its stationary law by scipy's eigensolver,
    and ``sum_v pi(v) H(P(. | v))`` give the same entropy rate as the cluster reduction."""
    lang = build_language(SMALL)
    for m in range(SMALL.domains):
        P_tok = lang.logp[m].exp()[lang.cluster_of].numpy()               # (V, V) token transitions
        w, vl = scipy.linalg.eig(P_tok.T)
        pi = np.real(vl[:, np.argmin(np.abs(w - 1))])
        pi = pi / pi.sum()
        H_rows = scipy.stats.entropy(P_tok, axis=1)                        # nats
        assert float(pi @ H_rows) == pytest.approx(float(lang.entropy_rate[m]), rel=1e-10)
        np.testing.assert_allclose(pi, lang.token_stationary(m).numpy(), atol=1e-12)


def test_entropy_rate_matches_monte_carlo():
    """Mean true-model NLL of sampled windows (from stationarity) is an unbiased estimate of H_m."""
    lang = build_language(SMALL)
    g = torch.Generator().manual_seed(0)
    for m in range(SMALL.domains):
        w = sample_windows(lang, m, 3000, 12, g)
        per_window = lang.nll(m, w).mean(1)                                # (N,) i.i.d. across windows
        mean, se = float(per_window.mean()), float(per_window.std() / per_window.numel() ** 0.5)
        assert abs(mean - float(lang.entropy_rate[m])) < 4 * se, (m, mean, float(lang.entropy_rate[m]), se)


def test_first_token_is_stationary_and_transitions_follow_P():
    lang = build_language(SMALL)
    g = torch.Generator().manual_seed(1)
    w = sample_windows(lang, 0, 6000, 2, g).long()
    V = SMALL.vocab
    counts = torch.bincount(w[:, 0], minlength=V).numpy()
    expected = lang.token_stationary(0).numpy() * w.shape[0]
    assert scipy.stats.chisquare(counts, expected).pvalue > 1e-4
    c = lang.cluster_of[w[:, 0]]
    sel = w[c == 0, 1]
    counts = torch.bincount(sel, minlength=V).numpy()
    assert scipy.stats.chisquare(counts, lang.logp[0, 0].exp().numpy() * sel.numel()).pvalue > 1e-4


def test_stationary_law_against_eigenvector():
    T = torch.rand(5, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.01
    T = T / T.sum(1, keepdim=True)
    pi = stationary_law(T)
    torch.testing.assert_close(pi @ T, pi, atol=1e-13, rtol=0)


def test_domain_scale_zero_makes_identical_domains():
    lang = build_language(CorpusConfig(**{**SMALL.__dict__, "domain_scale": 0.0}))
    assert torch.allclose(lang.logp[0], lang.logp[1]) and torch.allclose(lang.entropy_rate, lang.entropy_rate[:1])
    lang = build_language(SMALL)
    assert not torch.allclose(lang.entropy_rate, lang.entropy_rate[:1])


def test_blind_excess_is_the_optimal_domain_blind_gap():
    lang = build_language(SMALL)
    gap = lang.blind_excess()
    assert (gap > 0).all()
    # Q minimises the balanced cross-entropy among domain-blind first-order predictors: perturbing it costs.
    P, pi = lang.logp.exp(), lang.stationary                              # (M, C, V), (M, C)

    def balanced_ce(logq):
        return float((pi[:, :, None] * P * -logq).sum((1, 2)).mean())

    w = pi / pi.sum(0, keepdim=True)
    logq = torch.log((w[:, :, None] * P).sum(0))
    best = balanced_ce(logq)
    assert best == pytest.approx(float((lang.entropy_rate + gap).mean()), rel=1e-12)
    g = torch.Generator().manual_seed(3)
    for _ in range(5):
        other = torch.log_softmax(logq + 0.05 * torch.randn(logq.shape, generator=g, dtype=torch.float64), -1)
        assert balanced_ce(other) > best
    same = build_language(CorpusConfig(**{**SMALL.__dict__, "domain_scale": 0.0})).blind_excess()
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-12, rtol=0)
    wider = build_language(CorpusConfig(**{**SMALL.__dict__, "domain_scale": 4.0})).blind_excess()
    assert (wider > gap).all()


def test_sample_batch_shifts_and_balances():
    corpus = synthetic_corpus(SMALL)
    g = torch.Generator().manual_seed(0)
    x, y, d = sample_batch(corpus, "train", 600, g)
    assert x.shape == y.shape == (600, SMALL.seq_len) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    counts = torch.bincount(d, minlength=SMALL.domains).numpy()
    assert scipy.stats.chisquare(counts).pvalue > 1e-4
    # every row is a window of its own domain
    for i in range(10):
        rows = torch.cat([x[i, :1], y[i]]).to(torch.int32)
        assert (corpus.train[int(d[i])] == rows).all(1).any()
    x, y, d = sample_batch(corpus, "heldout", 4, g, domains=torch.tensor([2, 2, 0, 1]))
    assert d.tolist() == [2, 2, 0, 1]
    with pytest.raises(BadInput, match="split"):
        sample_batch(corpus, "test", 4, g)


def test_summary():
    corpus = synthetic_corpus(SMALL)
    rows = corpus.summary()
    assert [r["train_tokens"] for r in rows] == [SMALL.train_windows * SMALL.seq_len] * SMALL.domains
    assert all(r["blind_excess"] > 0 for r in rows)


@pytest.mark.parametrize("field,value", [("clusters", 0), ("domains", 0), ("temperature", 0.0), ("overlap", 2.0),
                                         ("domain_scale", -1.0), ("seq_len", 0)])
def test_config_errors_name_the_flag(field, value):
    """A field some command sets names its flag; one no command exposes names the field itself."""
    exposed = field != "temperature"
    with pytest.raises(BadInput) as e:
        CorpusConfig(**{field: value})
    assert e.value.flag == ("--" + field.replace("_", "-") if exposed else field)


TEXTS = {
    "code": ["def f(x):\n    return x + 1\n" * 30, "for i in range(10):\n    print(i * i)\n" * 30],
    "prose": ["The quick brown fox jumps over the lazy dog. " * 40, "A stitch in time saves nine. " * 40],
}


@pytest.fixture
def text_dir(tmp_path):
    for dom, docs in TEXTS.items():
        (tmp_path / "data" / dom).mkdir(parents=True)
        for i, t in enumerate(docs):
            (tmp_path / "data" / dom / f"{i}.txt").write_text(t)
    (tmp_path / "data" / "empty").mkdir()                                 # no .txt: not a domain
    return tmp_path / "data"


def test_text_domains_with_local_bpe(text_dir, tmp_path):
    corpus = load_text_domains(text_dir, vocab=300, seq_len=16, cache_dir=tmp_path / "cache")
    assert corpus.names == ("code", "prose")
    assert torch.isnan(corpus.floors).all()
    tok = corpus.tokenizer
    assert tok.get_vocab_size() <= 300
    for tr, he in zip(corpus.train, corpus.heldout):
        assert tr.shape[1] == he.shape[1] == 17 and tr.shape[0] >= 1 and he.shape[0] >= 1
        assert int(tr.max()) < 300 and int(tr.min()) >= 0
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok.encode(text).ids) == text
    again = load_text_domains(text_dir, vocab=300, seq_len=16, cache_dir=tmp_path / "cache")
    assert all(torch.equal(a, b) for a, b in zip(corpus.train, again.train))
    x, y, d = sample_batch(again, "train", 5, torch.Generator().manual_seed(0))
    assert x.shape == (5, 16)


def test_text_domains_bad_input(tmp_path, text_dir):
    with pytest.raises(BadInput, match="--data"):
        load_text_domains(tmp_path / "missing", vocab=300, seq_len=16)
    (tmp_path / "flat").mkdir()
    with pytest.raises(BadInput, match="--data"):
        load_text_domains(tmp_path / "flat", vocab=300, seq_len=16)
    with pytest.raises(BadInput, match="--data"):
        load_text_domains(text_dir, vocab=300, seq_len=100_000)           # too few tokens for two windows
