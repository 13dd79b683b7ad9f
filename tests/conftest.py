"""Shared test settings: headless plotting, bounded hypothesis runs, a seeded generator fixture."""

import os

os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from hypothesis import HealthCheck, settings

# The test tensors are small: one thread avoids OpenMP oversubscription on shared 2-core machines
# (measured 30-200x slowdowns with the default of 2 threads while other processes ran).
torch.set_num_threads(1)

settings.register_profile(
    "default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


@pytest.fixture
def gen():
    import torch

    return torch.Generator().manual_seed(1234)
