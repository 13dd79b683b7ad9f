"""ACAR sigma routing (`substrate.acar`, ``--router-kind acar``): sigma on hand-made predictions, equal
gates on exactly 1/2/3 slots, causality, no gradient into the router, mode counts that add up."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

import substrate.cell as cellmod
from sandbox.errors import BadInput
from substrate import acar
from substrate.cell import CellConfig, build_state, prepare_substrate, run_cell
from substrate.model import build_model, preset
from substrate.train import TrainConfig

FAST = dict(preset="tiny", steps=3, batch=2, slots=5, rank=2, eval_every=3, checkpoint_every=0, interval=3,
            min_age=0, fit_windows=1, eval_windows=2, pretrain_steps=1, specialist_steps=1, seed=5)


def test_sigma_on_hand_made_predictions():
    preds = torch.tensor([[7, 7, 7], [7, 7, 2], [7, 2, 7], [2, 7, 7], [1, 2, 3]])
    assert acar.disagreement(preds).tolist() == [0.0, 0.5, 0.5, 0.5, 1.0]
    d = torch.tensor([[0.0, 1.0, 0.5, 0.5]])
    torch.testing.assert_close(acar.prefix_sigma(d), torch.tensor([[0.0, 0.5, 0.5, 0.5]]))
    assert acar.modes(torch.tensor([0.0, 0.2, 0.25, 0.5, 0.74, 0.75, 1.0])).tolist() == [1, 1, 2, 2, 2, 3, 3]


def test_gates_sum_to_one_on_exactly_n_slots():
    B, T, K = 2, 6, 7
    score = torch.randn(B, T, K, generator=torch.Generator().manual_seed(0))
    top = acar.top3(score, (B, T))
    assert torch.equal(top, score.topk(3, -1).indices)
    n = torch.tensor([1, 2, 3]).repeat(B * T // 3 + 1)[:B * T].view(B, T)
    g = acar.equal_gates(top, n, K)
    torch.testing.assert_close(g.sum(-1), torch.ones(B, T))
    assert torch.equal((g > 0).sum(-1), n)
    for b in range(B):
        for t in range(T):
            on = set(torch.nonzero(g[b, t]).flatten().tolist())
            assert on == set(top[b, t, :int(n[b, t])].tolist())          # the best n candidates, 1/n each
            torch.testing.assert_close(g[b, t][list(on)], torch.full((len(on),), 1 / int(n[b, t])))
    static = acar.top3(torch.tensor([0.0, 3.0, 1.0, 2.0]), (B, T))        # a (K,) score: same for every token
    assert static.tolist() == [[[1, 3, 2]] * T] * B


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(preset("tiny", slots=4, rank=2))
    with torch.no_grad():
        for b in m.banks().values():   # distinct, non-zero slots so the probes disagree sometimes
            b.B.normal_(0, 2.0)
            b.A.normal_(0, 2.0)
    return m


def test_causal_and_counts_add_up(model):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab, (3, 16), generator=g)
    score = torch.tensor([0.3, 0.1, 0.2, 0.0])
    res = acar.acar_gates(model, x, score, 4)
    x2 = x.clone()
    x2[:, 9] = (x2[:, 9] + 1) % model.cfg.vocab                            # change a later token
    res2 = acar.acar_gates(model, x2, score, 4)
    torch.testing.assert_close(res.gates[:, :9], res2.gates[:, :9])
    torch.testing.assert_close(res.sigma[:, :9], res2.sigma[:, :9])
    c = res.counts()
    assert sum(c.values()) == x.numel()
    assert torch.equal((res.gates > 0).sum(-1), res.mode)
    row = acar.usage_row(c)
    assert row["mode1"] + row["mode2"] + row["mode3"] == row["tokens"] == x.numel()
    assert row["adapter_units"] == int(res.mode.sum()) and row["always3_units"] == 3 * x.numel()
    assert row["saved_vs_always3"] == pytest.approx(1 - row["adapter_units"] / row["always3_units"])


class _Rule:
    """A causal stand-in model: slot k's next-token prediction at t is a function of x[t] alone, and
    the three candidate slots agree or not depending on x[t] (so every mode occurs)."""

    vocab = 12

    def __call__(self, x, g):
        slot = g.argmax(-1)                                                     # (B, T): probes gate one slot
        pred = (x + (slot == 1) * (x % 2 == 0) + 2 * (slot == 2) * (x % 3 == 0)) % self.vocab
        return torch.nn.functional.one_hot(pred, self.vocab).float()


def test_every_mode_occurs_and_gates_are_causal_on_a_rule_model():
    x = torch.randint(0, _Rule.vocab, (64, 20), generator=torch.Generator().manual_seed(2))
    score = torch.tensor([3.0, 2.0, 1.0, 0.0])
    res = acar.acar_gates(_Rule(), x, score, 4)
    c = res.counts()
    assert all(c[m] > 0 for m in acar.MODES) and sum(c.values()) == x.numel()
    d = acar.disagreement(acar.probe_predictions(_Rule(), x, res.top, 4))
    torch.testing.assert_close(res.sigma, d.cumsum(-1) / torch.arange(1, 21))
    x2 = x.clone()
    x2[:, 12:] = (x2[:, 12:] * 5 + 1) % _Rule.vocab
    res2 = acar.acar_gates(_Rule(), x2, score, 4)
    torch.testing.assert_close(res.gates[:, :12], res2.gates[:, :12])
    assert not torch.equal(res.gates[:, 12:], res2.gates[:, 12:])


@pytest.fixture(scope="module")
def sub(tmp_path_factory):
    torch.set_num_threads(1)
    return prepare_substrate(CellConfig.of(**FAST), tmp_path_factory.mktemp("cache"))


def test_no_gradient_reaches_the_router_and_adapters_learn(sub):
    cfg = CellConfig.of(**FAST, router_kind="acar")
    st = build_state(cfg, sub)
    assert st.acar_score.shape == (cfg.slots,)
    cellmod.train_step(cfg, st, sub.corpus, TrainConfig(steps=3, lr=cfg.lr, batch=cfg.batch, warmup=1))
    assert all(p.grad is None for p in st.router.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in st.model.adapter_parameters())
    x = sub.corpus.heldout[0][:2, :-1].long()
    gates = cellmod.gates_for(cfg, st, x, 0)
    assert not gates.requires_grad
    torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[:-1]))


def test_run_writes_acar_csv_and_identity(sub, tmp_path):
    assert "router_kind" not in CellConfig.of(**FAST).identity()                   # old folders still resume
    cfg = CellConfig.of(**FAST, router_kind="acar")
    assert cfg.identity()["router_kind"] == "acar"
    m = run_cell(cfg, tmp_path / "a", substrate=sub).metrics
    t = pd.read_csv(tmp_path / "a" / "acar.csv")
    per_domain, total = t[t.domain != "all"], t[t.domain == "all"].iloc[0]
    for k in ("mode1", "mode2", "mode3", "tokens", "adapter_units"):
        assert per_domain[k].sum() == total[k]
    assert (t.mode1 + t.mode2 + t.mode3 == t.tokens).all()
    assert total["tokens"] == sub.corpus.domains * FAST["eval_windows"] * sub.corpus.seq_len
    assert m["router_kind"] == "acar" and m["acar"]["tokens"] == total["tokens"]
    assert m["router"] == "acar"                     # cells.csv's router column names the router that ran
    with pytest.raises(BadInput):
        CellConfig.of(**FAST, router_kind="bogus")


def test_acar_run_resumes_to_the_same_metrics(sub, tmp_path):
    cfg = CellConfig.of(**FAST, router_kind="acar")
    whole = run_cell(cfg, tmp_path / "whole", substrate=sub).metrics
    assert not run_cell(cfg, tmp_path / "cut", substrate=sub, stop_after=1).done
    resumed = run_cell(cfg, tmp_path / "cut", substrate=sub).metrics
    assert resumed["balanced_log_ppl"] == whole["balanced_log_ppl"] and resumed["acar"] == whole["acar"]
