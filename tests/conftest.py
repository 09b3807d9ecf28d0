"""Shared fixtures: float64 by default (dense references), small Flax and plain-JAX models."""

import atexit
import gc
import os
import shutil
import tempfile

# XLA's CPU backend at LLVM -O0 compiles the suite's hundreds of small programs about a third faster, but twice in
# three full CI runs a pytest-xdist worker died of a segmentation fault inside XLA's CPU compiler with these flags
# (backend_compile_and_load; never reproduced alone). So the suite compiles at XLA's default optimisation, as users
# do; JAXINF_TEST_FAST_COMPILE=1 opts into the -O0 flags for quick local runs. Subprocesses started by tests take
# the same choice through the same environment variable.
FAST_COMPILE = " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true" if os.environ.get(
    "JAXINF_TEST_FAST_COMPILE"
) else ""
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8" + FAST_COMPILE)

# Three quarters of the suite's time is XLA compiling (measured with JAX's monitoring events: 1,964 of 2,662
# worker-seconds), much of it the same program again: a random draw of a shape another module drew, a model fit that
# another parametrisation compiled, and everything after `_free_compiled_programs` drops the in-memory programs. So
# the run shares one persistent compilation cache, a fresh folder per run (nothing carries over between runs): the
# pytest-xdist controller loads this file first and its workers and the processes that tests start inherit the
# folder through the environment. Programs read back are the compiled ones, bit for bit; JAX keys an entry on the
# program, the compile options, the backend and the jax version. Whoever sets JAX_COMPILATION_CACHE_DIR keeps theirs.
# Measured: the whole suite with -n 2 on a 2-core machine took 1,331 s without the cache and 1,109 s with it (819
# passed both times; both runs under a plugin that timed every compilation).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxinf-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import pytest  # noqa: E402

from tests import models  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop every compiled program after each test module.

    jaxinf keeps its jitted steps at module level (shared by every model of the same loss, solver and shapes), so a
    pytest-xdist worker that runs hundreds of test modules would otherwise hold every module's programs to the end:
    a CI worker ran out of memory (MemoryError inside a jitted fit, then a segfault) late in the run. Dropping them
    only once a worker's resident memory passed 2 GiB was tried: the memory stayed at 2.2-2.9 GiB per worker (not
    given back) and the run was about 4 % shorter, so they are dropped every time; the persistent cache above reads
    back what the next module compiles again.
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
