"""Mixture-of-LoRA regime explorer: the shared core (router, adapters, lifecycle, tasks, stats),
the analytic sandbox and the `sandbox` command line.

Core modules import neither `substrate`, `sweeps` nor `figures`; only `sandbox.cli` and the
command modules in `sandbox.commands` reach them, lazily.
"""

__version__ = "0.1.0"
