"""The composition root: the `sandbox` command line (`cli`), its commands and the benchmark runner.

The only code that imports every layer (core `sandbox`, `substrate`, `sweeps`, `figures`); no
library module imports it.
"""
