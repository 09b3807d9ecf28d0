"""Shared fixtures: float64 by default (dense references), small Flax and plain-JAX models."""

import gc
import os

# XLA's CPU backend at LLVM -O0 compiles the suite's hundreds of small programs about a third faster, but twice in
# three full CI runs a pytest-xdist worker died of a segmentation fault inside XLA's CPU compiler with these flags
# (backend_compile_and_load; never reproduced alone). So the suite compiles at XLA's default optimisation, as users
# do; JAXINF_TEST_FAST_COMPILE=1 opts into the -O0 flags for quick local runs. Subprocesses started by tests take
# the same choice through the same environment variable.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" if os.environ.get(
    "JAXINF_TEST_FAST_COMPILE"
) else ""
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + FAST_COMPILE)

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

from tests import models  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module.

    jaxinf keeps its jitted steps at module level (shared by every model of the same loss, solver and shapes), so a
    pytest-xdist worker that runs hundreds of test modules would otherwise hold every module's programs to the end:
    a CI worker ran out of memory (MemoryError inside a jitted fit, then a segfault) late in the run.
    """
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(params=["linen", "nnx", "plain"])
def mlp_problem(request):
    """A small MLP regression problem in each model flavour (float64)."""
    return models.mlp_problem(request.param)


@pytest.fixture
def logistic_problem():
    return models.logistic_problem()
