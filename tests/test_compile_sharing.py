"""A second model of the same loss, solver configuration and shapes compiles nothing (issue 15, "first calls")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinf
from jaxinf.core import checks
from jaxinf.solvers import compiled
from tests import models

model_fn, output_loss = models.tanh_model_fn, models.mse_output_loss

@pytest.fixture(scope="module")
def data():
    kx, kw, kv = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (24, 3))
    y = jnp.cos(x @ jnp.ones(3))
    params = {"w1": 0.5 * jax.random.normal(kw, (3, 4)), "w2": jax.random.normal(kv, (4,))}
    return params, (x[:20], y[:20]), (x[20:], y[20:])


def _cache_sizes():
    jitted = (compiled.init, compiled.solve_all, compiled.example_grads, compiled.contract_columns, compiled.call)
    return [f._cache_size() for f in (*jitted, checks._values_jit, checks._probe_norms)]


def test_factories_return_one_object_per_configuration():
    assert jaxinf.cg(rtol=1e-3) is jaxinf.cg(rtol=1e-3)
    assert jaxinf.cg(rtol=1e-3) is not jaxinf.cg(rtol=1e-4)
    assert jaxinf.cg(maxiter=9) is jaxinf.cg(maxiter=9) is not jaxinf.cg(maxiter=9.0)  # the type is part of the key
    weights = np.ones(3)  # an unhashable argument: a new object each time, still a working solver
    made = jaxinf.tracin([{"w": weights}], learning_rates=weights[:1])
    assert made is not jaxinf.tracin([{"w": weights}], learning_rates=weights[:1])


@pytest.mark.parametrize("factory", [jaxinf.direct, jaxinf.ekfac])
def test_a_second_model_reuses_every_compiled_program(data, factory):
    params, train, test = data
    kw = dict(damping=0.1, curvature="gauss_newton", model_fn=model_fn, output_loss=output_loss)
    first = jaxinf.InfluenceModel(None, params, factory(), **kw).fit(train)
    expected = np.asarray(first.influences(test, train))
    first.self_influence(train)
    before = _cache_sizes()
    second = jaxinf.InfluenceModel(None, params, factory(), **kw).fit(train)  # a new model, a new factory call
    np.testing.assert_allclose(second.influences(test, train), expected, rtol=1e-12)
    second.self_influence(train)
    second.damping = 0.2  # a refit at new damping: data of the operator, not a new program
    assert _cache_sizes() == before
