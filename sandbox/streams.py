"""One place for randomness: every generator of the project is derived here from a user seed, a
named purpose and the purpose's keys (a step, a domain, a salt), as a pure function.

    generator(Purpose.EVO_SEARCH, seed)                     # the routing search's noise of a seed
    generator(Purpose.CELL_BATCH, seed, step)               # the training batch of a cell's step

Two derivations exist, kept exactly as the project first wrote them so that every stored result
(sweep ledgers, cached corpora and bases, factorial runs) reproduces bit for bit:

* stream purposes (the analytic sandbox and the corpora): ``seed' * 1_000_003 + 7919 * stream``
  modulo 2^63 - 1, where the purpose's keys first fold into ``seed'`` (see `_fold`);
* step purposes (a transformer run): ``seed * 1_000_003 + step * 7_919 + code * 104_729 + 1``;
* the seed purpose (a model's initial weights): the user seed itself.

A new purpose gets a new member with an unused code; never reuse one (two purposes with one code
would share their random numbers).
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import torch

_MOD = 2**63 - 1


class Purpose(Enum):
    """Named streams: ``(family, code[, variant])``. The code is the stream number the formulas mix
    in; a variant marks a purpose that shares its code but folds its seed differently."""

    TASK = ("stream", 0)               # true factors, contexts and slot assignment of a task
    ADAPTERS = ("stream", 1)           # random adapter factors of the initial bank
    CONTEXT_NOISE = ("stream", 2)      # routing-feature noise draws (keys: salt)
    ROUTER_INIT = ("stream", 3)        # initial router parameters (analytic sandbox)
    EVO_SEARCH = ("stream", 4)         # routing-search noise (analytic sandbox)
    SANDBOX_LIFECYCLE = ("hash", 5)    # lifecycle draws of a seed's event (keys: step)
    SANDBOX_BATCH = ("stream", 6)      # finite-batch inputs x of the training losses (analytic sandbox)
    LANGUAGE = ("stream", 10)          # a synthetic corpus's domain languages
    CORPUS_SAMPLE = ("stream", 11)     # a corpus's windows (keys: domain, split index)
    PRETRAIN_BATCH = ("stream", 20)    # the base's pretraining batches
    SPECIALIST_INIT = ("stream", 21)   # the specialists' initial weights
    SPECIALIST_BATCH = ("stream", 21, "next seed")   # the specialists' batches: stream 21 of seed + 1
    CELL_BATCH = ("step", 1)           # a transformer run's training batch (keys: step)
    CELL_FITNESS = ("step", 2)         # leave-one-out selection batch (keys: step)
    CELL_LIFECYCLE = ("step", 3)       # lifecycle draws of a transformer run (keys: step)
    CELL_INIT = ("step", 4)            # starting bank and router of a run (keys: 0)
    CELL_PERTURB = ("step", 5)         # base-perturbation probe (keys: 0)
    SEARCH_BATCH = ("step", 11)        # fresh training windows of a routing-search generation (keys: step)
    SEARCH_NOISE = ("step", 12)        # routing-search noise on the transformer (keys: 0)
    SEARCH_CONFIRM = ("step", 13)      # the second fresh batch that confirms an accepted child (keys: step)
    MODEL_INIT = ("seed", 30)          # a transformer's initial weights (a base before pretraining)


def _fold(purpose: Purpose, seed: int, keys: tuple[int, ...]) -> int:
    """The seed a stream purpose mixes with its code, with the purpose's keys folded in."""
    if purpose is Purpose.CONTEXT_NOISE:                 # keys: (salt,)
        (salt,) = keys
        return int(seed) * 65_537 + int(salt)
    if purpose is Purpose.SPECIALIST_BATCH:              # the next seed's stream (as first written)
        return int(seed) + 1
    if purpose is Purpose.CORPUS_SAMPLE:                 # keys: (domain, split index)
        m, j = keys
        return int(seed) * 4099 + 17 * int(m) + int(j)
    if keys:
        raise ValueError(f"{purpose.name} takes no keys, got {keys}")
    return int(seed)


def generator(purpose: Purpose, seed: int, *keys: int) -> torch.Generator:
    """The CPU generator of `purpose` for user seed `seed` and the purpose's `keys`."""
    family, code = purpose.value[:2]
    g = torch.Generator()
    if family == "stream":
        return g.manual_seed((_fold(purpose, seed, keys) * 1_000_003 + 7919 * code) % _MOD)
    if family == "seed":                                # the seed itself (as first written)
        if keys:
            raise ValueError(f"{purpose.name} takes no keys, got {keys}")
        return g.manual_seed(int(seed) % _MOD)
    if family == "step":
        (step,) = keys
        return g.manual_seed((int(seed) * 1_000_003 + int(step) * 7_919 + code * 104_729 + 1) % _MOD)
    (step,) = keys                                      # hash family: numpy's SeedSequence of (seed, code, step)
    ss = np.random.SeedSequence((int(seed) % 2**64, code, int(step)))
    return g.manual_seed(int(ss.generate_state(1, np.uint64)[0]) % _MOD)
