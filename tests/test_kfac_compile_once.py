"""A second K-FAC/EK-FAC fit of the same problem compiles nothing: in memory and from a stream (issue 15).

The plan (the traced layers) is a static argument of the fit's programs; one plan per problem signature
(``kfac_plan.PlanCache``) and module-level programs keep a later fit — a new operator, new parameter values, a
new stream of the same shapes — from compiling again. Counted with JAX's backend-compile events, not timed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import monitoring

import jaxinf
from jaxinf import scale
from jaxinf.core.data import batch_size
from jaxinf.solvers import kfac_fit
from tests import models

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles: list[str] = []
_compiled_names: list[str] = []


def _on_compile(event, duration, **kw):
    if event == COMPILE_EVENT:
        _compiles.append(event)
        _compiled_names.append(kw.get("fun_name", "?"))


monitoring.register_event_duration_secs_listener(_on_compile)


def _count(fn):
    before = len(_compiles)
    out = fn()
    jax.block_until_ready(out)
    return out, len(_compiles) - before


@pytest.fixture(scope="module")
def problem():
    return models.mlp_problem("plain", n_train=40, n_test=2, d_in=3, hidden=4, out=2)


@pytest.mark.parametrize("update_diagonal", [False, True])
def test_a_second_streamed_fit_compiles_nothing(problem, update_diagonal):
    solver = jaxinf.ekfac(update_diagonal=update_diagonal, fisher="empirical")
    x, y = problem.train

    def fit(params):
        source = scale.ArraySource((np.asarray(x), np.asarray(y)), batch_size=16)  # 16, 16, ragged 8
        return scale.fit_from_stream(solver, problem.loss_fn, params, source, damping=1e-3)

    first, compiled_first = _count(lambda: fit(problem.params))
    assert compiled_first > 0
    moved = jax.tree.map(lambda p: p * 1.5, problem.params)  # new values, same shapes
    second, compiled_second = _count(lambda: fit(moved))
    assert compiled_second == 0
    again, _ = _count(lambda: fit(problem.params))
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_a_second_in_memory_init_compiles_nothing(problem):
    solver = jaxinf.ekfac(fisher="empirical")

    def init(params):
        op = jaxinf.curvature_operator(problem.loss_fn, params, problem.train, damping=1e-3)
        return solver.init(op)

    _, compiled_first = _count(lambda: init(problem.params))
    assert compiled_first > 0
    flipped = jax.tree.map(jnp.negative, problem.params)  # new values, same shapes (the negation compiles, here)
    _, compiled_second = _count(lambda: init(flipped))
    assert compiled_second == 0


def test_a_ragged_last_batch_is_not_traced_at_its_own_size(problem, monkeypatch):
    """Batches of 16, 16 and a ragged 8: the per-example statistics are traced at 16 examples only. The ragged
    batch is padded with masked examples into the same scan (issue 15) instead of being traced and compiled a
    second time at 8. Recorded by a wrapper that calls the real statistics; the fit still equals one batch's."""
    traced = []
    statistics = kfac_fit._batch_statistics

    def recording(plan, output_loss, leaves, batch, key, indices):
        traced.append(batch_size(batch))
        return statistics(plan, output_loss, leaves, batch, key, indices)

    monkeypatch.setattr(kfac_fit, "_batch_statistics", recording)
    jax.clear_caches()  # no fit program of these shapes from an earlier test
    solver = jaxinf.ekfac(fisher="empirical")
    x, y = (np.asarray(a) for a in problem.train)  # 40 examples
    batches = list(zip(np.split(x, [16, 32]), np.split(y, [16, 32])))
    state = solver.init(jaxinf.curvature_operator(problem.loss_fn, problem.params, batches))
    assert traced and set(traced) == {16}
    whole = solver.init(jaxinf.curvature_operator(problem.loss_fn, problem.params, (x, y)))
    for a, b in zip(jax.tree.leaves((state.factors_a, state.factors_g, state.eigvals)),
                    jax.tree.leaves((whole.factors_a, whole.factors_g, whole.eigvals))):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("passes", [1, 2])
def test_a_streamed_fit_with_a_ragged_batch_compiles_one_step_per_pass(problem, passes):
    """A stream of 16, 16 and a ragged 8 examples compiles the per-batch step once per pass (issue 15): the ragged
    batch is padded with masked examples on the host. K-FAC (one pass) decomposes its factors inside the program
    that builds the state, EK-FAC between its passes. The state equals the in-memory fit on one batch."""
    solver = (jaxinf.kfac if passes == 1 else jaxinf.ekfac)(fisher="empirical")
    x, y = (np.asarray(a) for a in problem.train)  # 40 examples
    whole = solver.init(jaxinf.curvature_operator(problem.loss_fn, problem.params, (x, y), damping=1e-3))
    jax.clear_caches()  # no step program of these shapes from an earlier test
    before = len(_compiled_names)
    batches = list(zip(np.split(x, [16, 32]), np.split(y, [16, 32])))
    state = scale.fit_from_stream(solver, problem.loss_fn, problem.params, batches, damping=1e-3, progress=False)
    names = _compiled_names[before:]
    steps = [name for name in names if "_stream_step" in name]
    assert len(steps) == passes, names  # each pass at the first batch's size (twice as many before)
    assert sum("_eigenbases" in name for name in names) == passes - 1, names
    for a, b in zip(jax.tree.leaves((state.factors_a, state.factors_g, state.eigvals)),
                    jax.tree.leaves((whole.factors_a, whole.factors_g, whole.eigvals))):  # fmt: skip
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
