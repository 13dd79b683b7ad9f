"""One module for randomness: named purposes, pure functions of (seed, purpose, keys), and the
numbers of every purpose equal to the derivation it replaced (stored results reproduce)."""

import numpy as np
import pytest
import torch

from sandbox.streams import Purpose, generator

MOD = 2**63 - 1


def _legacy(purpose: Purpose, seed: int, *keys: int) -> torch.Generator:
    """The formulas as first written in tasks.py, analytic.py, corpus.py, train.py and cell.py."""
    g = torch.Generator()
    stream = lambda s, which: g.manual_seed((s * 1_000_003 + 7919 * which) % MOD)  # noqa: E731
    if purpose is Purpose.CONTEXT_NOISE:
        return stream(seed * 65_537 + keys[0], 2)
    if purpose is Purpose.CORPUS_SAMPLE:
        return stream(seed * 4099 + 17 * keys[0] + keys[1], 11)
    if purpose is Purpose.SPECIALIST_BATCH:
        return stream(seed + 1, 21)
    if purpose is Purpose.MODEL_INIT:                  # model.build_model: torch.Generator().manual_seed(seed)
        return g.manual_seed(seed)
    if purpose is Purpose.SANDBOX_LIFECYCLE:
        ss = np.random.SeedSequence((seed % 2**64, 5, keys[0]))
        return g.manual_seed(int(ss.generate_state(1, np.uint64)[0]) % MOD)
    codes = {Purpose.TASK: 0, Purpose.ADAPTERS: 1, Purpose.ROUTER_INIT: 3, Purpose.EVO_SEARCH: 4, Purpose.LANGUAGE: 10,
             Purpose.PRETRAIN_BATCH: 20, Purpose.SPECIALIST_INIT: 21,
             Purpose.SANDBOX_BATCH: 6}   # new with finite-batch losses (no legacy formula to match)
    if purpose in codes:
        return stream(seed, codes[purpose])
    step_codes = {Purpose.CELL_BATCH: 1, Purpose.CELL_FITNESS: 2, Purpose.CELL_LIFECYCLE: 3, Purpose.CELL_INIT: 4,
                  Purpose.CELL_PERTURB: 5, Purpose.SEARCH_BATCH: 11, Purpose.SEARCH_NOISE: 12,
                  Purpose.SEARCH_CONFIRM: 13}   # new with the confirmation step (no legacy formula to match)
    return g.manual_seed((seed * 1_000_003 + keys[0] * 7_919 + step_codes[purpose] * 104_729 + 1) % MOD)


def _keys(p: Purpose) -> tuple:
    return {Purpose.CONTEXT_NOISE: (7,), Purpose.CORPUS_SAMPLE: (2, 1)}.get(
        p, (13,) if p.value[0] in ("step", "hash") else ())


@pytest.mark.parametrize("purpose", list(Purpose))
@pytest.mark.parametrize("seed", [0, 42, 2026])
def test_every_purpose_reproduces_the_derivation_it_replaced(purpose, seed):
    k = _keys(purpose)
    got = torch.rand(5, generator=generator(purpose, seed, *k))
    assert torch.equal(got, torch.rand(5, generator=_legacy(purpose, seed, *k)))


def test_purposes_are_distinct_streams():
    draws = {p: tuple(torch.rand(4, generator=generator(p, 42, *_keys(p))).tolist()) for p in Purpose}
    assert len(set(draws.values())) == len(draws)
    assert len({p.value for p in Purpose}) == len(Purpose)      # no two purposes share a value (alias)


def test_keys_are_checked():
    with pytest.raises(ValueError, match="takes no keys"):
        generator(Purpose.TASK, 1, 5)
