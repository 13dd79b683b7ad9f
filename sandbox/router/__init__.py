"""The shared routers: routing features ``(*b, N, F)`` -> gates ``(*b, N, K)``.

Two kinds, one set of pure functions (the analytic sandbox calls them on plain tensors with
leading seed/population dims; `Router` wraps them with ``nn.Parameter`` for the transformer):

- ``softmax`` (the static baseline B3): ``g = softmax(h W + b)``, zero-sum on the simplex.
- ``sigmoid`` (the rewrite): independent gates
  ``g_k = f_k + (1 - f_k) * sigmoid(z_k / tau(step))`` with ``z = h W + b``, a learnable floor
  ``f_k = floor_max * sigmoid(phi_k)`` in ``[0, floor_max]`` and a temperature annealed from
  ``tau_start`` to ``tau_end`` over ``anneal_steps`` (``linear``, ``cosine`` or ``exp``) and
  clamped to ``[tau_min, tau_max]`` at every step. So ``g_k`` lies in ``[f_k, 1]``. With
  ``tau_scales = input`` the temperature divides only the input-dependent part:
  ``sigmoid(b_k + (h W)_k / tau)``.

Parameters (slot axis last, so slot k of every parameter is ``[..., k]``):
``W (*b, F, K)``, ``bias (*b, K)`` and, for ``sigmoid``, ``phi (*b, K)``.

Router kinds are an extension point (`sandbox.plugins`, group ``router``): ``RouterConfig.kind``
(flags ``--router``) names a built-in kind, an entry point in ``molora.routers`` or ``module:Name``
of an object with the `RouterKind` protocol; the built-ins are registered the same way
(docs/plugins.md builds one from scratch).

The package holds one concern per module: `sandbox.router.config` (`RouterConfig`, the `RouterKind`
protocol, `kind_of`), `kinds` (the built-ins and the plugin probe, registered on import), `gates` (the
functional core), `module` (`Router`) and `telemetry`. Every name is re-exported here, so
``from sandbox.router import ...`` is the import path to use.
"""

from __future__ import annotations

from sandbox.router.config import (INITS, KINDS, PARAM_ORDER, SCHEDULES, TAU_SCALES, RouterConfig, RouterKind,
                                   _fail, _finite, _order, kind_of)
from sandbox.router.gates import (floors, init_router_params, mass_init, params_to_vector, router_gates,
                                  router_logits, temperature, vector_to_params)
from sandbox.router.kinds import SigmoidKind, SoftmaxKind, check_router_kind
from sandbox.router.module import Router
from sandbox.router.telemetry import GateTelemetry, _summary, gate_rows, gate_telemetry

__all__ = ["INITS", "KINDS", "PARAM_ORDER", "SCHEDULES", "TAU_SCALES", "GateTelemetry", "Router", "RouterConfig",
           "RouterKind", "SigmoidKind", "SoftmaxKind", "_fail", "_finite", "_order", "_summary", "check_router_kind",
           "floors", "gate_rows", "gate_telemetry", "init_router_params", "kind_of", "mass_init", "params_to_vector",
           "router_gates", "router_logits", "temperature", "vector_to_params"]
