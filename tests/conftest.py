"""Shared fixtures: float64 by default (dense references), small Flax and plain-JAX models."""

import os

# Tests compile hundreds of small programs: XLA's CPU backend at LLVM -O0, without its expensive passes, compiles
# them about a third faster (CPU-s: tests/test_tagging_lm.py 61 -> 38, test_kfac*.py 357 -> 221). Only code generation:
# XLA's graph passes and IEEE semantics (no fast-math) are the same, so results agree to rounding.
# JAXINF_TEST_XLA_OPT=1 tests the fully optimised code instead. Subprocesses started by tests inherit the flags.
FAST_COMPILE = "" if os.environ.get("JAXINF_TEST_XLA_OPT") else (
    " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
)
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + FAST_COMPILE)

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
