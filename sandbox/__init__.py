"""Mixture-of-LoRA regime explorer: the shared core (router, adapters, lifecycle, tasks, stats),
the analytic sandbox; `sandbox.app` is the `sandbox` command line on top of every layer.

Core modules import neither `substrate`, `sweeps`, `figures` nor `sandbox.app`; only the app
(`sandbox.app`: the CLI, its commands and the benchmark runner) reaches every layer.
"""

__version__ = "0.1.0"
