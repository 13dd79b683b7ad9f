"""Statistics that cannot mislead: balanced log metrics, paired tests, equivalence, Holm, attribution.

Every conclusion of the tool comes from this module. Its rules:

1. **Balanced log metric per seed.** ``balanced_log_ppl`` is the equal-weight mean over the M
   domains of each domain's mean token NLL (nats). Domains are never weighted by token count
   (pooling can flip a conclusion: tests/test_stats.py shows one) and PPL values are never
   averaged: there is deliberately no function here that takes a mean of ``exp(...)``.
2. **Across seeds only paired differences of log quantities.** ``delta_i = reference_i - test_i``
   for seed i, lower is better for both, so ``delta > 0`` means the test arm (or treated cell) is
   better. Sandbox: ``log loss_grad - log loss_evo``; full system: ``log PPL_ref - log PPL_test``.
3. **Diverged runs are counted, never averaged in.** A pair with a non-finite value on either side
   is dropped from the statistics and counted in ``n_diverged``; every table reports the count.
4. **Not significant is not a tie.** ``ties`` needs a positive equivalence result (TOST for a margin
   ``eps`` fixed before the comparison, with the reported CI inside ``(-eps, eps)``); otherwise the
   point is ``inconclusive`` and we say how many seeds would resolve it.

Why the arithmetic mean of PPLs misleads (Jensen): two domains, reference log-PPLs ``(2.0, 2.0)``
and test log-PPLs ``(1.5, 2.4)``. Balanced log-PPL: reference 2.0, test 1.95, so
``delta = +0.05`` (the test is better, a 4.9% lower geometric-mean PPL). Mean of PPLs: reference
``e^2 = 7.39``, test ``(e^1.5 + e^2.4) / 2 = 7.75``, so the PPL mean calls the test *worse*. One
bad domain dominates an arithmetic mean of exponentials. This module gives the balanced answer::

    >>> import numpy as np
    >>> nll = np.array([[200.0, 20.0], [150.0, 24.0]])    # (arms, M) NLL sums
    >>> tok = np.array([[100, 10], [100, 10]])            # (arms, M) token counts
    >>> balanced_log_ppl(nll, tok)                         # (arms,)
    array([2.  , 1.95])

Modules, one concern each (everything is re-exported here, so ``from sandbox.stats import X`` keeps
working): `comparison` (the balanced metric, `paired`, bootstrap, Holm), `power` (power and seeds
needed), `regimes` (`classify`, `summarize`, `label_point`, `decompose`, `acar_summary`) and
`contrasts` (`attribution`, `contrast_deltas`). The sequential design of factorials is
`sandbox.sequential`.
"""

from sandbox.stats.comparison import (DEFAULT_ALPHA, DEFAULT_EPS, Paired, balanced_log_ppl, bootstrap_ci, holm, paired, t_to_p)
from sandbox.stats.power import DEFAULT_POWER, MAX_SEEDS, _power_t_integral, power_tost, seeds_needed
from sandbox.stats.regimes import (ACAR_SUMMARY, CONVERGED_FRAC, DECOMPOSITION, SUMMARY_STATS, acar_summary, classify,
                                   decompose, label_point, summarize)
from sandbox.stats.contrasts import ATTRIBUTION_COLUMNS, TESTED_KINDS, attribution, contrast_deltas

__all__ = ["ACAR_SUMMARY", "ATTRIBUTION_COLUMNS", "CONVERGED_FRAC", "DECOMPOSITION", "DEFAULT_ALPHA", "DEFAULT_EPS", "DEFAULT_POWER",
           "MAX_SEEDS", "SUMMARY_STATS", "TESTED_KINDS", "Paired", "acar_summary", "attribution", "balanced_log_ppl",
           "bootstrap_ci", "classify", "contrast_deltas", "decompose", "holm", "label_point", "paired", "power_tost",
           "seeds_needed", "summarize", "t_to_p"]
