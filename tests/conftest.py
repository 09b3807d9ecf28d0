"""Shared fixtures: float64 by default (dense references), small Flax and plain-JAX models."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

from tests import models  # noqa: E402


@pytest.fixture(params=["linen", "nnx", "plain"])
def mlp_problem(request):
    """A small MLP regression problem in each model flavour (float64)."""
    return models.mlp_problem(request.param)


@pytest.fixture
def logistic_problem():
    return models.logistic_problem()
